"""The alexops pipeline as a Prefect flow.

Two ways to run, chosen by the parameters:

- **workspace run** (no overrides, the workspace's dataset): one task per dvc.yaml stage,
  each `dvc repro --single-item <stage>`. DVC decides what is up to date; results land in
  the workspace (`dvc.lock`, outputs, reports), exactly as `dvc repro` would leave them.
- **experiment run** (overrides set, e.g. from the Prefect UI, or another dataset): one
  `dvc exp run --temp -S key=value …` per dataset. It runs in a temporary copy, so the
  workspace's `params.yaml` and outputs are untouched; DVC keeps the run as a named
  experiment (`dvc exp show`) and MLflow records its params, metrics and model version.

Either way a lock file keeps two flow runs from driving DVC in one workspace at once (the
second waits up to `lock_wait_s`, then fails naming the holder), the MLflow run carries
the flow-run id, and the flow run gets a markdown summary and a confusion-matrix table
as Prefect artifacts. Run it on Prefect's temporary local server:

    python -m pipeline.flows [--workspace DIR] [--dataset NAME|all] [-S key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from alexops import params as params_module
from alexops import presets
from alexops.cli import STAGES  # dvc.yaml's stages in order; tests/test_flow.py holds them together
from alexops.datasets import SPECS
from alexops.errors import AlexopsError
from alexops.tracking import PREFECT_FLOW_RUN_ENV, tracking_uri

LOCK_FILE = Path(".dvc") / "tmp" / "alexops-flow.lock"


class StageFailed(RuntimeError):
    pass


class WorkspaceBusy(RuntimeError):
    pass


def dvc_executable() -> str:
    """The dvc beside this interpreter (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


def stage_env(workspace: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # an experiment runs in a temporary copy: its default ./mlflow.db would vanish with it
    env["MLFLOW_TRACKING_URI"] = tracking_uri(workspace)
    if flow_run.id:
        env[PREFECT_FLOW_RUN_ENV] = str(flow_run.id)
    return env


def run_logged(command: list[str], workspace: Path, what: str) -> None:
    logger = get_run_logger()
    logger.info("running %s in %s", " ".join(command), workspace)
    done = subprocess.run(command, cwd=workspace, env=stage_env(workspace), capture_output=True, text=True)
    for line in (done.stdout + done.stderr).split("\n"):
        shown = line.rsplit("\r", 1)[-1].strip()  # a progress bar's last state, as a terminal shows it
        if shown:
            logger.info(shown)
    if done.returncode != 0:
        raise StageFailed(f"{what} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")


@task(task_run_name="{stage}")
def run_stage(stage: str, workspace: str) -> None:
    run_logged([dvc_executable(), "repro", "--single-item", stage], Path(workspace), f"stage {stage}")


@task(task_run_name="experiment {name}", retries=1, retry_delay_seconds=60)
def run_experiment(name: str, overrides: dict[str, Any], workspace: str) -> None:
    flags = [flag for key, value in overrides.items() for flag in ("-S", f"{key}={json.dumps(value)}")]
    command = [dvc_executable(), "exp", "run", "--temp", "--name", name, *flags]
    run_logged(command, Path(workspace), f"experiment {name}")


@contextlib.contextmanager
def workspace_lock(workspace: Path, wait_s: float) -> Iterator[None]:
    """Hold the workspace for this flow run; the OS drops the lock if the process dies."""
    path = workspace / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + wait_s
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = path.read_text().strip() or "unknown"
                if time.monotonic() >= deadline:
                    raise WorkspaceBusy(
                        f"another flow run ({holder}) is driving DVC in {workspace}; waited {wait_s:g} s. "
                        "Fix: let it finish (Prefect UI), or raise lock_wait_s."
                    ) from None
                if not announced:
                    get_run_logger().info("waiting for flow run %s to release %s", holder, workspace)
                    announced = True
                time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
        handle.truncate(0)
        handle.write(f"{flow_run.name or 'no name'} (id {flow_run.id or '-'}, pid {os.getpid()})\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)


def all_overrides(epochs: int | None, lr: float | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    merged = dict(overrides or {})
    if epochs is not None:
        merged["train.epochs"] = epochs
    if lr is not None:
        merged["train.lr"] = lr
    return merged


def datasets_to_run(dataset: str, workspace: Path) -> list[str]:
    if dataset == "all":
        return list(SPECS)
    if not dataset:
        return [params_module.load(workspace / "params.yaml").base.dataset]
    if dataset not in SPECS:
        raise AlexopsError(f"unknown dataset {dataset!r}. Fix: use one of {', '.join(SPECS)} or 'all'.")
    return [dataset]


def checked_params(workspace: Path, overrides: dict[str, Any]) -> params_module.Params:
    """The params this run will use, validated before DVC starts (a bad key fails here)."""
    for key, value in overrides.items():
        if isinstance(value, dict):  # DVC's -S grammar cannot spell keys such as file names
            raise AlexopsError(f"{key}: a mapping cannot be set for one run. Fix: edit params.yaml instead.")
    base = yaml.safe_load((workspace / "params.yaml").read_text()) or {}
    return params_module.from_dict(presets.merge(base, overrides))


def describe_changes(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "params.yaml"


def run_name() -> str:
    """`<dataset> · <overrides>` (or `· params.yaml`): what ran, readable in the UI's list."""
    given = flow_run.parameters
    changes = all_overrides(given.get("epochs"), given.get("lr"), given.get("overrides"))
    return f"{given.get('dataset') or 'default dataset'} · {describe_changes(changes)}"


def experiment_name(dataset: str, overrides: dict[str, Any]) -> str:
    """A git-ref-safe, unique name that says what the experiment changed."""
    changes = {k: v for k, v in overrides.items() if k != "base.dataset"}
    label = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{dataset} {describe_changes(changes)}").strip("-")
    return f"{label[:60]}-{str(flow_run.id or os.getpid())[:8]}"


@flow(name="alexops-pipeline", flow_run_name=run_name, log_prints=True)
def pipeline(
    workspace: str = ".",
    dataset: str = "",
    epochs: int | None = None,
    lr: float | None = None,
    overrides: dict[str, Any] | None = None,
    lock_wait_s: float = 6 * 3600,
) -> list[dict]:
    """fetch → prepare → train → evaluate → export → register, as in dvc.yaml.

    dataset: "" for params.yaml's, a dataset name, or "all". epochs, lr and overrides
    ({"train.batch_size": 64, ...}) apply to this run only, as a DVC experiment.
    """
    root = Path(workspace).resolve()
    changes = all_overrides(epochs, lr, overrides)
    summaries = []
    with workspace_lock(root, lock_wait_s):
        workspace_dataset = params_module.load(root / "params.yaml").base.dataset
        for name in datasets_to_run(dataset, root):
            run_overrides = changes | ({} if name == workspace_dataset else {"base.dataset": name})
            params = checked_params(root, run_overrides)
            if run_overrides:
                run_experiment(experiment_name(name, run_overrides), run_overrides, str(root))
            else:
                for stage in STAGES:
                    # the network is the flaky part: fetch retries with back-off, the rest fail fast
                    retries = {"retries": 3, "retry_delay_seconds": [10, 30, 90]} if stage == "fetch" else {}
                    run_stage.with_options(**retries)(stage, str(root))
            summaries.append(publish_summary(root, params, run_overrides))
    return summaries


def publish_summary(root: Path, params: params_module.Params, overrides: dict[str, Any]) -> dict:
    """The run's MLflow record as Prefect artifacts: a markdown summary and the confusion matrix."""
    from alexops import register, tracking

    mlflow = tracking.connect(root)
    found = find_mlflow_run(mlflow, root, params)
    if found is None:
        create_markdown_artifact(
            f"# {params.base.dataset}\n\nNothing was run: DVC found the pipeline up to date.",
            key=f"summary-{params.base.dataset}",
        )
        return {"dataset": params.base.dataset, "run_id": None}
    data = found.data
    uri = tracking_uri(root)
    served = uri.startswith("http")
    base = uri.rstrip("/") if served else "http://127.0.0.1:5000"
    link = f"{base}/#/experiments/{found.info.experiment_id}/runs/{found.info.run_id}"
    metrics = {k: v for k, v in sorted(data.metrics.items()) if k.startswith(("test_accuracy", "test_loss"))}
    lines = [
        f"# {params.base.dataset}: {register.model_name(params)} version "
        f"{data.tags.get('registered_version', '?')} → @{data.tags.get('alias', '?')}",
        "",
        f"Decision: {data.tags.get('decision', 'not registered')}",
        "",
        f"MLflow run: [{found.info.run_id}]({link}){'' if served else ' (start `make mlflow-ui` first)'}",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {v:.4f} |" for k, v in metrics.items()],
        "",
        "| param | value |",
        "| --- | --- |",
        *[f"| {k}{' (this run)' if k in overrides else ''} | {v} |" for k, v in sorted(data.params.items())],
    ]
    create_markdown_artifact("\n".join(lines), key=f"summary-{params.base.dataset}")
    matrix = confusion_table(mlflow, found.info.run_id, SPECS[params.base.dataset].classes)
    if matrix:
        create_table_artifact(matrix, key=f"confusion-{params.base.dataset}", description="rows: actual")
    return {"dataset": params.base.dataset, "run_id": found.info.run_id, "alias": data.tags.get("alias")}


def find_mlflow_run(mlflow, root: Path, params: params_module.Params):
    """This flow run's MLflow run (tagged with its id), if the pipeline ran anything."""
    runs = mlflow.search_runs(
        experiment_names=[f"{params.register.experiment}-{params.base.dataset}"],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run.id}'",
        output_format="list",
    )
    return runs[0] if runs else None


def confusion_table(mlflow, run_id: str, classes: tuple[str, ...]) -> list[dict]:
    """Counts per (actual, predicted) from the run's evaluate/confusion.csv."""
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="evaluate/confusion.csv")
    except Exception:  # evaluate did not get that far
        return []
    pairs = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    counts = {(a, b): 0 for a in classes for b in classes}
    for pair in pairs:
        counts[pair["actual"], pair["predicted"]] += 1
    return [{"actual": a, **{b: counts[a, b] for b in classes}} for a in classes]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"-S {pair}: expected key=value, e.g. -S train.epochs=2")
        parsed[key] = yaml.safe_load(value)
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the alexops pipeline as a Prefect flow.")
    parser.add_argument("--workspace", default=".", help="the DVC workspace (default: .)")
    parser.add_argument("--dataset", default="", help="a dataset name or 'all' (default: params.yaml's)")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a param for this run only, as a DVC experiment (repeatable)")  # fmt: skip
    args = parser.parse_args()
    pipeline(workspace=args.workspace, dataset=args.dataset, overrides=parse_overrides(args.overrides))


if __name__ == "__main__":
    main()
