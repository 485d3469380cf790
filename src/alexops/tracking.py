"""Everything MLflow: one store per workspace, one run per pipeline run, and how runs end.

- **One store.** `MLFLOW_TRACKING_URI` when set, else `sqlite:///<workspace>/mlflow.db`. The
  workspace is `DVC_ROOT` when DVC runs the stage: in `dvc exp run --temp` and `--queue` the
  stage's working directory is a temporary copy under `.dvc/tmp/exps/`, which DVC deletes, and
  DVC_ROOT names the workspace the copy came from. A database store gets an explicit artifact
  root beside it (MLflow's default, `./mlruns`, would land in the copy), and an experiment whose
  artifact root lies in a temporary copy, or has vanished, is refused with the fix.
- **One run.** `train` opens it; `evaluate`, `export`, `quantize` and `register` (separate
  processes under `dvc repro`) continue it through `artifacts/<dataset>/mlflow_run.json`.
- **How runs end.** Each stage ends the run FINISHED, FAILED (with `failure.stage` and
  `failure.reason` tags) or KILLED (SIGINT, SIGTERM, SIGHUP: see `alexops.cli`). A run left
  RUNNING by a process that died without a word (kill -9, power loss) is marked KILLED the next
  time a stage of its experiment opens the store on the same host.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from alexops import files
from alexops.errors import AlexopsError
from alexops.params import Params
from alexops.paths import Paths

PREFECT_FLOW_RUN_ENV = "ALEXOPS_PREFECT_FLOW_RUN_ID"
# Set by DVC for every stage it runs: the workspace (in an experiment's copy, the one it came from).
DVC_ROOT_ENV = "DVC_ROOT"
SWEEPS_DIR = Path(".dvc") / "tmp" / "alexops-sweeps"  # exp name → its sweep (alexops.sweep writes)
LOCKS_DIR = Path(".dvc") / "tmp" / "alexops-locks"
# how long a finished training waits for a tracking store that is down (EpochMetrics.flush)
PATIENCE_ENV = "ALEXOPS_TRACKING_PATIENCE"
DEFAULT_PATIENCE_S = 180.0


# ---- where the store is ---------------------------------------------------------------------


def workspace(root: Path) -> Path:
    """The DVC workspace whose store a stage records into: DVC_ROOT when DVC runs the stage in
    that workspace or in a copy under its `.dvc/tmp/exps/`, else `root`. (A DVC_ROOT left in the
    environment by something else does not send a run to another workspace's store.)"""
    here = Path(root).resolve()
    named = os.environ.get(DVC_ROOT_ENV)
    if named:
        dvc_root = Path(named).resolve()
        if here == dvc_root or here.is_relative_to(dvc_root / ".dvc" / "tmp" / "exps"):
            return dvc_root
    return here


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else the SQLite store in the workspace. A relative local
    store (`sqlite:///mlflow.db`, `file:./mlruns`, `./mlruns`) is the workspace's, not the working
    directory's, which in an experiment is a temporary copy."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{workspace(root) / uri.removeprefix('sqlite:///')}"
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return (workspace(root) / uri.removeprefix("file:")).as_uri()
    if "://" not in uri and not uri.startswith("file:") and not Path(uri).is_absolute():
        return str(workspace(root) / uri)
    return uri


def _local_store(uri: str) -> bool:
    """A store on this machine's file system (SQLite or a directory), not a server or a database."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def artifact_root(uri: str, root: Path) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite file, in the workspace for
    another database, and wherever the server says (None) for an HTTP tracking server."""
    scheme = urlparse(uri).scheme
    if scheme.startswith("sqlite"):
        return (_sqlite_file(uri).parent / "mlruns").as_uri()
    if scheme.startswith(("postgresql", "mysql", "mssql")):
        return (workspace(root) / "mlruns").as_uri()
    return None


def _sqlite_file(uri: str) -> Path:
    return Path(uri.split(":///", 1)[1].split("?", 1)[0]).resolve()


def connect(root: Path):
    """The mlflow module, pointed at this project's tracking store."""
    # MLflow's HTTP client retries with back-off for minutes by default; a server that is
    # down should stop a stage within seconds (users can raise these in their environment)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    # Imported here: MLflow takes seconds to import and most commands never need it.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:"):
        # the first process to open a new SQLite store creates its tables; two parallel
        # experiments doing it at once collide, so they take turns
        database = _sqlite_file(uri)
        with file_lock(database.with_name(f".{database.name}.lock")):
            _reachable(mlflow, root)
    else:  # a server (or its database) that is down stops the stage here, before any work
        _reachable(mlflow, root)
    return mlflow


def _reachable(mlflow, root: Path) -> None:
    try:
        mlflow.search_experiments(max_results=1)
    except Exception as exc:  # connection refused, bad URI, locked DB: all stop here
        uri = tracking_uri(root)
        if why := server_diagnosis(uri):
            raise AlexopsError(f"cannot reach the MLflow tracking store: {why}", transient=True) from exc
        raise AlexopsError(
            f"cannot reach the MLflow tracking store {uri} ({exc.__class__.__name__}: "
            f"{one_line(exc)}). Fix: start the server (`make mlflow-server`) or "
            "point MLFLOW_TRACKING_URI at a running one; unset it to use ./mlflow.db.",
            transient=may_pass(exc),
        ) from exc


def may_pass(exc: BaseException) -> bool:
    """Whether a store's failure may pass by itself (no connection, a timeout, a 5xx, a locked
    database), rather than fail the same way again (a mistyped URI, a file that cannot be opened)."""
    names = {kind.__name__ for kind in type(exc).__mro__}
    if names & {"ConnectionError", "Timeout", "MaxRetryError", "RemoteDisconnected", "TimeoutError"}:
        return True
    status = getattr(exc, "get_http_status_code", lambda: None)()
    if isinstance(status, int) and status >= 500 and status != 501:
        return True
    # MLflow's REST client raises its MlflowException inside the `except` for the connection
    # error, without `from`: the cause is then the exception's context
    cause = exc.__cause__ or exc.__context__
    return "database is locked" in str(exc) or (cause is not None and may_pass(cause))


def experiment_name(params: Params) -> str:
    return f"{params.register.experiment}-{params.base.dataset}"


def use_experiment(mlflow, params: Params, root: Path) -> str:
    """The experiment's id, creating it with the store's artifact root; a broken root is refused."""
    from mlflow.exceptions import MlflowException

    name = experiment_name(params)
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        try:
            found = mlflow.get_experiment(
                mlflow.create_experiment(name, artifact_location=_new_location(root, name))
            )
        except MlflowException as exc:
            found = mlflow.get_experiment_by_name(name)  # a parallel stage created it first
            if found is None:
                raise AlexopsError(
                    f"cannot create the MLflow experiment {name!r} in {tracking_uri(root)}: "
                    f"{one_line(exc)}. Fix: check that the store is writable."
                ) from exc
    if _local_store(tracking_uri(root)):
        check_artifact_location(mlflow, found)
    # not mlflow.set_experiment: it exports MLFLOW_EXPERIMENT_ID to every later process and run
    return found.experiment_id


def _new_location(root: Path, name: str) -> str | None:
    base = artifact_root(tracking_uri(root), root)
    return None if base is None else f"{base}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"


def check_artifact_location(mlflow, experiment) -> None:
    """Refuse an experiment whose local artifact root lies in a DVC temporary copy or is gone."""
    parsed = urlparse(experiment.artifact_location)
    if parsed.scheme not in ("", "file"):
        return  # an object store or a tracking server's proxy: not ours to inspect
    location = Path(unquote(parsed.path))
    inside_copy = ".dvc/tmp/" in f"{location.as_posix()}/"
    vanished = (
        not inside_copy and not location.exists() and _has_finished_run(mlflow, experiment.experiment_id)
    )
    if inside_copy or vanished:
        why = (
            "inside a temporary DVC experiment copy, which DVC deletes (an older alexops created it inside "
            "`dvc exp run --temp/--queue`)"
            if inside_copy
            else "gone (moved or deleted, with the workspace or by hand)"
        )
        raise AlexopsError(
            f"MLflow experiment {experiment.name!r} (id {experiment.experiment_id}) keeps its artifacts in "
            f"{location}, which is {why}: models and plots logged there are lost. "
            "Fix: rename it out of the way, keeping its "
            f"runs readable: `mlflow experiments rename --experiment-id {experiment.experiment_id} "
            f"--new-name '{experiment.name}-lost-artifacts'` (with MLFLOW_TRACKING_URI set to this store), "
            "then rerun; the new experiment keeps its artifacts beside the store."
        )


def _has_finished_run(mlflow, experiment_id: str) -> bool:
    """A finished train has logged artifacts (its curves): then its artifact root must exist."""
    finished = "attributes.status = 'FINISHED'"
    return bool(mlflow.search_runs([experiment_id], finished, max_results=1, output_format="list"))


# ---- one run per pipeline run, and how it ends --------------------------------------------------


@contextlib.contextmanager
def new_run(params: Params, paths: Paths, run_id: str | None = None) -> Iterator[Any]:
    """Open the pipeline's MLflow run (or reopen `run_id` after a crash) and record it."""
    mlflow = connect(paths.root)
    experiment_id = use_experiment(mlflow, params, paths.root)
    close_dead_runs(mlflow, experiment_id)
    if run_id is not None and not _run_exists(mlflow, run_id):
        print(f"train: MLflow run {run_id} of the checkpoint is not in this store; opening a new run")
        run_id = None
    name = f"{params.base.dataset}-{params.train.image_size}px-w{params.train.width:g}-e{params.train.epochs}"
    where = {"run_id": run_id} if run_id else {"experiment_id": experiment_id, "run_name": name}
    with recorded_run(mlflow, "train", **where) as run:
        if run_id is None:
            with store_write(mlflow):
                mlflow.log_params(params.as_flat_dict())
                record_lineage(mlflow, paths)
                log_dataset(mlflow, paths)
        record = {"run_id": run.info.run_id, "tracking_uri": redacted(tracking_uri(paths.root))}
        files.write_json(paths.mlflow_run, record)
        yield mlflow


class EpochMetrics:
    """Each epoch's metrics on their way to the run, held back while the store does not take them.

    A training of minutes outlives a tracking server's restart: an epoch whose metrics the store
    does not take for a reason that may pass (`may_pass`: no connection, a timeout, a 5xx) is kept
    and sent, in order, with a later epoch's; each keeps its epoch as MLflow's `step` and the time
    it ended. The checkpoint is written before an epoch's metrics are sent, so a resumed run first
    sends those of its checkpoint's epochs that the store lacks: every epoch is in the run once."""

    KEY = "train_loss"  # logged for every epoch: which epochs the store holds

    def __init__(self, mlflow, history: list[dict], patience_s: float) -> None:
        self.mlflow = mlflow
        run_id = mlflow.active_run().info.run_id
        held = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, self.KEY)}
        now = int(time.time() * 1000)
        self.unsent = [(row, now) for row in history if row["epoch"] not in held]
        self.late = bool(self.unsent)  # a resumed run's epochs that the store lacks
        self.why = ""
        self.patience_s = patience_s
        self.send()

    def add(self, row: dict) -> None:
        """Send epoch `row` (and any held back before it); on a passing failure, say so and go on."""
        self.unsent.append((row, int(time.time() * 1000)))
        if not self.send():
            print(
                f"train: the metrics of {self.epochs()} are held back: the MLflow tracking store "
                f"does not take them ({self.why}); training goes on, and they are sent after the next epoch",
                flush=True,
            )

    def send(self) -> bool:
        """Send the held-back epochs in order; False if the store did not take them all."""
        sending = self.epochs() if self.unsent else ""
        while self.unsent:
            row, ended = self.unsent[0]
            metrics = {k: v for k, v in row.items() if k != "epoch" and not math.isnan(v)}
            try:
                with store_write(self.mlflow):
                    self.mlflow.log_metrics(metrics, step=row["epoch"], timestamp=ended)
            except Exception as exc:
                if not may_pass(exc):
                    raise
                self.late, self.why = True, root_cause(exc)
                return False
            self.unsent.pop(0)
        if self.late:
            print(f"train: the MLflow tracking store took the held-back metrics of {sending}", flush=True)
            self.late = False
        return True

    def flush(self, checkpoint: Path) -> None:
        """Send every held-back epoch, waiting up to `self.patience_s` seconds for the store.

        Raises AlexopsError (transient) if it does not answer by then; the checkpoint stays, so a
        rerun resumes without training and sends them."""
        deadline = time.monotonic() + self.patience_s
        delay = 1.0
        while not self.send():
            if time.monotonic() + delay > deadline:
                raise AlexopsError(
                    f"training finished, but the MLflow tracking store did not take the metrics of "
                    f"{self.epochs()} within {self.patience_s:.0f} s ({self.why}). The trained weights are "
                    f"kept in {checkpoint}. Fix: start the tracking server (the team stack: `make "
                    f"stack`), then rerun: train resumes there without training again and sends them "
                    f"(or wait longer: {PATIENCE_ENV}, in seconds).",
                    transient=True,
                )
            if delay == 1.0:
                print(f"train: waiting up to {self.patience_s:.0f} s for the MLflow tracking store to take "
                      f"the metrics of {self.epochs()}", flush=True)  # fmt: skip
            time.sleep(delay)
            delay = min(2 * delay, 15.0)

    def epochs(self) -> str:
        held = [row["epoch"] for row, _ in self.unsent]
        return f"epoch {held[0]}" if len(held) == 1 else f"epochs {held[0]}-{held[-1]}"


def root_cause(exc: BaseException) -> str:
    """The first failure under an exception's chain, in a few words: `[Errno 111] Connection
    refused` rather than MLflow's wrapping of urllib3's wrapping of it."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return one_line(exc) or exc.__class__.__name__


def patience_s() -> float:
    """How long a finished training waits for the tracking store to take held-back metrics."""
    value = os.environ.get(PATIENCE_ENV, "").strip()
    try:
        seconds = float(value) if value else DEFAULT_PATIENCE_S
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:  # NaN too
        raise AlexopsError(
            f"{PATIENCE_ENV} must be a number of seconds ≥ 0, not {value!r}. Fix: e.g. {PATIENCE_ENV}=300."
        )
    return seconds


def model_run_id(paths: Paths) -> str:
    """The run train opened for the model in `artifacts/<dataset>/`."""
    return files.read_json(paths.mlflow_run, produced_by="train")["run_id"]


@contextlib.contextmanager
def continue_run(params: Params, paths: Paths, stage: str) -> Iterator[Any]:
    """Report a later stage into the run of the model it works on, the one train opened.

    When this stage's params differ from those that run logged (an experiment that changes only
    `export.*`, say), the stage reports into a run nested under it instead, named after what
    changed: the model's run goes on describing the pipeline that made it."""
    run_id = model_run_id(paths)
    mlflow = connect(paths.root)
    if not _run_exists(mlflow, run_id):
        raise AlexopsError(
            f"MLflow run {run_id} (from {paths.mlflow_run}) is not in {tracking_uri(paths.root)}. "
            "Fix: point MLFLOW_TRACKING_URI at the store train used, or retrain: `dvc repro -f train`."
        )
    model_run = mlflow.get_run(run_id)
    close_dead_runs(mlflow, model_run.info.experiment_id)
    changed = changed_params(params, model_run.data.params, stage)
    if not changed:
        with recorded_run(mlflow, stage, run_id=run_id):
            yield mlflow
        return
    name = f"{stage}: " + ", ".join(f"{key}={value}" for key, value in changed.items())
    experiment_id, nested = model_run.info.experiment_id, {"mlflow.parentRunId": run_id}
    with recorded_run(mlflow, stage, experiment_id=experiment_id, run_name=name[:250], tags=nested):
        with store_write(mlflow):
            mlflow.log_params({k: v for k, v in params.as_flat_dict().items() if k.startswith(f"{stage}.")})
            mlflow.set_tags(lineage_tags(paths.root))
        yield mlflow


def changed_params(params: Params, logged: dict[str, str], stage: str) -> dict[str, Any]:
    """The stage's own params (`<stage>.*`) whose values differ from those a run logged."""
    return {
        key: value
        for key, value in params.as_flat_dict().items()
        if key.startswith(f"{stage}.") and key in logged and str(value) != logged[key]
    }


def redacted(uri: str) -> str:
    """The URI without a user name or password: what may be written to a file DVC pushes."""
    parsed = urlparse(uri)
    if not (parsed.username or parsed.password):
        return uri
    return parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[1]).geturl()


@contextlib.contextmanager
def recorded_run(mlflow, stage: str, *, tags: dict[str, str] | None = None, **start: Any) -> Iterator[Any]:
    """Start (or resume) a run and end it as the stage ends: FINISHED, FAILED with the reason,
    or KILLED (SIGINT, and SIGTERM/SIGHUP as alexops.cli raises them).

    The run is started with its owner's tags while the graceful signals are held back, so no
    run exists without them: a signal that came meanwhile is raised once the run is guarded,
    and a run whose process died anyway can be told from a live one (close_dead_runs)."""
    held = HeldSignals()
    try:
        run = mlflow.start_run(tags=owner_tags(stage) | (tags or {}), **start)
    except BaseException:
        held.release()
        raise
    try:
        held.release()
        yield run
    except KeyboardInterrupt as exc:
        _end(mlflow, "KILLED", stage, f"stopped by {exc or 'SIGINT'}")
        raise
    except BaseException as exc:
        _end(mlflow, "FAILED", stage, one_line(exc) or exc.__class__.__name__)
        # an MLflow call failed mid-stage: on a tracking server, name the part that is down
        unexplained = isinstance(exc, Exception) and not isinstance(exc, AlexopsError)
        if unexplained and (why := server_diagnosis(mlflow.get_tracking_uri())):
            raise AlexopsError(f"lost the MLflow tracking store: {why}", transient=True) from exc
        raise
    _end(mlflow, "FINISHED", stage, None)


class HeldSignals:
    """The graceful stops (SIGINT, SIGTERM, SIGHUP) held back from creation until `release`, which
    raises the first that came meanwhile through its own handler (in the main thread; elsewhere
    nothing is held). The stages' writes to a SQLite store are made under it (`store_write`):
    one interrupted midway leaves its SQLite transaction open, and the stage can then not end its
    run KILLED ("database is locked"). A signal mask would not hold them: the kernel hands a
    process-directed signal to another thread, and Python runs the handler in the main thread
    all the same."""

    def __init__(self) -> None:
        self.caught: list[int] = []
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self.previous[number] = signal.signal(number, lambda caught, _: self.caught.append(caught))

    def release(self) -> None:
        previous, self.previous = self.previous, {}
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        if self.caught:
            signal.raise_signal(self.caught[0])


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    held = HeldSignals()
    try:
        yield
    finally:
        held.release()


def store_write(mlflow) -> contextlib.AbstractContextManager:
    """Where a stage writes to the run: on a SQLite store the graceful stops are held until the
    writes end, since one cut short leaves SQLite's transaction open and the run cannot then be
    ended KILLED. Not on a server, whose request may hang for a minute: Ctrl-C should not wait."""
    return signals_held() if mlflow.get_tracking_uri().startswith("sqlite:") else contextlib.nullcontext()


def owner_tags(stage: str) -> dict[str, str]:
    """Which process holds the run: a later stage can tell a dead holder's run from a live one."""
    return {
        "alexops.host": socket.gethostname(),
        "alexops.owner": machine_identity(),
        "alexops.pid": str(os.getpid()),
        "alexops.stage": stage,
    }


def machine_identity() -> str:
    """Host name, boot and pid namespace: the scope within which a pid names one process
    (containers can share a host name but not their pids; a reboot reuses pids)."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):  # fmt: skip
        try:
            parts.append(read())
        except OSError:
            parts.append("-")
    return "|".join(parts)


def _end(mlflow, status: str, stage: str, reason: str | None) -> None:
    """End the active run with `status`; a stop that comes meanwhile (a second Ctrl-C, say) waits
    on a SQLite store until the run is ended, and is raised then (`store_write`)."""
    with store_write(mlflow):
        try:
            if reason is not None:
                mlflow.set_tags({"failure.stage": stage, "failure.reason": reason[:5000]})
            else:  # a stage that finished clears what an earlier, failed attempt left
                for key in ("failure.stage", "failure.reason"):
                    with contextlib.suppress(Exception):
                        mlflow.MlflowClient().delete_tag(mlflow.active_run().info.run_id, key)
            mlflow.end_run(status)
        except Exception as exc:  # the store went away too: say so, keep the stage's own error
            print(f"alexops {stage}: could not mark the MLflow run {status} ({one_line(exc)})")


def close_dead_runs(mlflow, experiment_id: str) -> list[str]:
    """Mark KILLED the runs of this machine left RUNNING by a process that no longer exists."""
    client = mlflow.MlflowClient()
    closed = []
    here = machine_identity()
    for run in mlflow.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", output_format="list"
    ):
        tags = run.data.tags
        if tags.get("alexops.owner") != here or _alive(tags.get("alexops.pid", "")):
            continue
        client.set_tag(run.info.run_id, "failure.stage", tags.get("alexops.stage", "unknown"))
        reason = f"process {tags.get('alexops.pid')} ended without closing the run (killed -9, or crashed)"
        client.set_tag(run.info.run_id, "failure.reason", reason)
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed


def _alive(pid: str) -> bool:
    """Is `pid` an alexops process? (A recycled pid of another program does not count.)"""
    if not pid.isdigit():
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(int(pid), 0)  # no /proc (macOS): existence is all we can tell
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return b"alexops" in cmdline


def _run_exists(mlflow, run_id: str) -> bool:
    try:
        mlflow.get_run(run_id)
    except Exception:  # MlflowException for an unknown id
        return False
    return True


def one_line(exc: BaseException) -> str:
    """An exception's first line, shortened: what a tag, a log line or a state message shows."""
    return (str(exc).strip().splitlines() or [""])[0][:500]


# ---- lineage ------------------------------------------------------------------------------------


def log_dataset(mlflow, paths: Paths) -> None:
    """The prepared data as the run's input: its path and the hash `dvc.lock` gives it."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    digest = data_hash(paths) or files.sha256_file(paths.prepared / "train.pt")[:32]
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path it is
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(paths.prepared))
    mlflow.log_input(MetaDataset(source, name=paths.dataset, digest=digest), context="training")
    # its classes (folder names for a declared dataset, in label order) and what prepare found
    classes = files.read_json(paths.prepared / "stats.json", produced_by="prepare")["classes"]
    listed = json.dumps(classes, ensure_ascii=False)  # the whole list: dataset/prepare.json
    mlflow.set_tags(
        {
            "dataset.classes": listed if len(listed) <= 5000 else f"{listed[:4990]} …",
            "dataset.num_classes": str(len(classes)),
        }
    )
    if paths.prepare_report.exists():
        mlflow.log_artifact(str(paths.prepare_report), artifact_path="dataset")


def data_hash(paths: Paths) -> str | None:
    """The content hash `dvc.lock` records for the prepared data, when DVC ran prepare."""
    relative = paths.prepared.relative_to(paths.root).as_posix()
    return dvc_lock_tags(paths.root).get(f"dvc.prepare.{relative}")


# Files every run rewrites (dvc.lock and the stages' reports, which git tracks): a change to
# them says that the pipeline ran, not that the code or params differ from the commit.
PIPELINE_WRITES = (":(exclude)dvc.lock", ":(exclude)reports")


def record_lineage(mlflow, paths: Paths) -> None:
    """Tags naming the code and its origin; when the tree differs from the commit, the diff."""
    tags = lineage_tags(paths.root)
    mlflow.set_tags(tags)
    if tags["git.dirty"] == "true":
        diff = _git(paths.root, "diff", "HEAD", "--", ":/", *PIPELINE_WRITES)
        if diff:
            mlflow.log_text(diff + "\n", "lineage/code.diff")


def lineage_tags(root: Path) -> dict[str, str]:
    """Git commit and dirtiness of the code that runs, the package's digest, who ran it."""
    tags = {"git.commit": _git(root, "rev-parse", "HEAD") or "unknown", "code.sha256": code_digest()}
    # DVC writes an experiment's copy with git's index stat data of the originals, so a file
    # changed within the same second and size looks clean: re-read every file first
    _git(root, "update-index", "-q", "--really-refresh")
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ":/", *PIPELINE_WRITES)
    tags["git.dirty"] = "unknown" if status is None else str(bool(status)).lower()
    experiment = {"DVC_EXP_NAME": "dvc.experiment", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}
    tags |= {tag: os.environ[env] for env, tag in experiment.items() if os.environ.get(env)}
    if flow_run := os.environ.get(PREFECT_FLOW_RUN_ENV):
        tags["prefect.flow_run_id"] = flow_run
    return tags | sweep_tags(root)


def code_digest() -> str:
    """SHA-256 over the alexops package's source files as imported by this process: equal
    digests, equal code (the files of `src/alexops` that ran, whatever their checkout)."""
    import alexops

    package = Path(alexops.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def sweep_tags(root: Path) -> dict[str, str]:
    """A queued experiment of `alexops sweep`: its sweep's name and parent MLflow run."""
    name = os.environ.get("DVC_EXP_NAME")
    if not name:
        return {}
    record = workspace(root) / SWEEPS_DIR / f"{name}.yaml"
    if not record.exists():
        return {}
    sweep = yaml.safe_load(record.read_text()) or {}
    return {"sweep": str(sweep["sweep"]), "mlflow.parentRunId": str(sweep["parent_run_id"])}


def dvc_lock_tags(root: Path) -> dict[str, str]:
    """`dvc.<stage>.<out>` → content hash, for every output dvc.lock records so far."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {
        f"dvc.{stage}.{out['path']}": out.get("md5") or out.get("hash", "")
        for stage, entry in stages.items()
        for out in entry.get("outs", [])
    }


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# ---- serialising what must not interleave ---------------------------------------------------------


@contextlib.contextmanager
def file_lock(path: Path, wait_s: float = 600.0) -> Iterator[None]:
    """An exclusive flock on `path`; the OS drops it when the process dies, so none goes stale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise AlexopsError(
                        f"waited {wait_s:g} s for {path}, which another alexops process holds. "
                        "Fix: let it finish, or stop it if it hangs."
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def registry_lock(root: Path, model_name: str):
    """Serialises the registry decision of parallel stages of one workspace (`dvc queue start
    -j N`, parallel flow runs); across machines, the decision re-checks itself (register)."""
    return file_lock(locks_dir(root) / f"register-{model_name}.lock")


def locks_dir(root: Path) -> Path:
    """`.dvc/tmp/alexops-locks` in a DVC workspace; elsewhere (a plain directory, as in a test) a
    directory of the system's temporary files named after the workspace."""
    home = workspace(root)
    if (home / ".dvc").is_dir():
        return home / LOCKS_DIR
    return Path(tempfile.gettempdir()) / "alexops-locks" / hashlib.sha256(str(home).encode()).hexdigest()[:16]


# ---- a tracking server's parts: which one is down ---------------------------------------------


def server_diagnosis(uri: str) -> str | None:
    """For an HTTP tracking server: the part that is down and the fix, or None (not a server, or
    every part answers). Three one-shot probes, no retries: the server itself (`/health`), its
    backend store (an experiment search, which the server answers from its database) and, when it
    proxies artifacts (`--artifacts-destination`), its artifact store (a listing through the proxy).
    """
    if not uri.startswith(("http://", "https://")):
        return None
    base = uri.rstrip("/")
    status, detail = _probe(f"{base}/health")
    if status is None or status >= 500:
        return (
            f"the MLflow server {uri} does not answer ({detail}). Fix: start it (the team stack: "
            "`make stack`) or point MLFLOW_TRACKING_URI at a running one."
        )
    status, detail = _probe(f"{base}/api/2.0/mlflow/experiments/search?max_results=1")
    if status is not None and status >= 500:
        database = "PostgreSQL" if re.search("psycopg|postgres", detail, re.I) else "its database"
        return (
            f"the MLflow server {uri} is up, but its backend store ({database}) is not: {detail}. "
            "Fix: start the database (the team stack: `make stack`), then rerun the stage."
        )
    if status is None and "timed out" in detail:  # /health answered, a query did not: a server
        # worker that first meets its database while it is down retries connecting for ~100 s
        return (
            f"the MLflow server {uri} is up, but its backend store does not answer a query ({detail}). "
            "Fix: start the database (the team stack: `make stack`), then rerun the stage."
        )
    status, detail = _probe(f"{base}/api/2.0/mlflow-artifacts/artifacts?path=")
    if status is not None and status >= 500:
        return (
            f"the MLflow server {uri} is up, but cannot reach its artifact store, the object store "
            f"behind its --artifacts-destination (S3; listing it failed: HTTP {status}). Fix: start "
            "the object store (the team stack: `make stack`) or correct the server's endpoint and "
            "credentials, then rerun the stage."
        )
    return None


PROBE_TIMEOUT_S = 30.0


def _probe(url: str) -> tuple[int | None, str]:
    """(HTTP status, the server's message or the connection error); status None: no answer
    within PROBE_TIMEOUT_S."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:
            return response.status, "ok"
    except urllib.error.HTTPError as error:
        body = error.read().decode("utf-8", "replace")
        try:
            message = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            message = ""
        return error.code, (message.strip().splitlines() or [f"HTTP {error.code}"])[0][:300]
    except (OSError, urllib.error.URLError) as error:
        return None, str(getattr(error, "reason", error))[:300]
