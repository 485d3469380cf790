"""The Prefect flow: same stages as dvc.yaml, and a real run on a Prefect test server."""

import json

import yaml
from conftest import REPO
from prefect.testing.utilities import prefect_test_harness

from alexops.cli import STAGES as CLI_STAGES
from pipeline import flows


def test_flow_stages_equal_dvc_yaml():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(flows.STAGES) == list(dvc)
    assert {name: spec["cmd"] for name, spec in dvc.items()} == {s: f"alexops {s}" for s in flows.STAGES}
    assert tuple(CLI_STAGES) == flows.STAGES


def test_flow_runs_the_pipeline_on_a_prefect_server(workspace, ws_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ws_env["MLFLOW_TRACKING_URI"])
    with prefect_test_harness(server_startup_timeout=120):
        state = flows.pipeline(workspace=str(workspace), return_state=True)
        assert state.is_completed(), state
    record = json.loads((workspace / "reports" / "fashion-mnist" / "register.json").read_text())
    assert record["alias"] == "champion"

    import mlflow

    mlflow.set_tracking_uri(ws_env["MLFLOW_TRACKING_URI"])
    tags = mlflow.MlflowClient().get_run(record["run_id"]).data.tags
    assert tags.get("prefect.flow_run_id")  # the MLflow run points back at the flow run
