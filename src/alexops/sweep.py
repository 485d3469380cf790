"""`alexops sweep`: a grid of DVC experiments run in parallel, grouped as one sweep in MLflow.

    alexops sweep -S train.lr=0.02,0.05,0.1 [-S train.width=0.25,0.5] [-j 2] [--name NAME]

Each point of the grid is a DVC experiment: `dvc exp run --queue --name <sweep> -S ...` queues
them (DVC expands the grid: comma lists, and Hydra's `range()`/`choice()`), and
`dvc queue start -j N` runs N at a time, each in its own temporary copy. A parent MLflow run
named after the sweep holds the grid; every point's run is nested under it (`mlflow.parentRunId`)
and tagged `sweep`, so the MLflow UI lists the points side by side, as `dvc exp show` does.
Every point goes through the promotion gate, so `@champion` ends on the best. The command waits
for the points and prints a table of them; it exits non-zero when a point failed
(`dvc queue logs <name>` shows why).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from alexops.errors import AlexopsError

FINAL_STATES = ("success", "failed")
POLL_S = 5.0
LOST_AFTER_IDLE_POLLS = 6  # 30 s with no queue worker alive while points still wait


def add_parser(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="run a grid of DVC experiments in parallel, grouped in MLflow")
    sweep.add_argument(
        "-S", dest="grid", action="append", required=True, metavar="KEY=V1,V2,...",
        help="a param and its values (repeatable; the grid is every combination)",
    )  # fmt: skip
    sweep.add_argument("-j", "--jobs", type=int, default=2, help="experiments run at once (default: 2)")
    sweep.add_argument("--name", default=None, help="the sweep's name (default: sweep-<date>-<time>)")


def run(args: argparse.Namespace) -> int:
    from alexops import params as params_module
    from alexops import tracking

    root = Path(args.root).resolve()
    if args.jobs < 1:
        raise AlexopsError(f"-j {args.jobs}: at least one experiment must run at a time.")
    params = params_module.load(root / args.params)
    check_grid(root / args.params, args.grid)
    name = args.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise AlexopsError(f"--name {name!r}: use letters, digits, - and _ (it names git refs).")
    mlflow = tracking.connect(root)
    experiment_id = tracking.use_experiment(mlflow, params, root)
    tags = {"sweep": name, "sweep.grid": " ".join(args.grid)}
    parent = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags)
    status, points = "FAILED", []
    try:
        points = queue(root, name, args.grid, parent.info.run_id)
        print(f"sweep {name}: {len(points)} experiments queued; running {args.jobs} at a time")
        dvc(root, "queue", "start", "-j", str(args.jobs))
        states = wait(root, points)
        status = report(mlflow, name, states)
    except KeyboardInterrupt:
        status = "KILLED"
        stop_points(root, points)
        raise
    finally:
        mlflow.end_run(status)
        forget(root, points)
    return 0 if status == "FINISHED" else 1


def check_grid(params_path: Path, grid: list[str]) -> None:
    """Each value of each key, checked as params before anything is queued."""
    from alexops import params as params_module
    from alexops import presets

    base = yaml.safe_load(params_path.read_text()) or {}
    for entry in grid:
        key, sep, values = entry.partition("=")
        if not sep or not values:
            raise AlexopsError(f"-S {entry}: expected KEY=V1,V2,..., e.g. -S train.lr=0.02,0.05")
        if "(" in values:  # a Hydra range()/choice(): DVC expands it, each stage checks its point
            continue
        for value in values.split(","):
            params_module.from_dict(presets.merge(base, {key: yaml.safe_load(value)}), source=f"-S {entry}")


def queue(root: Path, name: str, grid: list[str], parent_run_id: str) -> list[str]:
    """Queue the grid; record each point's sweep where its stages will find it."""
    from alexops import tracking

    flags = [flag for entry in grid for flag in ("-S", entry)]
    queued = dvc(root, "exp", "run", "--queue", "--name", name, *flags)
    points = re.findall(r"Queued experiment '([^']+)'", queued)
    if not points:
        raise AlexopsError(f"dvc queued nothing for the sweep:\n{queued.strip()[-500:]}")
    records = root / tracking.SWEEPS_DIR
    records.mkdir(parents=True, exist_ok=True)
    for point in points:
        (records / f"{point}.yaml").write_text(
            yaml.safe_dump({"sweep": name, "parent_run_id": parent_run_id})
        )
    return points


def wait(root: Path, points: list[str]) -> dict[str, str]:
    """Each point's final state ("success" or "failed"), once all have one. Points left waiting
    with no queue worker alive (workers killed, the machine restarted) end as "lost"."""
    reported: dict[str, str] = {}
    idle_polls = 0
    while len(reported) < len(points):
        states, workers = queue_status(root)
        idle_polls = idle_polls + 1 if workers == 0 else 0
        for point in points:
            state = states.get(point, "lost")
            if state in ("queued", "running") and idle_polls >= LOST_AFTER_IDLE_POLLS:
                state = "lost"
            if state in (*FINAL_STATES, "lost") and point not in reported:
                reported[point] = state
                print(f"  {point}: {state}", flush=True)
        if len(reported) < len(points):
            time.sleep(POLL_S)
    if "lost" in reported.values():
        print(
            "some points were lost with their queue workers: `dvc queue start -j N` runs what is still queued"
        )
    return reported


def queue_status(root: Path) -> tuple[dict[str, str], int]:
    """(experiment name → its state in DVC's queue, lower case; the number of live workers), from
    `dvc queue status`, which lists the queue's tasks whatever commit is checked out."""
    text = dvc(root, "queue", "status")
    states = {}
    for line in text.splitlines()[1:]:
        task = re.match(r"^[0-9a-f]{7,}\s+(\S+)\s+.*\s(\w+)$", line.strip())
        if task is not None:
            states[task[1]] = task[2].lower()
    workers = re.search(r"Worker status: (\d+) active, (\d+) idle", text)
    return states, (int(workers[1]) + int(workers[2])) if workers else 0


def stop_points(root: Path, points: list[str]) -> None:
    """Stop the sweep's running points and drop its queued ones (the queue's workers run on
    their own, and would go on running them)."""
    for command in (("queue", "kill"), ("queue", "remove")):
        with contextlib.suppress(AlexopsError):  # a point can be done already, or never started
            dvc(root, *command, *points)
    print(f"sweep: stopped {len(points)} experiments (`dvc queue status` shows them)", file=sys.stderr)


def forget(root: Path, points: list[str]) -> None:
    from alexops import tracking

    for point in points:
        (root / tracking.SWEEPS_DIR / f"{point}.yaml").unlink(missing_ok=True)


def report(mlflow, name: str, states: dict[str, str]) -> str:
    """Print the points side by side; record the best on the parent run. FINISHED or FAILED."""
    from alexops import tracking

    runs = mlflow.search_runs(filter_string=f"tags.sweep = '{name}' and tags.`dvc.experiment` != ''",
                              search_all_experiments=True, output_format="list")  # fmt: skip
    by_point = {run.data.tags.get("dvc.experiment"): run for run in runs}
    print(f"\n{'experiment':<28} {'state':<8} {'test accuracy':>13}  registered")
    best = None
    for point, state in sorted(states.items()):
        run = by_point.get(point)
        accuracy = run.data.metrics.get("test_accuracy") if run else None
        version = f"v{run.data.tags['registered_version']} @{run.data.tags.get('alias')}" if run and (
            "registered_version" in run.data.tags) else "-"  # fmt: skip
        shown = f"{accuracy:.4f}" if accuracy is not None else "-"
        print(f"{point:<28} {state:<8} {shown:>13}  {version}")
        if accuracy is not None and (best is None or accuracy > best[1]):
            best = (point, accuracy)
    if best is not None:
        with tracking.store_write(mlflow):
            mlflow.log_metric("best_test_accuracy", best[1])
            mlflow.set_tag("sweep.best", best[0])
        print(f"best: {best[0]} ({best[1]:.4f}); `dvc exp apply {best[0]}` puts its params in the workspace")
    return "FINISHED" if all(state == "success" for state in states.values()) else "FAILED"


def dvc_executable() -> str:
    """The dvc beside this interpreter (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


def dvc(root: Path, *args: str) -> str:
    done = subprocess.run([dvc_executable(), *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise AlexopsError(f"`dvc {' '.join(args)}` failed: {done.stderr.strip()[-800:]}")
    return done.stdout
