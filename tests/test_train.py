"""Training: resume after a kill -9 gives the same weights; divergence stops cleanly; without
validation images (train.val_size 0) no NaN reaches the epoch lines or train.json."""

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import REPO, stage_command

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


# A child process reports, for a 48 MiB tensor (over the 32 MiB up to which glibc's mmap threshold
# rises by itself), how much of it was mmap'd (mallinfo2's hblkhd) and how much the heap still
# holds once it is freed (mallinfo2's arena, against before): with glibc's defaults, then after
# `train.build` on the CPU.
HEAP_PROBE = """
import ctypes, json, sys, torch
from alexops import params, train

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def probe():
    before = libc.mallinfo2()
    held = torch.empty(48 << 20, dtype=torch.uint8).fill_(1)
    mapped = libc.mallinfo2().hblkhd - before.hblkhd
    del held
    return {"mapped": mapped, "kept": libc.mallinfo2().arena - before.arena}

out = {"default": probe()}
train.build(params.load(sys.argv[1]).train, json.loads(sys.argv[2]), torch.device("cpu"))
out["trained"] = probe()
out["again"] = train.keep_freed_memory()
print(json.dumps(out))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt(3) and mallinfo2(3) are glibc's")
def test_cpu_training_keeps_freed_memory_in_the_heap_instead_of_fresh_pages():
    """After `train.build` on a CPU, a 48 MiB tensor comes from the heap, not from a fresh mmap, and
    the heap keeps its pages once it is freed; with glibc's defaults it is mapped and unmapped."""
    stats = {"mean": [0.5], "std": [0.25], "eigval": [1.0], "eigvec": [[1.0]], "image_shape": [1, 106, 106],
             "classes": [str(c) for c in range(10)]}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", HEAP_PROBE, str(REPO / "params.yaml"), json.dumps(stats)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    heap = json.loads(done.stdout.strip().splitlines()[-1])
    assert heap["default"]["mapped"] >= 48 << 20 and heap["default"]["kept"] < 1 << 20
    assert heap["trained"]["mapped"] == 0
    # freed, and still the process's to reuse (most of it: the block may have used free space the
    # heap already held)
    assert heap["trained"]["kept"] >= 32 << 20
    assert heap["again"] is True
