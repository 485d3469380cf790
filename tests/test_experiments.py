"""Every way DVC runs the pipeline records into the workspace's one store, with the code that ran.

One workspace with no MLFLOW_TRACKING_URI (the user's default, `./mlflow.db`), driven by the real
`dvc`: `dvc repro`, a queued experiment whose code differs from the workspace's, a sweep of two
points on two parallel queue workers (`alexops sweep`), and `dvc exp run --temp`.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import mlflow
import numpy as np
from conftest import VENV_BIN, run
from PIL import Image

MARKER = "register: running the queued experiment's own code"


def workspace_env_without_tracking_uri(ws_env: dict) -> dict:
    return {k: v for k, v in ws_env.items() if k != "MLFLOW_TRACKING_URI"}


def package_digest(src: Path) -> str:
    """What tracking.code_digest computes, for a checkout's src/alexops."""
    package = src / "alexops"
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_every_way_dvc_runs_records_into_the_workspace_store_with_the_code_that_ran(workspace, ws_env):
    env = workspace_env_without_tracking_uri(ws_env)
    dvc = f"{VENV_BIN}/dvc"
    run([dvc, "repro"], workspace, env)

    # a queued experiment with edited code; the workspace goes back to the committed code
    register_py = workspace / "src" / "alexops" / "register.py"
    committed = register_py.read_text()
    register_py.write_text(committed + f'\nprint("{MARKER}")\n')
    edited_digest = package_digest(workspace / "src")
    run([dvc, "exp", "run", "--queue", "--name", "edited", "-S", "train.epochs=1"], workspace, env)
    register_py.write_text(committed)

    # a sweep of two points, run with the queued one on two workers; then a --temp experiment
    sweep = run([f"{VENV_BIN}/alexops", "sweep", "--name", "lrs", "-j", "2",
                 "-S", "train.lr=0.01,0.04", "-S", "train.epochs=1"], workspace, env)  # fmt: skip
    assert "lrs-1: success" in sweep.stdout and "lrs-2: success" in sweep.stdout, sweep.stdout
    run([dvc, "exp", "run", "--temp", "-S", "train.epochs=1", "-S", "train.lr=0.03"], workspace, env)

    # nothing landed outside the workspace's store
    assert not [p for p in (workspace / ".dvc").rglob("*") if p.name in ("mlflow.db", "mlruns")]
    mlflow.set_tracking_uri(f"sqlite:///{workspace}/mlflow.db")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("alexops-fashion-mnist")
    assert experiment.artifact_location.startswith((workspace / "mlruns").as_uri())
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "sweep.grid" in r.data.tags)
    by_experiment = {r.data.tags.get("dvc.experiment", "workspace"): r for r in runs if r is not parent}
    assert {"workspace", "edited", "lrs-1", "lrs-2"} <= by_experiment.keys() and len(by_experiment) == 5
    for name, logged in by_experiment.items():
        assert logged.info.status == "FINISHED" and logged.info.end_time, name
        assert "test_accuracy" in logged.data.metrics and "registered_version" in logged.data.tags, name

    # the queued experiment ran the code it was queued with, and its run says so
    edited = by_experiment["edited"]
    assert edited.data.tags["code.sha256"] == edited_digest != by_experiment["lrs-1"].data.tags["code.sha256"]
    assert edited.data.tags["git.dirty"] == "true"
    diff = Path(
        mlflow.artifacts.download_artifacts(run_id=edited.info.run_id, artifact_path="lineage/code.diff")
    )
    assert MARKER in diff.read_text()
    assert MARKER in run([dvc, "queue", "logs", "edited"], workspace, env).stdout
    assert by_experiment["workspace"].data.tags["git.dirty"] == "false"

    # the sweep: both points nested under one parent run, which names the best
    for point in ("lrs-1", "lrs-2"):
        tags = by_experiment[point].data.tags
        assert tags["sweep"] == "lrs" and tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.status == "FINISHED" and "best_test_accuracy" in parent.data.metrics

    # @champion is the most accurate version that passed the gate, and it serves
    versions = client.search_model_versions("name='alexnet-fashion-mnist'")
    champion = client.get_model_version_by_alias("alexnet-fashion-mnist", "champion")
    assert float(champion.tags["accuracy"]) == max(float(v.tags["accuracy"]) for v in versions)
    image = io.BytesIO()
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(image, format="PNG")
    (workspace / "probe.png").write_bytes(image.getvalue())
    predicted = run([f"{VENV_BIN}/alexops", "predict", "probe.png"], workspace, env)
    assert json.loads(predicted.stdout)["model"]["version"] == str(champion.version)
