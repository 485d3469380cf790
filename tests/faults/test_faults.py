"""Fault injection on tiny data: each test is one row of tests/faults/README.md.

Every fault must end in one clear error (no traceback) or a recovery, and lose nothing
that was already saved.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import VENV_BIN, run, stage_command

DVC = f"{VENV_BIN}/dvc"
DATASET = "fashion-mnist"
INJECT = str(Path(__file__).parent / "inject")


def set_params(root: Path, **train) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["train"] |= train
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


def champion_version(env: dict) -> str:
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return str(mlflow.MlflowClient().get_model_version_by_alias(f"alexnet-{DATASET}", "champion").version)


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*.tmp") if ".dvc" not in p.parts]


# 1. crash and resume ------------------------------------------------------------------


def test_kill_9_during_dvc_repro_then_rerun_resumes_from_the_checkpoint(workspace, ws_env):
    set_params(workspace, epochs=4)
    checkpoint = workspace / "artifacts" / DATASET / "checkpoint.pt"
    victim = subprocess.Popen(
        [DVC, "repro"], cwd=workspace, env=ws_env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)  # dvc and the train process under it
    victim.wait()
    assert checkpoint.exists()

    rerun = run([DVC, "repro"], workspace, ws_env)
    assert "resuming after epoch" in rerun.stdout
    assert json.loads((workspace / "reports" / DATASET / "train.json").read_text())["epochs"] == 4
    assert champion_version(ws_env) == "1"


# 2. divergence --------------------------------------------------------------------------


def test_nan_loss_stops_the_pipeline_and_leaves_the_champion_untouched(workspace, ws_env):
    run([DVC, "repro"], workspace, ws_env)
    onnx_before = (workspace / "artifacts" / DATASET / "model.onnx").read_bytes()
    set_params(workspace, lr=0.03)
    env = ws_env | {"PYTHONPATH": INJECT, "ALEXOPS_INJECT_NAN_AFTER": "3"}
    done = run([DVC, "repro"], workspace, env, check=False)
    assert done.returncode != 0
    assert "training diverged" in done.stderr and "epoch 1" in done.stderr and "train.lr" in done.stderr
    assert "Traceback" not in done.stderr
    assert "Running stage 'export'" not in done.stdout
    assert (workspace / "artifacts" / DATASET / "model.onnx").read_bytes() == onnx_before
    assert champion_version(ws_env) == "1"
    assert json.loads((workspace / "reports" / DATASET / "register.json").read_text())["version"] == "1"


# 3. bad or missing data -----------------------------------------------------------------


def test_truncated_raw_file_is_detected_and_fetched_again(workspace, ws_env):
    run([DVC, "repro", "prepare"], workspace, ws_env)  # the data stages are all this fault touches
    raw = workspace / "data" / "raw" / DATASET / "train-labels-idx1-ubyte"
    good = raw.read_bytes()
    raw.write_bytes(good[:100])
    again = run([DVC, "repro", "prepare"], workspace, ws_env)
    # DVC sees the changed output and restores it: from its cache, or by rerunning fetch
    assert "Stage 'fetch' is cached" in again.stdout or "Running stage 'fetch'" in again.stdout
    assert raw.read_bytes() == good
    assert "Running stage 'prepare'" not in again.stdout  # same data, nothing downstream reruns


def test_truncated_prepared_file_is_detected_and_rebuilt(workspace, ws_env):
    run([DVC, "repro", "prepare"], workspace, ws_env)
    prepared = workspace / "data" / "prepared" / DATASET / "train.pt"
    good = prepared.read_bytes()
    prepared.write_bytes(good[: len(good) // 3])
    again = run([DVC, "repro", "prepare"], workspace, ws_env)
    assert "Stage 'prepare' is cached" in again.stdout or "Running stage 'prepare'" in again.stdout
    assert prepared.read_bytes() == good


def test_a_corrupt_prepared_file_is_one_clear_error_when_read(prepared):
    from alexops.errors import AlexopsError
    from alexops.prepare import load_split

    target = prepared / "data" / "prepared" / DATASET / "test.pt"
    target.write_bytes(target.read_bytes()[:200])
    with pytest.raises(AlexopsError, match=r"not a readable prepared split.*dvc repro -f prepare"):
        load_split(target)


def _limit_file_size():
    # a "full disk": writes past 64 KiB fail with EFBIG instead of killing the process
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_full_disk_while_writing_is_one_clear_error_and_keeps_the_old_output(prepared):
    target = prepared / "data" / "prepared" / DATASET / "train.pt"
    before = target.read_bytes()
    done = subprocess.run(
        stage_command(prepared, "prepare"),
        capture_output=True, text=True, preexec_fn=_limit_file_size,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "cannot write" in done.stderr and "disk space" in done.stderr
    assert "Traceback" not in done.stderr
    assert target.read_bytes() == before  # the previous output survives intact
    assert no_temp_files(prepared)


def test_an_unwritable_output_directory_is_one_clear_error(prepared):
    artifacts = prepared / "artifacts"
    artifacts.write_text("a file where the artifacts directory should be")
    done = subprocess.run(
        stage_command(prepared, "train"),
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "cannot write" in done.stderr and "Traceback" not in done.stderr


def test_no_working_mirror_is_one_error_listing_every_attempt(workspace, ws_env):
    raw = yaml.safe_load((workspace / "params.yaml").read_text())
    raw["fetch"]["mirrors"] = [str(workspace / "absent"), "http://127.0.0.1:9/fashion"]
    raw["fetch"]["timeout_s"] = 2
    (workspace / "params.yaml").write_text(yaml.safe_dump(raw))
    done = run([DVC, "repro"], workspace, ws_env, check=False)
    assert done.returncode != 0
    assert "absent" in done.stderr and "127.0.0.1:9" in done.stderr and "Traceback" not in done.stderr
    assert not (workspace / "data" / "raw" / DATASET).exists() or not any(
        (workspace / "data" / "raw" / DATASET).iterdir()
    )


# a stage run by hand against a tracking URI (also used by test_faults_tracking.py) ------


def alexops(root: Path, stage: str, uri: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    return subprocess.run(stage_command(root, stage), capture_output=True, text=True, env=env)


# 7. security ----------------------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_checkpoint_carrying_code_is_never_executed(prepared, tmp_path):
    checkpoint = prepared / "artifacts" / DATASET / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": _Payload()}, checkpoint)
    done = alexops(prepared, "train", f"sqlite:///{tmp_path}/mlflow.db")
    assert done.returncode == 0, done.stderr
    assert "ignoring unreadable checkpoint" in done.stdout
    assert not (prepared / "PWNED").exists() and not Path("PWNED").exists()
