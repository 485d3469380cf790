"""The Prefect flow and deployment, on a real Prefect test server."""

import fcntl
import json
import shutil
import subprocess
import time

import yaml
from conftest import REPO, VENV_BIN, run
from prefect.testing.utilities import prefect_test_harness

from alexops.cli import STAGES as CLI_STAGES
from pipeline import flows


def test_flow_stages_equal_dvc_yaml():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(flows.STAGES) == list(dvc)
    assert {name: spec["cmd"] for name, spec in dvc.items()} == {s: f"alexops {s}" for s in flows.STAGES}
    assert tuple(CLI_STAGES) == flows.STAGES


def artifacts_of(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in found}


def mlflow_client(env: dict):
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.MlflowClient()


def test_flow_runs_the_pipeline_in_the_workspace_with_artifacts(workspace, ws_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ws_env["MLFLOW_TRACKING_URI"])
    with prefect_test_harness(server_startup_timeout=120):
        state = flows.pipeline(workspace=str(workspace), return_state=True)
        assert state.is_completed(), state
        flow_run_id = state.state_details.flow_run_id
        artifacts = artifacts_of(flow_run_id)
    record = json.loads((workspace / "reports" / "fashion-mnist" / "register.json").read_text())
    assert record["alias"] == "champion"
    summary = artifacts["summary-fashion-mnist"].data
    assert f"alexnet-fashion-mnist version {record['version']} → @champion" in summary
    assert record["run_id"] in summary and "test_accuracy" in summary
    table = artifacts["confusion-fashion-mnist"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert sum(v for row in rows for k, v in row.items() if k != "actual") == 80  # every test image

    tags = mlflow_client(ws_env).get_run(record["run_id"]).data.tags
    assert tags["prefect.flow_run_id"] == str(flow_run_id)  # the MLflow run points back at the flow run


def test_a_second_flow_run_waits_for_the_workspace_then_stops_clearly(workspace, ws_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ws_env["MLFLOW_TRACKING_URI"])
    lock = workspace / flows.LOCK_FILE
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as held, prefect_test_harness(server_startup_timeout=120):
        held.write("the first run (pid 1)\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running flow holds it
        state = flows.pipeline(workspace=str(workspace), lock_wait_s=1, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "another flow run (the first run (pid 1))" in message and "lock_wait_s" in message
    assert not (workspace / "data" / "raw").exists()  # DVC was never started


def prefect(args: list[str], cwd, env) -> subprocess.CompletedProcess:
    return run([f"{VENV_BIN}/prefect", *args], cwd, env)


def test_deployment_from_prefect_yaml_runs_a_one_off_experiment_from_the_api(workspace, ws_env):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    shutil.copytree(REPO / "pipeline", workspace / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", workspace / "prefect.yaml")
    run(["git", "add", "-A"], workspace)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "flows"], workspace)
    params_before = (workspace / "params.yaml").read_bytes()
    with prefect_test_harness(server_startup_timeout=120):
        env = ws_env | {"PREFECT_API_URL": PREFECT_API_URL.value(), "ALEXOPS_WORKSPACE": str(workspace)}
        prefect(["work-pool", "create", "alexops", "--type", "process"], workspace, env)
        prefect(["--no-prompt", "deploy", "--all"], workspace, env)
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("alexops-pipeline/nightly")
        assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
        assert deployment.global_concurrency_limit.limit == 1

        # as the UI's "Run → custom run" does: parameters for this run only
        flow_run = run_deployment("alexops-pipeline/nightly", parameters={"epochs": 1}, timeout=0)
        worker = subprocess.Popen(
            [f"{VENV_BIN}/prefect", "worker", "start", "--pool", "alexops", "--run-once"],
            cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            state = wait_for_final_state(flow_run.id, worker)
        finally:
            worker.kill()
        assert state.is_completed(), worker.stdout.read()[-3000:]
        artifacts = artifacts_of(flow_run.id)
    assert "train.epochs (this run) | 1 |" in artifacts["summary-fashion-mnist"].data
    assert (workspace / "params.yaml").read_bytes() == params_before  # the workspace is untouched
    assert not (workspace / "reports").exists()

    shown = json.loads(run([f"{VENV_BIN}/dvc", "exp", "show", "--json"], workspace, ws_env).stdout)
    experiments = [e for baseline in shown for e in (baseline.get("experiments") or [])]
    assert any((e.get("name") or "").startswith("fashion-mnist-train-epochs-1-") for e in experiments), shown

    client = mlflow_client(ws_env)
    champion = client.get_model_version_by_alias("alexnet-fashion-mnist", "champion")
    logged = client.get_run(champion.run_id).data
    assert logged.params["train.epochs"] == "1"
    assert logged.tags["prefect.flow_run_id"] == str(flow_run.id)


def wait_for_final_state(flow_run_id, worker: subprocess.Popen, limit_s: float = 300):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + limit_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(flow_run_id).state
            if state.is_final():
                return state
            if worker.poll() is not None and not state.is_running():
                return state
            time.sleep(1)
    return state
