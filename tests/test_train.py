"""Training: resume after a kill -9 gives the same weights; divergence stops cleanly; without
validation images (train.val_size 0) no NaN reaches the epoch lines or train.json."""

import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
import yaml
from conftest import stage_command

from alexops import files, params, train
from alexops.errors import AlexopsError
from alexops.paths import Paths


def train_command(root):
    return stage_command(root, "train")


def state_of(root):
    return torch.load(root / "artifacts" / "fashion-mnist" / "model.pt", weights_only=True)["state_dict"]


def kill_9_after_first_checkpoint(root):
    """Start training and kill -9 it once its first epoch's checkpoint is on disk."""
    checkpoint = root / "artifacts" / "fashion-mnist" / "checkpoint.pt"
    victim = subprocess.Popen(train_command(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert checkpoint.exists(), "the first epoch's checkpoint was never written"
    assert not (root / "artifacts" / "fashion-mnist" / "model.pt").exists()


def test_kill_9_mid_training_then_rerun_resumes_to_identical_weights(prepared, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(prepared, uninterrupted)
    subprocess.run(train_command(uninterrupted), check=True, capture_output=True)
    assert not (uninterrupted / "artifacts" / "fashion-mnist" / "checkpoint.pt").exists()  # done: removed

    kill_9_after_first_checkpoint(prepared)

    rerun = subprocess.run(train_command(prepared), check=True, capture_output=True, text=True)
    assert "resuming after epoch" in rerun.stdout
    ours, reference = state_of(prepared), state_of(uninterrupted)
    assert ours.keys() == reference.keys()
    for name in ours:
        assert torch.equal(ours[name], reference[name]), name


def test_changed_params_do_not_resume_a_stale_checkpoint(prepared):
    kill_9_after_first_checkpoint(prepared)
    raw = yaml.safe_load((prepared / "params.yaml").read_text())
    raw["train"]["lr"] = 0.01
    (prepared / "params.yaml").write_text(yaml.safe_dump(raw))
    rerun = subprocess.run(train_command(prepared), check=True, capture_output=True, text=True)
    assert "starting afresh" in rerun.stdout


def test_divergence_stops_with_a_clear_error_before_anything_is_saved(prepared):
    loaded = params.load(prepared / "params.yaml")
    paths = Paths(prepared, loaded.base.dataset)
    stats = files.read_json(paths.prepared / "stats.json", produced_by="prepare")
    session = train.build(loaded.train, stats, torch.device("cpu"))
    with torch.no_grad():
        session.model.classifier[-1].bias[0] = float("nan")  # what a too-high lr ends in
    saved = []
    with pytest.raises(AlexopsError, match=r"training diverged.*epoch 1.*train\.lr"):
        train.fit(
            session, train.split_validation(paths, 40, 0), loaded.train, 0, 64, train.Progress(), saved.append
        )
    assert saved == []  # the per-epoch checkpoint hook never ran


def test_the_train_stage_without_validation_images_trains_on_all_and_prints_no_nan(prepared):
    """train.val_size 0, the default: every training image trains, and no NaN reaches the
    epoch lines or train.json (the history keeps NaN for the missing validation)."""
    raw = yaml.safe_load((prepared / "params.yaml").read_text())
    raw["train"]["val_size"] = 0
    (prepared / "params.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run(train_command(prepared), check=True, capture_output=True, text=True)
    epochs = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == raw["train"]["epochs"]
    assert not any("nan" in line or "val_" in line for line in epochs)
    assert " 0 val images" in done.stdout
    summary = files.read_json(prepared / "reports" / "fashion-mnist" / "train.json", produced_by="train")
    assert summary["val_accuracy"] is None and 0 < summary["train_accuracy"] <= 1
