"""The alexops pipeline as a Prefect flow.

Two ways to run, chosen by the parameters:

- **Quick run** (no overrides, the workspace's dataset): one task per dvc.yaml stage, each
  `dvc repro --single-item <stage>`. DVC decides what is up to date; results land in the
  workspace (`dvc.lock`, outputs, reports), exactly as `dvc repro` would leave them.
- **Custom run** (overrides, e.g. from the UI, or another dataset): one
  `dvc exp run --temp -S key=value …` per dataset, in a temporary copy, so the workspace's
  `params.yaml` and outputs are untouched; DVC keeps it as a named experiment (`dvc exp show`).
  Its output is split at DVC's stage markers into one task per stage, as in a quick run.

Either way: each stage's output streams into its task's logs as it is written (stdout and
stderr in order, progress bars at most every 10 s, `ERROR`/`error:` lines at ERROR level);
training reports epoch n/N, losses, accuracy and ETA in a progress artifact; a stage that
fails with a transient cause (exit 75: a network, a server) is retried with back-off, any other
failure fails once and the flow run's state message is the stage's own error line; a
cancelled or crashed run stops DVC as Ctrl-C would (the stage's MLflow run ends KILLED, DVC
removes its temporary copy), and what a harder death left behind is removed by the next run;
a lock file keeps two flow runs from driving DVC in one workspace at once. Every run gets a
markdown summary (test metrics, registered version and alias or why none, a link to the MLflow
run) and the confusion matrix as a table, whether its stages ran or DVC restored them.

    python -m pipeline.flows [--workspace DIR] [--dataset NAME|all] [-S key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE as NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from alexops import params as params_module
from alexops import presets, progress
from alexops.cli import EXIT_TRANSIENT, STAGES  # STAGES: dvc.yaml's, in order (tests/test_flow.py)
from alexops.errors import AlexopsError
from alexops.tracking import PREFECT_FLOW_RUN_ENV, tracking_uri
from pipeline.dvc_process import DvcProcess, remove_dead_experiment_copies

LOCK_FILE = Path(".dvc") / "tmp" / "alexops-flow.lock"
WORKSPACE_DATASET = "params.yaml"  # the `dataset` choice that means: the one params.yaml names
# the built-in datasets and those declared in this checkout's params.yaml, read when the flow is
# imported (`prefect deploy` turns them into the UI's choices); a run validates against its workspace
DATASET_NAMES = params_module.dataset_names(Path(__file__).resolve().parents[1] / "params.yaml")
DatasetChoice = Literal[WORKSPACE_DATASET, *DATASET_NAMES, "all"]  # type: ignore[valid-type]
RETRY_DELAYS_S = (10, 30, 90)
EXPERIMENT_ATTEMPTS = 1 + len(RETRY_DELAYS_S)
RETRIED_IN_EXPERIMENTS = ("fetch", "prepare")
PROGRESS_UPDATE_S = 5.0

STAGE_STARTS = re.compile(r"^Running stage '(?P<stage>[\w-]+)':")
STAGE_SKIPPED = re.compile(
    r"^Stage '(?P<stage>[\w-]+)' (?P<why>didn't change, skipping|is cached - skipping run)"
)
STAGE_ERROR = re.compile(r"^alexops (?P<stage>[\w-]+): error: (?P<message>.*)")
DVC_STAGE_FAILED = re.compile(r"^ERROR: failed to reproduce '(?P<stage>[\w-]+)'.*exited with (?P<code>-?\d+)")
TRAINING_BAR = re.compile(r"^epoch (?P<epoch>\d+)/(?P<epochs>\d+):\s+(?P<percent>\d+)%\|")


class StageFailed(RuntimeError):
    """A stage's failure: its name, its own error line and its exit code (75: may pass, retry)."""

    def __init__(self, stage: str, message: str, exit_code: int) -> None:
        super().__init__(f"stage {stage}: {message}")
        self.stage = stage
        self.exit_code = exit_code

    @property
    def transient(self) -> bool:
        return self.exit_code == EXIT_TRANSIENT


class WorkspaceBusy(RuntimeError):
    pass


def transient_failure(task, task_run, state) -> bool:
    """Prefect's retry condition: retry a stage only when its cause may pass by itself."""
    return isinstance(state.data, StageFailed) and state.data.transient


def stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if flow_run.id:
        env[PREFECT_FLOW_RUN_ENV] = str(flow_run.id)
    return env


# ---- following a stage's output ---------------------------------------------------------------


class TrainingProgress:
    """A Prefect progress artifact fed by train's output: epoch n/N, losses, accuracy, ETA."""

    def __init__(self, dataset: str) -> None:
        self.key = f"training-{dataset}"
        self.artifact_id = None
        self.summary = "starting"
        self.updated = 0.0

    def feed(self, line: str) -> None:
        if (epoch := progress.parse_epoch(line)) is not None:
            validation = "" if math.isnan(epoch.val_accuracy) else f" · val accuracy {epoch.val_accuracy:.4f}"
            self.summary = (
                f"epoch {epoch.epoch}/{epoch.epochs} · loss {epoch.loss:.4f} · accuracy {epoch.accuracy:.4f}"
                f"{validation} · {epoch.seconds:.0f} s/epoch · ETA {_minutes(epoch.eta_s)}"
            )
            self.publish(100 * epoch.fraction, force=True)
        elif (bar := TRAINING_BAR.match(line)) is not None:
            done = int(bar["epoch"]) - 1 + int(bar["percent"]) / 100
            self.publish(100 * done / int(bar["epochs"]), detail=f"epoch {bar['epoch']}: {bar['percent']}%")

    def publish(self, percent: float, detail: str = "", force: bool = False) -> None:
        if not force and time.monotonic() - self.updated < PROGRESS_UPDATE_S:
            return
        self.updated = time.monotonic()
        description = f"Training: {self.summary}" + (f" · now {detail}" if detail else "")
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(percent, key=self.key, description=description)
        else:
            update_progress_artifact(self.artifact_id, percent, description=description)


def _minutes(seconds: float) -> str:
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


class StageLog:
    """One stage's lines into its task's log at their level; keeps its error line and skip note."""

    def __init__(self, stage: str, dataset: str) -> None:
        self.stage = stage
        self.logger = get_run_logger()
        self.error: list[str] = []
        self.dvc_error = ""  # DVC's own complaint (a lock, a missing file), when it is not a stage's
        self.last_line = ""
        self.exit_code: int | None = None
        self.skipped: str | None = None
        self.training = TrainingProgress(dataset) if stage == "train" else None

    def feed(self, line: str) -> None:
        self.logger.log(_level(line), line)
        if (failed := DVC_STAGE_FAILED.match(line)) is not None:
            self.exit_code = int(failed["code"])
        elif (error := STAGE_ERROR.match(line)) is not None:
            self.error = [error["message"]]
        elif self.error and self.exit_code is None:
            self.error.append(line.strip())  # a message of several lines: fetch lists each mirror
        elif (skipped := STAGE_SKIPPED.match(line)) is not None:
            self.skipped = "restored from DVC's cache" if "cached" in skipped["why"] else "up to date"
        if line.startswith("ERROR") and not failed and not self.dvc_error:
            self.dvc_error = line.removeprefix("ERROR:").strip()
        elif not line.startswith("ERROR"):
            self.last_line = line
        if self.training is not None:
            self.training.feed(line)

    def failure(self, returncode: int) -> StageFailed:
        code = self.exit_code if self.exit_code is not None else returncode
        detail = self.dvc_error or self.last_line.strip()
        message = " ".join(self.error) or f"exited with {code} ({detail[:300]})"
        return StageFailed(self.stage, message, code)


# DVC's `ERROR:`, a stage's `alexops <stage>: error:`, a library's log line (`<date> <time> ERROR`),
# a traceback; DVC's and libraries' warnings, and Python's (`file.py:148: UserWarning: ...`)
ERROR_LINE = re.compile(r"^(ERROR\b|alexops [\w-]+: error:|\S+ \S+ ERROR\b|Traceback \()")
WARNING_LINE = re.compile(r"^(WARNING\b|\S+ \S+ WARNING\b|\S+:\d+: \w*Warning: )")


def _level(line: str) -> int:
    if ERROR_LINE.match(line):
        return logging.ERROR
    return logging.WARNING if WARNING_LINE.match(line) else logging.INFO


@contextlib.contextmanager
def stopped_on_exit(dvc: DvcProcess, workspace: Path) -> Iterator[DvcProcess]:
    """If the flow is cancelled or crashes while dvc runs: stop dvc gracefully, clear leftovers."""
    try:
        yield dvc
    except BaseException:
        if dvc.returncode is None:
            with contextlib.suppress(Exception):  # logging may be gone with a crashing flow
                get_run_logger().warning("the flow run is ending: stopping dvc, Ctrl-C to its stage first")
            dvc.stop()
            remove_dead_experiment_copies(workspace)
        raise


def stage_state(stage: str, log: StageLog):
    """The task's final state: Completed('up to date') for a stage DVC skipped; its result is the
    stage's name when the stage ran, None when it did not."""
    return Completed(message=log.skipped, data=None) if log.skipped else Completed(data=stage)


def ran(state) -> str | None:
    """The stage a task's state says ran. (Calling a task that returns a State gives the State.)"""
    return state.result()


# ---- quick run: one task per stage ----------------------------------------------------------------


@task(
    task_run_name="{stage}",
    cache_policy=NO_CACHE,
    retries=len(RETRY_DELAYS_S),
    retry_delay_seconds=list(RETRY_DELAYS_S),
    retry_condition_fn=transient_failure,
)
def run_stage(stage: str, workspace: str, dataset: str):
    root = Path(workspace)
    with stopped_on_exit(DvcProcess(["repro", "--single-item", stage], root, stage_env()), root) as dvc:
        log = StageLog(stage, dataset)
        for line in dvc.lines():
            log.feed(line)
    if dvc.returncode:
        raise log.failure(dvc.returncode)
    return stage_state(stage, log)


# ---- custom run: one experiment, its output split into one task per stage --------------------------


class ExperimentOutput:
    """The lines of one `dvc exp run`, handed out stage by stage at DVC's stage markers."""

    def __init__(self, dvc: DvcProcess) -> None:
        self.dvc = dvc
        self.ended = False
        self._lines = dvc.lines()
        self._held: str | None = None

    def stage_lines(self, stage: str) -> Iterator[str]:
        """The lines up to the marker of a later stage (kept for that stage's task), or to the end;
        lines before any marker belong to the first stage."""
        seen_own = False
        while (line := self._next()) is not None:
            marker = STAGE_STARTS.match(line) or STAGE_SKIPPED.match(line)
            if (
                marker is not None
                and marker["stage"] != stage
                and (seen_own or _after(marker["stage"], stage))
            ):
                self._held = line
                return
            seen_own |= marker is not None
            yield line

    def rest(self) -> Iterator[str]:
        while (line := self._next()) is not None:
            yield line

    def _next(self) -> str | None:
        if self._held is not None:
            line, self._held = self._held, None
            return line
        line = next(self._lines, None)
        self.ended = line is None
        return line


def _after(stage: str, other: str) -> bool:
    order = {name: i for i, name in enumerate(STAGES)}
    return order.get(stage, len(order)) > order.get(other, len(order))


@task(task_run_name="{stage}", cache_policy=NO_CACHE)
def experiment_stage(stage: str, output: ExperimentOutput, dataset: str):
    log = StageLog(stage, dataset)
    for line in output.stage_lines(stage):
        log.feed(line)
    if log.exit_code is not None or (output.ended and output.dvc.returncode):
        raise log.failure(output.dvc.returncode or 1)
    return stage_state(stage, log)


def run_experiment(name: str, overrides: dict[str, Any], root: Path, dataset: str) -> tuple[str, list[str]]:
    """`dvc exp run --temp` with the overrides, retried with back-off when its failure may pass.
    Returns the experiment's name and the stages that ran (the others were up to date)."""
    flags = [flag for key, value in overrides.items() for flag in ("-S", f"{key}={json.dumps(value)}")]
    for attempt in range(1, EXPERIMENT_ATTEMPTS + 1):
        named = name if attempt == 1 else f"{name}-try{attempt}"
        dvc = DvcProcess(["exp", "run", "--temp", "--name", named, *flags], root, stage_env())
        try:
            with stopped_on_exit(dvc, root):
                output = ExperimentOutput(dvc)
                stages = [ran(experiment_stage(stage, output, dataset)) for stage in STAGES]
                for line in output.rest():  # DVC's closing words
                    get_run_logger().info(line)
            if dvc.returncode:
                raise StageFailed("experiment", f"dvc exp run exited with {dvc.returncode}", dvc.returncode)
            return named, [stage for stage in stages if stage]
        except StageFailed as failure:
            # a retry reruns the whole experiment: worth it only before anything was trained
            if (
                not (failure.transient and failure.stage in RETRIED_IN_EXPERIMENTS)
                or attempt == EXPERIMENT_ATTEMPTS
            ):
                raise
            delay = RETRY_DELAYS_S[attempt - 1]
            get_run_logger().warning("%s; may pass by itself: trying again in %d s", failure, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ---- the flow ---------------------------------------------------------------------------------------


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


def workspace_dataset(workspace: Path) -> str:
    return params_module.load(workspace / "params.yaml").base.dataset


def datasets_to_run(dataset: str, workspace: Path) -> list[str]:
    names = params_module.load(workspace / "params.yaml").datasets
    known = [*params_module.DATASETS, *names]
    if dataset == "all":
        return known
    if dataset in ("", WORKSPACE_DATASET):
        return [workspace_dataset(workspace)]
    if dataset not in known:
        raise AlexopsError(
            f"unknown dataset {dataset!r}. Fix: use one of {', '.join(known)} or 'all', or declare it "
            "under `datasets:` in params.yaml."
        )
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
    """`<dataset> · <overrides> · <run id>`: what ran, readable and distinct in the UI's list."""
    given = flow_run.parameters
    changes = all_overrides(given.get("epochs"), given.get("lr"), given.get("overrides"))
    dataset = given.get("dataset") or WORKSPACE_DATASET
    if dataset == WORKSPACE_DATASET:
        with contextlib.suppress(Exception):  # an unreadable params.yaml fails the run, not its name
            dataset = workspace_dataset(Path(given.get("workspace") or "."))
    return f"{dataset} · {describe_changes(changes)} · {str(flow_run.id or '')[:6]}"


def dvc_experiment_name(dataset: str, overrides: dict[str, Any]) -> str:
    """A git-ref-safe, unique name that says what the experiment changed."""
    changes = {k: v for k, v in overrides.items() if k != "base.dataset"}
    label = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{dataset} {describe_changes(changes)}").strip("-")
    return f"{label[:60]}-{str(flow_run.id or os.getpid())[:8]}"


@flow(name="alexops-pipeline", flow_run_name=run_name, log_prints=True)
def pipeline(
    workspace: str = ".",
    dataset: DatasetChoice = WORKSPACE_DATASET,
    epochs: int | None = None,
    lr: float | None = None,
    overrides: dict[str, Any] | None = None,
    lock_wait_s: float = 6 * 3600,
):
    """fetch → prepare → train → evaluate → export → quantize → register, as in dvc.yaml.

    dataset: params.yaml's, a dataset name, or "all". epochs, lr and overrides
    ({"train.batch_size": 64, ...}) apply to this run only, as a DVC experiment.
    """
    # MLflow's transfer bars are drawn for a terminal: in the flow's log (this process's and its
    # stages') a download's bar came out as the same bar three times on one line
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root = Path(workspace).resolve()
    changes = all_overrides(epochs, lr, overrides)
    summaries = []
    with workspace_lock(root, lock_wait_s):
        for leftover in remove_dead_experiment_copies(root):
            get_run_logger().info("removed %s, left by an experiment that was killed", leftover)
        home = workspace_dataset(root)
        for name in datasets_to_run(dataset, root):
            run_overrides = changes | ({} if name == home else {"base.dataset": name})
            params = checked_params(root, run_overrides)
            experiment, failure, stages_run = None, None, []
            try:
                if run_overrides:
                    named = dvc_experiment_name(name, run_overrides)
                    experiment, stages_run = run_experiment(named, run_overrides, root, name)
                else:
                    stages_run = [stage for stage in STAGES if ran(run_stage(stage, str(root), name))]
            except StageFailed as exc:
                failure = exc
            summaries.append(publish_summary(root, params, run_overrides, experiment, failure, stages_run))
            if failure is not None:
                return Failed(message=str(failure), data=failure)
    return summaries


# ---- the summary -----------------------------------------------------------------------------------


def publish_summary(
    root: Path, params: params_module.Params, overrides: dict[str, Any], experiment: str | None,
    failure: StageFailed | None, stages_run: list[str],
) -> dict:  # fmt: skip
    """The run's record as Prefect artifacts: a markdown summary and the confusion matrix."""
    from alexops import register, tracking

    dataset = params.base.dataset
    record = registration(root, dataset, experiment) if failure is None else None
    mlflow = tracking.connect(root)
    found = find_mlflow_run(mlflow, record, params)
    lines = [f"# {dataset}: {headline(register.model_name(params), record, failure)}", ""]
    if failure is None and not stages_run:
        lines += ["Every stage was up to date: this is the model an earlier run made.", ""]
    elif failure is None and "train" not in stages_run:
        stages = ", ".join(stages_run)
        lines += [f"This run did not train: {stages} ran for the model an earlier run trained.", ""]
    if found is not None:
        lines += [
            f"MLflow run: {run_link(root, found)}",
            "",
            *metric_rows(found),
            "",
            *param_rows(found, overrides),
        ]
    create_markdown_artifact("\n".join(lines), key=f"summary-{dataset}")
    classes = None if found is None else confusion_table(mlflow, found.info.run_id)
    if classes:
        create_table_artifact(
            classes, key=f"confusion-{dataset}", description="rows: actual; columns: predicted"
        )
    return {"dataset": dataset, "run_id": None if found is None else found.info.run_id,
            "version": (record or {}).get("version"), "alias": (record or {}).get("alias")}  # fmt: skip


def registration(root: Path, dataset: str, experiment: str | None) -> dict | None:
    """register.json of this run: the workspace's, or the one committed with the experiment."""
    relative = f"reports/{dataset}/register.json"
    if experiment is None:
        path = root / relative
        return json.loads(path.read_text()) if path.exists() else None
    refs = subprocess.run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"],
                          cwd=root, capture_output=True, text=True).stdout.split("\n")  # fmt: skip
    commit = next((ref.split()[0] for ref in refs if ref.endswith(f"/{experiment}")), None)
    if commit is None:
        return None
    shown = subprocess.run(["git", "show", f"{commit}:{relative}"], cwd=root, capture_output=True, text=True)
    return json.loads(shown.stdout) if shown.returncode == 0 else None


def find_mlflow_run(mlflow, record: dict | None, params: params_module.Params):
    """The run that made the registered model; else this flow run's (a failed pipeline)."""
    if record is not None:
        return mlflow.get_run(record["run_id"])
    runs = runs_of_this_flow_run(mlflow, params)
    if not runs:
        return None
    model = next((run for run in runs if "mlflow.parentRunId" not in run.data.tags), None)
    return model or mlflow.get_run(runs[0].data.tags["mlflow.parentRunId"])  # only nested runs: their model's


def runs_of_this_flow_run(mlflow, params: params_module.Params) -> list:
    """The MLflow runs this flow run recorded (its model's, and those nested under it), oldest first."""
    from alexops import tracking

    return mlflow.search_runs(
        experiment_names=[tracking.experiment_name(params)],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run.id}'",
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )


def headline(model: str, record: dict | None, failure: StageFailed | None) -> str:
    if failure is not None:
        return f"failed, not registered ({failure})"
    if record is None:
        return "not registered (the pipeline did not reach register)"
    alias = f"@{record['alias']}" if record.get("alias") else "no alias"
    return f"{model} version {record['version']} → {alias}\n\nDecision: {record['reason']}"


def run_link(root: Path, found) -> str:
    """A markdown link to the run in the MLflow UI (the tracking server's, or `make mlflow-ui`'s)."""
    uri = tracking_uri(root)
    served = uri.startswith("http")
    base = uri.rstrip("/") if served else "http://127.0.0.1:5000"
    link = f"[{found.info.run_id}]({base}/#/experiments/{found.info.experiment_id}/runs/{found.info.run_id})"
    return link if served else f"{link} (start `make mlflow-ui` first)"


def metric_rows(found) -> list[str]:
    metrics = {
        k: v for k, v in sorted(found.data.metrics.items()) if k.startswith(("test_accuracy", "test_loss"))
    }
    return ["| metric | value |", "| --- | --- |", *[f"| {k} | {v:.4f} |" for k, v in metrics.items()]]


def param_rows(found, overrides: dict[str, Any]) -> list[str]:
    rows = [
        f"| {k}{' (this run)' if k in overrides else ''} | {v} |"
        for k, v in sorted(found.data.params.items())
    ]
    return ["| param | value |", "| --- | --- |", *rows]


def confusion_table(mlflow, run_id: str) -> list[dict]:
    """Counts per (actual, predicted) from the run's evaluate/confusion.csv, in class order."""
    try:  # into a temporary folder, removed after the read
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/evaluate/confusion.csv")
    except Exception:  # evaluate did not get that far
        return []
    pairs = list(csv.DictReader(io.StringIO(text)))
    index = {p["actual"]: p.get("actual_index") for p in pairs}
    index |= {p["predicted"]: p.get("predicted_index") for p in pairs}
    # the dataset's order where the file has the classes' indices (since 2026-12-03), else first seen
    classes = sorted(index, key=lambda c: int(index[c])) if all(index.values()) else list(index)
    counts = {(a, b): 0 for a in classes for b in classes}
    for pair in pairs:
        counts[pair["actual"], pair["predicted"]] += 1
    return [{"actual": a, **{b: counts[a, b] for b in classes}} for a in classes]


# ---- command line -----------------------------------------------------------------------------------


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
    parser.add_argument(
        "--dataset", default=WORKSPACE_DATASET, help="a dataset name or 'all' (default: params.yaml's)"
    )
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a param for this run only, as a DVC experiment (repeatable)")  # fmt: skip
    args = parser.parse_args()
    # the temporary local server this starts sends Prefect no usage analytics, as the stack's does
    # not: offline, each attempt logged an ERROR line that was not the pipeline's
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    state = pipeline(
        workspace=args.workspace,
        dataset=args.dataset,
        overrides=parse_overrides(args.overrides),
        return_state=True,
    )
    if not state.is_completed():
        sys.exit(f"alexops flow: {state.message}")


if __name__ == "__main__":
    main()
