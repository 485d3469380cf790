"""Fault injection on tiny data, continued: runs at once and the tracking server going away.

Each test is one row of tests/faults/README.md (split from test_faults.py so that `make test`'s
workers share the long runs).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import NO_MLFLOW_JOBS, run
from test_faults import DATASET, DVC, alexops, champion_version

# 4. concurrency -------------------------------------------------------------------------


def test_two_pipeline_runs_at_once_one_waits_or_stops_clearly(workspace, ws_env):
    first = subprocess.Popen([DVC, "repro"], cwd=workspace, env=ws_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(1.5)
    second = subprocess.run([DVC, "repro"], cwd=workspace, env=ws_env, capture_output=True, text=True)
    out, err = first.communicate(timeout=600)
    outcomes = sorted([first.returncode, second.returncode])
    assert outcomes[0] == 0, err
    if second.returncode != 0:
        assert "lock" in second.stderr.lower()  # DVC's "Unable to acquire lock" message
    final = run([DVC, "repro"], workspace, ws_env)
    assert "up to date" in final.stdout
    assert champion_version(ws_env) in {"1", "2"}
    run([DVC, "status"], workspace, ws_env)


# 5. tracking server down ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(store: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--artifacts-destination",
         str(store / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=os.environ | NO_MLFLOW_JOBS,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    raise AssertionError("mlflow server did not start")


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def test_tracking_server_down_at_start_stops_train_before_any_work(prepared):
    done = alexops(prepared, "train", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 75  # EX_TEMPFAIL: a server that does not answer may come back
    assert "cannot reach the MLflow tracking store" in done.stderr and "Traceback" not in done.stderr
    assert not (prepared / "artifacts" / DATASET / "checkpoint.pt").exists()


def test_tracking_server_lost_before_register_loses_nothing_and_register_reruns_alone(prepared, tmp_path):
    store, port = tmp_path / "server", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(store, port)
    try:
        for stage in ("train", "evaluate", "export"):
            assert alexops(prepared, stage, uri).returncode == 0
    finally:
        stop(server)
    lost = alexops(prepared, "register", uri)
    assert lost.returncode == 75 and "cannot reach the MLflow tracking store" in lost.stderr
    assert (prepared / "artifacts" / DATASET / "model.onnx").exists()
    assert (prepared / "reports" / DATASET / "evaluate.json").exists()

    server = start_mlflow_server(store, port)
    try:
        back = alexops(prepared, "register", uri)
        assert back.returncode == 0, back.stderr
        assert champion_version({"MLFLOW_TRACKING_URI": uri}) == "1"
    finally:
        stop(server)
