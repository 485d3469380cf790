"""How MLflow runs end: signals, crashes and failures, on real stage processes and real stores;
and the registry decision of parallel registers, on a real store with real processes."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import NO_MLFLOW_JOBS, stage_command

from alexops import files, register, tracking
from alexops.errors import AlexopsError

DATASET = "fashion-mnist"


def client_for(uri: str) -> mlflow.MlflowClient:
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient()


def set_train(root: Path, **values) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["train"] |= values
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


def start_training(root: Path, epochs: int) -> subprocess.Popen:
    """`alexops train` as a process; returns once its first epoch's checkpoint is on disk."""
    set_train(root, epochs=epochs)
    checkpoint = root / "artifacts" / DATASET / "checkpoint.pt"
    process = subprocess.Popen(stage_command(root, "train"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), process.communicate()
    return process


def the_run(root: Path):
    run_id = files.read_json(root / "artifacts" / DATASET / "mlflow_run.json", "train")["run_id"]
    return client_for(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id)


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_stops_the_stage_its_run_ends_killed_and_a_rerun_resumes(prepared, sent):
    process = start_training(prepared, epochs=8)
    process.send_signal(sent)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + sent, err
    assert f"stopped by {sent.name}" in err and "Traceback" not in err
    stopped = the_run(prepared)
    assert stopped.info.status == "KILLED" and stopped.info.end_time is not None
    assert stopped.data.tags["failure.reason"] == f"stopped by {sent.name}"
    assert stopped.data.tags["failure.stage"] == "train"
    assert (prepared / "artifacts" / DATASET / "checkpoint.pt").exists()  # the rerun resumes from it
    if sent != signal.SIGTERM:
        return  # one resume is enough: every signal left the same state behind
    resumed = subprocess.run(stage_command(prepared, "train"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch" in resumed.stdout
    finished = the_run(prepared)
    assert finished.info.run_id == stopped.info.run_id and finished.info.status == "FINISHED"
    assert "failure.reason" not in finished.data.tags
    history = client_for(os.environ["MLFLOW_TRACKING_URI"]).get_metric_history(
        finished.info.run_id, "train_loss"
    )
    assert sorted(m.step for m in history) == list(range(1, 9))  # every epoch once, across the stop


def test_a_run_whose_process_was_killed_9_is_closed_by_the_next_stage(prepared):
    process = start_training(prepared, epochs=8)
    process.kill()
    process.communicate()
    orphan = the_run(prepared)
    assert orphan.info.status == "RUNNING"  # nothing can run on SIGKILL...
    (prepared / "artifacts" / DATASET / "checkpoint.pt").unlink()  # a fresh training, a new run
    set_train(prepared, epochs=1)
    done = subprocess.run(stage_command(prepared, "train"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    closed = client_for(os.environ["MLFLOW_TRACKING_URI"]).get_run(orphan.info.run_id)
    assert closed.info.status == "KILLED" and closed.info.end_time is not None  # ...the next one closes it
    assert "ended without closing the run" in closed.data.tags["failure.reason"]
    assert the_run(prepared).info.status == "FINISHED"


def test_a_failing_stage_ends_its_run_failed_with_its_reason_and_keeps_what_finished(prepared):
    set_train(prepared, epochs=1)
    for stage in ("train", "evaluate"):
        done = subprocess.run(stage_command(prepared, stage), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    raw = yaml.safe_load((prepared / "params.yaml").read_text())
    raw["export"]["tolerance"] = 0.0  # no two runtimes agree to the last bit
    (prepared / "params.yaml").write_text(yaml.safe_dump(raw))
    failed = subprocess.run(stage_command(prepared, "export"), capture_output=True, text=True)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    # the fix names the actual cause: the tolerance the user set
    assert "export.tolerance is 0, set below its default 0.0001" in failed.stderr
    assert not (prepared / "artifacts" / DATASET / "model.onnx").exists()

    # export's params differ from those of the model's run: it failed in a run nested under it,
    # and the model's run still describes the pipeline that made it
    model = the_run(prepared)
    assert model.info.status == "FINISHED" and model.data.params["export.tolerance"] == "0.0001"
    client = client_for(os.environ["MLFLOW_TRACKING_URI"])
    nested = client.search_runs(
        [model.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{model.info.run_id}'"
    )
    assert [(r.info.run_name, r.info.status) for r in nested] == [("export: export.tolerance=0.0", "FAILED")]
    assert nested[0].info.end_time is not None and nested[0].data.params["export.tolerance"] == "0.0"
    assert nested[0].data.tags["failure.stage"] == "export"
    assert "export.tolerance" in nested[0].data.tags["failure.reason"]

    # with the run's own params, the failure ends the model's run FAILED; what finished stays
    raw["export"]["tolerance"] = 0.0001
    (prepared / "params.yaml").write_text(yaml.safe_dump(raw))
    (prepared / "artifacts" / DATASET / "model.pt").unlink()
    failed = subprocess.run(stage_command(prepared, "export"), capture_output=True, text=True)
    assert failed.returncode == 2 and "model.pt is missing" in failed.stderr
    model = the_run(prepared)
    assert model.info.status == "FAILED" and model.info.end_time is not None
    assert model.data.tags["failure.stage"] == "export" and "model.pt" in model.data.tags["failure.reason"]
    assert {"train_loss", "test_accuracy"} <= model.data.metrics.keys()


def test_an_experiment_whose_artifacts_live_in_a_dvc_copy_is_refused_with_the_fix(prepared):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = client_for(uri)
    copy = prepared / ".dvc" / "tmp" / "exps" / "standalone" / "tmpa1b2c3" / "mlruns"
    client.create_experiment("alexops-fashion-mnist", artifact_location=copy.as_uri())  # as alexops 0.1 did
    done = subprocess.run(stage_command(prepared, "train"), capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "temporary DVC experiment copy" in done.stderr and "mlflow experiments rename" in done.stderr
    assert not client.search_runs([client.get_experiment_by_name("alexops-fashion-mnist").experiment_id])


def test_an_experiment_whose_artifact_root_vanished_is_refused(tmp_path):
    client = client_for(f"sqlite:///{tmp_path}/mlflow.db")
    gone = tmp_path / "moved-away"
    experiment = client.create_experiment("alexops-fashion-mnist", artifact_location=gone.as_uri())
    client.set_terminated(client.create_run(experiment).info.run_id, "FINISHED")
    with pytest.raises(AlexopsError, match="which is gone"):
        tracking.check_artifact_location(mlflow, client.get_experiment(experiment))
    gone.mkdir()
    tracking.check_artifact_location(mlflow, client.get_experiment(experiment))  # back: accepted


def test_a_new_experiment_keeps_its_artifacts_beside_the_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/store/mlflow.db")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "workspace"))
    assert (
        tracking.artifact_root(os.environ["MLFLOW_TRACKING_URI"], tmp_path)
        == (tmp_path / "store" / "mlruns").as_uri()
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    copy = tmp_path / "workspace" / ".dvc" / "tmp" / "exps" / "tmpxyz"
    assert tracking.tracking_uri(copy) == f"sqlite:///{tmp_path / 'workspace'}/mlflow.db"  # DVC_ROOT's
    root = tracking.artifact_root(tracking.tracking_uri(copy), copy)
    assert root == (tmp_path / "workspace" / "mlruns").as_uri()
    for relative in ("sqlite:///mlflow.db", "sqlite:///stores/team.db"):  # as a .env file may say
        monkeypatch.setenv("MLFLOW_TRACKING_URI", relative)
        assert tracking.tracking_uri(copy) == f"sqlite:///{tmp_path / 'workspace' / relative[10:]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(copy) == "http://127.0.0.1:5000"


# ---- the champion under parallel registers --------------------------------------------------------


def _register_one(uri: str, name: str, accuracy: float, start: multiprocessing.Event) -> str:
    """One register's decision, as a separate process would make it, without the workspace lock
    (as on another machine): a version with its gate tags, then settle @champion."""
    client = client_for(uri)
    start.wait()
    with mlflow.start_run() as run:
        mlflow.log_text("weights", "model/model.onnx")
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    for key, value in {"accuracy": f"{accuracy:.6f}", register.GATE_TAG: "passed"}.items():
        client.set_model_version_tag(name, version.version, key, value)
    register.settle_champion(client, name)
    return str(version.version)


def test_parallel_registers_leave_the_most_accurate_version_at_champion(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    client.create_registered_model("alexnet-race")
    accuracies = [0.81, 0.93, 0.87, 0.92]
    context = multiprocessing.get_context("spawn")
    start = context.Manager().Event()
    with context.Pool(len(accuracies)) as pool:
        pending = [pool.apply_async(_register_one, (uri, "alexnet-race", a, start)) for a in accuracies]
        time.sleep(3)  # every process imported MLflow and waits at the start line
        start.set()
        versions = [p.get(timeout=300) for p in pending]
    champion = client.get_model_version_by_alias("alexnet-race", register.CHAMPION)
    assert float(champion.tags["accuracy"]) == max(accuracies)
    assert str(champion.version) == versions[accuracies.index(max(accuracies))]


def test_a_stale_alias_write_is_corrected_by_the_next_settle(tmp_path):
    client = client_for(f"sqlite:///{tmp_path}/mlflow.db")
    client.create_registered_model("m")
    with mlflow.start_run() as run:
        mlflow.log_text("w", "model/model.onnx")
    for accuracy, gate in ((0.9, "passed"), (0.95, "failed"), (0.8, "passed")):
        version = client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
        client.set_model_version_tag("m", version.version, "accuracy", str(accuracy))
        client.set_model_version_tag("m", version.version, register.GATE_TAG, gate)
    client.set_registered_model_alias("m", register.CHAMPION, "3")  # a register that decided on old data
    assert str(register.settle_champion(client, "m").version) == "1"  # best that passed: not the failed 0.95
    assert str(client.get_model_version_by_alias("m", register.CHAMPION).version) == "1"


def test_a_register_that_loses_the_race_to_create_champion_settles_it_anyway(tmp_path):
    """Another register (another machine) inserts the @champion row between this one's read and
    its write: MLflow's SQL store then refuses this insert on the alias's unique key. That is a
    lost race, not a failure: the alias ends on the best version all the same."""
    import sqlite3
    import threading

    db = tmp_path / "mlflow.db"
    client = client_for(f"sqlite:///{db}")
    client.create_registered_model("m")
    with mlflow.start_run() as run:
        mlflow.log_text("w", "model/model.onnx")
    for accuracy in (0.8, 0.9):
        version = client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
        client.set_model_version_tag("m", version.version, "accuracy", str(accuracy))
        client.set_model_version_tag("m", version.version, register.GATE_TAG, "passed")
    other = sqlite3.connect(db, isolation_level=None)  # the other register, its write not committed yet
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO registered_model_aliases (workspace, name, alias, version) "
                  "VALUES ('default', 'm', 'champion', 1)")  # fmt: skip
    settled = {}
    this = threading.Thread(target=lambda: settled.update(best=register.settle_champion(client, "m")))
    this.start()
    time.sleep(1)  # this register has read no alias and waits on the other's write lock
    other.execute("COMMIT")
    this.join()
    assert str(settled["best"].version) == "2"
    assert str(client.get_model_version_by_alias("m", register.CHAMPION).version) == "2"


def test_a_champion_that_fails_the_gate_on_a_new_decision_loses_the_alias(tmp_path):
    """Its weights decided again (say, under a stricter gate) and no version passing: @champion
    goes, rather than keep serving a version whose gate tag says failed."""
    client = client_for(f"sqlite:///{tmp_path}/mlflow.db")
    client.create_registered_model("m")
    with mlflow.start_run() as run:
        mlflow.log_text("w", "model/model.onnx")
    version = client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_model_version_tag("m", version.version, "accuracy", "0.5")
    client.set_model_version_tag("m", version.version, register.GATE_TAG, "passed")
    assert str(register.settle_champion(client, "m").version) == "1"
    client.set_model_version_tag("m", version.version, register.GATE_TAG, "failed")
    assert register.settle_champion(client, "m") is None
    assert register.CHAMPION not in client.get_registered_model("m").aliases


@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/sh"])
def test_sigterm_to_dvc_alone_stops_its_stage_too(workspace, ws_env, shell, tmp_path):
    """`docker stop`, Kubernetes and systemd's main-process mode signal dvc only, which dies without
    passing it on; the stage watches DVC and stops itself, so it ends its run KILLED. DVC runs a
    stage with $SHELL (/bin/sh when unset): bash execs the stage (DVC is its parent), dash forks
    it (DVC is its grandparent)."""
    set_train(workspace, epochs=500)  # far more than the seconds it takes the signal to arrive
    checkpoint = workspace / "artifacts" / DATASET / "checkpoint.pt"
    log = tmp_path / "dvc.log"
    dvc_bin = Path(ws_env["PATH"].split(os.pathsep)[0]) / "dvc"
    with open(log, "wb") as output:
        dvc = subprocess.Popen([dvc_bin, "repro"], cwd=workspace, env=ws_env | {"SHELL": shell},
                               stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and dvc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    dvc.send_signal(signal.SIGTERM)
    dvc.wait()
    deadline = time.monotonic() + 60
    while _stage_processes(workspace) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _stage_processes(workspace), log.read_text()[-3000:]  # no orphan left training
    run_id = files.read_json(workspace / "artifacts" / DATASET / "mlflow_run.json", "train")["run_id"]
    stopped = client_for(ws_env["MLFLOW_TRACKING_URI"]).get_run(run_id)
    assert stopped.info.status == "KILLED" and stopped.data.tags["failure.reason"] == "stopped by SIGTERM"


def _stage_processes(workspace: Path) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"alexops.cli" in (proc / "cmdline").read_bytes() and os.readlink(proc / "cwd") == str(
                workspace
            ):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_a_stop_during_an_mlflow_write_is_held_until_the_write_is_done():
    """A SIGTERM mid-write would leave MLflow's SQLite transaction open ("database is locked" for
    the KILLED that follows): it is raised, through the stage's own handler, once the write ends."""

    def stop(number, frame):
        raise KeyboardInterrupt(signal.Signals(number).name)

    previous = signal.signal(signal.SIGTERM, stop)
    written = []
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"), tracking.signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler would have run by now; the write goes on
            written.append("all of it")
        assert written == ["all of it"] and signal.getsignal(signal.SIGTERM) is stop
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("store, held", [("sqlite", True), ("server", False)])
def test_a_stop_waits_for_a_stage_write_on_sqlite_only(tmp_path, store, held):
    """Every stage writes through tracking.store_write: a SQLite store is held until the write
    ends; a tracking server's request, which may hang for a minute, is not."""

    def stop(number, frame):
        raise KeyboardInterrupt(signal.Signals(number).name)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite" else "http://127.0.0.1:9"
    previous_uri, previous = mlflow.get_tracking_uri(), signal.signal(signal.SIGTERM, stop)
    mlflow.set_tracking_uri(uri)
    written = []
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"), tracking.store_write(mlflow):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            written.append("all of it")
        assert written == (["all of it"] if held else [])
    finally:
        signal.signal(signal.SIGTERM, previous)
        mlflow.set_tracking_uri(previous_uri)


def test_a_second_stop_while_the_run_is_ended_killed_waits_until_it_is(tmp_path, monkeypatch):
    """Ctrl-C, then Ctrl-C again while the stage writes KILLED: on SQLite the second stop is held
    until the run is ended, so no run is left RUNNING with its transaction cut short."""

    def stop(number, frame):
        raise KeyboardInterrupt(signal.Signals(number).name)

    end_run = mlflow.end_run

    def stopped_again(status):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler would have run by now
        end_run(status)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous_uri, previous = mlflow.get_tracking_uri(), signal.signal(signal.SIGTERM, stop)
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"), tracking.recorded_run(mlflow, "train") as run:
            monkeypatch.setattr(mlflow, "end_run", stopped_again)
            raise KeyboardInterrupt("SIGINT")
        monkeypatch.undo()
        ended = client_for(uri).get_run(run.info.run_id)
        assert ended.info.status == "KILLED" and ended.data.tags["failure.reason"] == "stopped by SIGINT"
    finally:
        signal.signal(signal.SIGTERM, previous)
        mlflow.set_tracking_uri(previous_uri)


def test_a_resumed_run_logs_the_parameter_count_once(tmp_path):
    """A rerun after a failure past the end of training resumes the run that already holds it."""
    from alexops import train

    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run() as run:
            train.log_parameter_count(mlflow, 1234)
        with mlflow.start_run(run_id=run.info.run_id):
            train.log_parameter_count(mlflow, 1234)
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "parameters")
        assert [m.value for m in history] == [1234]
    finally:
        mlflow.set_tracking_uri(previous_uri)


# --- an MLflow server that goes away mid-training ---------------------------------------------


class TrackingServer:
    """A real `mlflow server` on 127.0.0.1 (SQLite behind it) that a test stops and starts again
    on the same port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.directory / "server.log", "a")  # noqa: SIM115 (the server writes it)
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.directory}/mlflow.db",
             "--artifacts-destination", (self.directory / "artifacts").as_uri()],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ | NO_MLFLOW_JOBS,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 180
        while not self.answers():
            assert self.process.poll() is None, (self.directory / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow server did not answer within 180 s"
            time.sleep(0.3)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)


@pytest.fixture
def server(tmp_path):
    tracking_server = TrackingServer(tmp_path)
    tracking_server.start()
    yield tracking_server
    tracking_server.stop()


def train_against(root: Path, server: TrackingServer, epochs: int, log: Path, **env: str) -> subprocess.Popen:
    """`alexops train` on `server`, failing fast when it is down (no retries), its output in `log`."""
    set_train(root, epochs=epochs)
    environment = os.environ | {"MLFLOW_TRACKING_URI": server.uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    with open(log, "w") as out:
        return subprocess.Popen(stage_command(root, "train"), stdout=out, stderr=subprocess.STDOUT,
                                env=environment | env, text=True)  # fmt: skip


def wait_for_output(log: Path, text: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while text not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


@contextlib.contextmanager
def paused(process: subprocess.Popen):
    process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.send_signal(signal.SIGCONT)


def logged_epochs(server: TrackingServer, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client_for(server.uri).get_metric_history(run_id, key))


def test_a_tracking_server_down_mid_training_holds_the_metrics_back_and_loses_none(
    prepared, server, tmp_path
):
    log = tmp_path / "train.log"
    training = train_against(prepared, server, epochs=6, log=log)
    wait_for_output(log, "epoch 1/6", training)
    with paused(training):  # so that the server is down before training ends, however fast it is
        server.stop()
    wait_for_output(
        log, "are held back: the MLflow tracking store does not take them", training
    )  # held back, training goes on
    server.start()
    assert training.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert "the MLflow tracking store took the held-back metrics of epoch" in log.read_text()
    run = the_run(prepared)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_accuracy", "lr"):
        assert logged_epochs(server, run.info.run_id, key) == [1, 2, 3, 4, 5, 6]  # each epoch, once
    assert not (prepared / "artifacts" / DATASET / "checkpoint.pt").exists()


def test_a_tracking_server_down_past_the_end_keeps_the_weights_and_a_rerun_sends_the_rest(
    prepared, server, tmp_path
):
    log = tmp_path / "train.log"
    training = train_against(prepared, server, epochs=3, log=log, ALEXOPS_TRACKING_PATIENCE="2")
    wait_for_output(log, "epoch 1/3", training)
    with paused(training):
        server.stop()
    assert training.wait(timeout=600) == 75, log.read_text()[-3000:]  # transient: a retry may pass
    output = log.read_text()
    (error,) = [line for line in output.splitlines() if line.startswith("alexops train: error:")]
    assert "did not take the metrics of epoch" in error and "within 2 s" in error
    assert "checkpoint.pt" in error and "Fix: start the tracking server" in error
    assert "Traceback" not in output
    assert (prepared / "artifacts" / DATASET / "checkpoint.pt").exists()  # nothing trained is lost
    assert not (prepared / "artifacts" / DATASET / "model.pt").exists()  # and nothing half-written

    server.start()
    rerun = train_against(prepared, server, epochs=3, log=log)
    assert rerun.wait(timeout=600) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert "resuming after epoch 3" in output and "epoch 1/3" not in output  # not trained again
    assert "the MLflow tracking store took the held-back metrics of epoch" in output
    run = the_run(prepared)
    assert run.info.status == "FINISHED" and "failure.reason" not in run.data.tags
    assert logged_epochs(server, run.info.run_id, "train_loss") == [1, 2, 3]
    assert (prepared / "artifacts" / DATASET / "model.pt").exists()


@pytest.mark.parametrize(
    "value, seconds", [(None, 180.0), ("", 180.0), ("0", 0.0), (" 2.5 ", 2.5), ("inf", float("inf"))]
)
def test_the_tracking_patience_is_read_in_seconds(monkeypatch, value, seconds):
    if value is None:
        monkeypatch.delenv(tracking.PATIENCE_ENV, raising=False)
    else:
        monkeypatch.setenv(tracking.PATIENCE_ENV, value)
    assert tracking.patience_s() == seconds


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "3m"])
def test_a_tracking_patience_that_is_no_number_of_seconds_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv(tracking.PATIENCE_ENV, value)
    with pytest.raises(
        AlexopsError, match=f"ALEXOPS_TRACKING_PATIENCE must be a number of seconds ≥ 0, not '{value}'"
    ):
        tracking.patience_s()


def test_a_server_whose_database_does_not_answer_is_diagnosed_as_its_backend_store(monkeypatch):
    """A worker of `mlflow server` that first meets its database while it is down keeps retrying
    to connect for about 100 s: /health answers, a query does not. The diagnosis names the backend
    store, not the server, whatever the database (here an HTTP server on 127.0.0.1 that answers
    /health and leaves the query unanswered past the probe's timeout)."""
    import http.server
    import threading

    released = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/health":
                released.wait(5)  # past the probe's timeout below; no answer
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(tracking, "PROBE_TIMEOUT_S", 0.5)
    try:
        why = tracking.server_diagnosis(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        released.set()
        server.shutdown()
        server.server_close()
    assert why is not None and "backend store does not answer" in why and "timed out" in why
    assert "Fix: start the database" in why
