"""The Prefect flow and deployment, on one real Prefect test server, with real process workers."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, VENV_BIN, run
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterTaskRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.testing.utilities import prefect_test_harness

from alexops.cli import STAGES as CLI_STAGES
from alexops.datasets import FASHION_MNIST
from pipeline import flows

DATASET = "fashion-mnist"
INJECT = str(REPO / "tests" / "faults" / "inject")  # sitecustomize: holds a stage at a line (see there)


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_flow_stages_equal_dvc_yaml():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(flows.STAGES) == list(dvc)
    assert {name: spec["cmd"] for name, spec in dvc.items()} == {s: f"alexops {s}" for s in flows.STAGES}
    assert tuple(CLI_STAGES) == flows.STAGES


def artifacts_of(flow_run_id) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in sorted(found, key=lambda a: a.created)}


def task_runs_of(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        found = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]))
        )
    return sorted(found, key=lambda t: t.start_time or t.created)


def logs_of(flow_run_id, task_run_id=None) -> list:
    """Every log line of the flow run (or of one of its task runs), a page of 200 at a time."""
    where = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    if task_run_id is not None:
        where = LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id]))
    found: list = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(where, limit=200, offset=len(found)):
            found += page
    return found


def mlflow_client(env: dict):
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.MlflowClient()


def confusion_total(artifact) -> int:
    """Every count in the confusion table artifact; its rows checked to be in the dataset's class order."""
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    actual = [row["actual"] for row in rows]
    assert actual == [c for c in FASHION_MNIST.classes if c in actual] and len(actual) > 1, actual
    assert all(list(row)[1:] == actual for row in rows)  # the columns too
    return sum(v for row in rows for k, v in row.items() if k != "actual")


class OpenGate(logging.Handler):
    """Creates `gate` when this process logs a record whose message starts with `text`."""

    def __init__(self, gate: Path, text: str) -> None:
        super().__init__()
        self.gate, self.text = gate, text

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.text):
            self.gate.touch()


def test_a_quick_run_streams_each_stage_live_with_progress_and_a_summary(
    prefect_server, workspace, ws_env, monkeypatch, tmp_path, capfd
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ws_env["MLFLOW_TRACKING_URI"])
    # MLflow's default, whatever this shell says; undone after the test, like the flow's own choice
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    # train holds after writing its epoch 1 line until the flow has logged that line (the gate):
    # a flow that forwarded lines only when the stage ended would log it after train's last metric
    gate, epoch_line = tmp_path / "flow-logged-epoch-1", "epoch 1/2: loss"
    for name, value in (("PYTHONPATH", INJECT), ("ALEXOPS_INJECT_HOLD_AFTER", epoch_line),
                        ("ALEXOPS_INJECT_GATE", str(gate))):  # fmt: skip
        monkeypatch.setenv(name, value)
    opener = OpenGate(gate, epoch_line)
    logging.getLogger("prefect.task_runs").addHandler(opener)
    try:
        state = flows.pipeline(workspace=str(workspace), return_state=True)
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(opener)
    assert state.is_completed(), state
    flow_run_id = state.state_details.flow_run_id
    tasks = task_runs_of(flow_run_id)
    assert [t.name for t in tasks] == list(flows.STAGES)

    # each line was logged as the stage wrote it: epoch 1's line reached Prefect before the stage,
    # a process of its own, logged its last metric to MLflow (after epoch 2, its model and its
    # curves), not when the process ended; the gate makes this hold however loaded the machine is
    train = next(t for t in tasks if t.name == "train")
    lines = logs_of(flow_run_id, train.id)
    first_epoch = next(log for log in lines if log.message.startswith(epoch_line))
    assert gate.with_name(gate.name + ".held").exists()  # train was held there: no race below
    record = json.loads((workspace / "reports" / DATASET / "register.json").read_text())
    (last_metric,) = mlflow_client(ws_env).get_metric_history(record["run_id"], "parameters")
    assert first_epoch.timestamp.timestamp() * 1000 < last_metric.timestamp
    assert not any("\r" in log.message for log in lines)

    artifacts = artifacts_of(flow_run_id)
    summary = artifacts[f"summary-{DATASET}"].data
    assert f"alexnet-fashion-mnist version {record['version']} → @champion" in summary
    assert record["run_id"] in summary and "test_accuracy" in summary
    assert confusion_total(artifacts[f"confusion-{DATASET}"]) == 80  # every test image
    assert "Downloading artifacts" not in capfd.readouterr().err  # the table's download drew no bar
    training = artifacts[f"training-{DATASET}"]
    assert training.type == "progress" and float(training.data) == 100.0
    assert "epoch 2/2" in training.description and "ETA" in training.description
    tags = mlflow_client(ws_env).get_run(record["run_id"]).data.tags
    assert tags["prefect.flow_run_id"] == str(flow_run_id)  # the MLflow run points back at the flow run

    # nothing changed: every stage says so, and the summary is still complete
    again = flows.pipeline(workspace=str(workspace), return_state=True)
    assert again.is_completed()
    assert {t.state.message for t in task_runs_of(again.state_details.flow_run_id)} == {"up to date"}
    artifacts = artifacts_of(again.state_details.flow_run_id)
    assert "Every stage was up to date" in artifacts[f"summary-{DATASET}"].data
    assert "test_accuracy" in artifacts[f"summary-{DATASET}"].data
    assert confusion_total(artifacts[f"confusion-{DATASET}"]) == 80


def test_a_custom_run_shows_each_stage_and_a_gate_failure_fails_once_with_the_stage_error(
    prefect_server, workspace, ws_env, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ws_env["MLFLOW_TRACKING_URI"])
    params_before = (workspace / "params.yaml").read_bytes()
    state = flows.pipeline(
        workspace=str(workspace), epochs=1, overrides={"export.tolerance": 0.0}, return_state=True
    )
    assert state.is_failed()
    assert state.message.startswith("stage export: onnxruntime disagrees with PyTorch")
    assert "export.tolerance is 0, set below its default 0.0001" in state.message
    assert "%|" not in state.message and "\n" not in state.message  # no progress residue
    flow_run_id = state.state_details.flow_run_id
    tasks = task_runs_of(flow_run_id)
    assert [t.name for t in tasks] == ["fetch", "prepare", "train", "evaluate", "export"]  # trained once
    assert tasks[-1].state.is_failed() and all(t.state.is_completed() for t in tasks[:-1])
    errors = [log.message for log in logs_of(flow_run_id) if log.level >= 40]
    assert any(m.startswith("alexops export: error: onnxruntime disagrees") for m in errors)
    summary = artifacts_of(flow_run_id)[f"summary-{DATASET}"].data
    assert "failed, not registered (stage export:" in summary and "test_accuracy" in summary
    failed = mlflow_client(ws_env).search_runs(["1"], filter_string="attributes.status = 'FAILED'")
    assert [r.data.tags["failure.stage"] for r in failed] == ["export"]
    assert (workspace / "params.yaml").read_bytes() == params_before


def test_a_second_flow_run_waits_for_the_workspace_then_stops_clearly(
    prefect_server, workspace, ws_env, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ws_env["MLFLOW_TRACKING_URI"])
    lock = workspace / flows.LOCK_FILE
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as held:
        held.write("the first run (pid 1)\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running flow holds it
        state = flows.pipeline(workspace=str(workspace), lock_wait_s=1, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "another flow run (the first run (pid 1))" in message and "lock_wait_s" in message
    assert not (workspace / "data" / "raw").exists()  # DVC was never started


# ---- the deployment, its worker, cancel and a dead worker ---------------------------------------------


def prefect(args: list[str], cwd, env) -> subprocess.CompletedProcess:
    return run([f"{VENV_BIN}/prefect", *args], cwd, env)


def start_worker(workspace: Path, env: dict) -> subprocess.Popen:
    """A process worker in a session of its own, so that the test can kill it with its runs."""
    return subprocess.Popen(
        [f"{VENV_BIN}/prefect", "worker", "start", "--pool", "alexops", "--limit", "1"],
        cwd=workspace, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def wait_for(predicate, limit_s: float, what: str):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if (value := predicate()) is not None:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def final_state(flow_run_id, limit_s: float = 600):
    def check():
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
        return state if state is not None and state.is_final() else None

    return wait_for(check, limit_s, f"flow run {flow_run_id} to end")


def training_progress(flow_run_id):
    """The run's training progress artifact once training is under way (below 100 %)."""
    artifact = artifacts_of(flow_run_id).get(f"training-{DATASET}")
    return artifact if artifact is not None and 0 < float(artifact.data) < 100 else None


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once: a machine that dies."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    doomed, grew = {pid}, True
    while grew:
        children = {child for child, parent in parents.items() if parent in doomed} - doomed
        doomed |= children
        grew = bool(children)
    for victim in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def alexops_processes(workspace: Path) -> list[str]:
    """dvc and stage processes working in the workspace (or a copy of it under .dvc/tmp)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if ("alexops.cli" in cmdline or "/dvc " in cmdline) and cwd.startswith(str(workspace)):
            found.append(cmdline)
    return found


def test_deployment_runs_cancels_cleanly_and_survives_a_dead_worker(prefect_server, workspace, ws_env):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelling

    shutil.copytree(REPO / "pipeline", workspace / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", workspace / "prefect.yaml")
    run(["git", "add", "-A"], workspace)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "flows"], workspace)
    params_before = (workspace / "params.yaml").read_bytes()
    # a fresh workspace on the default store, ./mlflow.db: every run lands there, never in a copy
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{workspace}/mlflow.db"}
    env = {k: v for k, v in ws_env.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"PREFECT_API_URL": PREFECT_API_URL.value(), "ALEXOPS_WORKSPACE": str(workspace)}
    prefect(["work-pool", "create", "alexops", "--type", "process", "--overwrite"], workspace, env)
    prefect(["--no-prompt", "deploy", "--all"], workspace, env)
    run([f"{VENV_BIN}/python", "-m", "pipeline.automations"], workspace, env)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("alexops-pipeline/nightly")
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert deployment.global_concurrency_limit.limit == 1
    choices = json.dumps(deployment.parameter_openapi_schema)
    assert all(f'"{name}"' in choices for name in ("params.yaml", "fashion-mnist", "cifar10", "all"))

    # a custom run, cancelled from the API (as the UI's Cancel button does) in the middle of training
    worker = start_worker(workspace, env)
    try:
        cancelled = run_deployment("alexops-pipeline/nightly", parameters={"epochs": 60}, timeout=0)
        wait_for(lambda: training_progress(cancelled.id), 600, "training progress while the run is running")
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(cancelled.id, Cancelling(), force=True)
        assert final_state(cancelled.id).is_cancelled()
        assert wait_for(lambda: [] if not alexops_processes(workspace) else None, 60, "no stage left") == []
        assert not list((workspace / ".dvc" / "tmp" / "exps" / "standalone").glob("tmp*"))
        shown = json.loads(run([f"{VENV_BIN}/dvc", "exp", "show", "--json"], workspace, env).stdout)
        states = [(e.get("executor") or {}).get("state") for b in shown for e in b.get("experiments") or []]
        assert "running" not in states
        killed = mlflow_client(store).search_runs(
            ["1"], filter_string=f"tags.`prefect.flow_run_id` = '{cancelled.id}'"
        )
        assert [(r.info.status, r.data.tags["failure.reason"]) for r in killed] == [
            ("KILLED", "stopped by SIGINT")
        ]

        # a worker that dies with its run: the next worker runs the next run
        dead = run_deployment("alexops-pipeline/nightly", parameters={"epochs": 60}, timeout=0)
        wait_for(lambda: training_progress(dead.id), 600, "the second run's training")
    finally:
        kill_tree(worker.pid)  # the worker, its flow-run process, dvc, the stage: all at once
        worker.wait()
    worker = start_worker(workspace, env)
    try:  # the dead run holds the deployment's one slot until the automation marks it Crashed
        after = run_deployment("alexops-pipeline/nightly", parameters={"epochs": 1}, timeout=0)
        crashed = final_state(dead.id, limit_s=300)
        assert crashed.is_crashed() and "No heartbeat" in crashed.message
        assert final_state(after.id, limit_s=900).is_completed()
    finally:
        kill_tree(worker.pid)
        worker.wait()
    summary = artifacts_of(after.id)[f"summary-{DATASET}"].data
    assert "train.epochs (this run) | 1 |" in summary
    assert (workspace / "params.yaml").read_bytes() == params_before  # the workspace is untouched
    client = mlflow_client(store)
    runs = client.search_runs(["1"])
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the dead run was closed too
    location = client.get_experiment("1").artifact_location
    assert location.startswith((workspace / "mlruns").as_uri()), location
    assert not [p for p in (workspace / ".dvc").rglob("*") if p.name in ("mlflow.db", "mlruns")]
    champion = client.get_model_version_by_alias("alexnet-fashion-mnist", "champion")
    (workspace / "grey.png").write_bytes(grey_png())
    predicted = run([f"{VENV_BIN}/alexops", "predict", "grey.png"], workspace, env)  # served from @champion
    assert json.loads(predicted.stdout)["model"]["version"] == str(champion.version)


def grey_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
