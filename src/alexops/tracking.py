"""Everything MLflow: one run per pipeline run, opened by train and continued by the
stages after it (separate processes under `dvc repro`) through the run id in
`artifacts/<dataset>/mlflow_run.json`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from alexops import files
from alexops.errors import AlexopsError
from alexops.params import Params
from alexops.paths import Paths

PREFECT_FLOW_RUN_ENV = "ALEXOPS_PREFECT_FLOW_RUN_ID"


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else the SQLite store in the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve()}/mlflow.db"


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

    mlflow.set_tracking_uri(tracking_uri(root))
    return mlflow


def _reachable(mlflow, root: Path) -> None:
    try:
        mlflow.search_experiments(max_results=1)
    except Exception as exc:  # connection refused, bad URI, locked DB: all stop here
        raise AlexopsError(
            f"cannot reach the MLflow tracking store {tracking_uri(root)} ({exc.__class__.__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:200]}). Fix: start the server (`make mlflow-server`) or "
            "point MLFLOW_TRACKING_URI at a running one; unset it to use ./mlflow.db."
        ) from exc


@contextlib.contextmanager
def new_run(params: Params, paths: Paths, run_id: str | None = None) -> Iterator[Any]:
    """Open the pipeline's MLflow run (or reopen `run_id` after a crash) and record it."""
    mlflow = connect(paths.root)
    _reachable(mlflow, paths.root)
    mlflow.set_experiment(f"{params.register.experiment}-{params.base.dataset}")
    if run_id is not None and not _run_exists(mlflow, run_id):
        print(f"train: MLflow run {run_id} of the checkpoint is not in this store; opening a new run")
        run_id = None
    name = f"{params.base.dataset}-{params.train.image_size}px-w{params.train.width:g}-e{params.train.epochs}"
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else name) as run:
        if run_id is None:
            mlflow.log_params(params.as_flat_dict())
            mlflow.set_tags(lineage_tags(paths.root))
            log_dataset(mlflow, paths)
        files.write_json(
            paths.mlflow_run, {"run_id": run.info.run_id, "tracking_uri": tracking_uri(paths.root)}
        )
        yield mlflow


@contextlib.contextmanager
def continue_run(paths: Paths) -> Iterator[Any]:
    """Reopen the run train started, so that all stages report into one run."""
    run_id = files.read_json(paths.mlflow_run, produced_by="train")["run_id"]
    mlflow = connect(paths.root)
    _reachable(mlflow, paths.root)
    if not _run_exists(mlflow, run_id):
        raise AlexopsError(
            f"MLflow run {run_id} (from {paths.mlflow_run}) is not in {tracking_uri(paths.root)}. "
            "Fix: point MLFLOW_TRACKING_URI at the store train used, or retrain: `dvc repro -f train`."
        )
    with mlflow.start_run(run_id=run_id):
        yield mlflow


def _run_exists(mlflow, run_id: str) -> bool:
    try:
        mlflow.get_run(run_id)
    except Exception:  # MlflowException for an unknown id
        return False
    return True


def log_dataset(mlflow, paths: Paths) -> None:
    """The prepared data as the run's input: its path and the hash `dvc.lock` gives it."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    digest = data_hash(paths) or files.sha256_file(paths.prepared / "train.pt")[:32]
    dataset = MetaDataset(resolve_dataset_source(str(paths.prepared)), name=paths.dataset, digest=digest)
    mlflow.log_input(dataset, context="training")


def data_hash(paths: Paths) -> str | None:
    """The content hash `dvc.lock` records for the prepared data, when DVC ran prepare."""
    relative = paths.prepared.relative_to(paths.root).as_posix()
    return dvc_lock_tags(paths.root).get(f"dvc.prepare.{relative}")


# Files every run rewrites (dvc.lock and the stages' reports, which git tracks): a change to
# them says that the pipeline ran, not that the code or params differ from the commit.
PIPELINE_WRITES = (":(exclude)dvc.lock", ":(exclude)reports")


def lineage_tags(root: Path) -> dict[str, str]:
    """Git commit and dirtiness, the Prefect flow run when there is one."""
    tags = {"git.commit": _git(root, "rev-parse", "HEAD") or "unknown"}
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ":/", *PIPELINE_WRITES)
    tags["git.dirty"] = "unknown" if status is None else str(bool(status)).lower()
    if flow_run := os.environ.get(PREFECT_FLOW_RUN_ENV):
        tags["prefect.flow_run_id"] = flow_run
    return tags


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
