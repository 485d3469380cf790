"""Fixtures: tiny Fashion-MNIST look-alikes in the real IDX format, and a DVC workspace."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from alexops import fetch, params, prepare
from alexops.paths import Paths

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x00000803 (or 01), big-endian dims, data."""
    header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten learnable classes: class c is a bright bar at row 2c + 2, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, c in enumerate(labels):
        images[i, 2 * c + 2 : 2 * c + 5, 3:25] = 230
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_mirror(directory: Path, n_train: int = 240, n_test: int = 80) -> dict[str, str]:
    """Write the four gzipped IDX files; return name → SHA-256 of the decompressed bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = synthetic_split(n, seed)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            raw = idx_bytes(array)
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
            checksums[name] = hashlib.sha256(raw).hexdigest()
    return checksums


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    directory = tmp_path_factory.mktemp("mirror")
    return directory, write_mirror(directory)


def tiny_params(mirror: Path, checksums: dict[str, str], **train) -> dict:
    """The repository's params.yaml shrunk to seconds of CPU work."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["fetch"] |= {"mirrors": [str(mirror)], "checksums": checksums, "retries": 1}
    params["train"] |= {
        "epochs": 2, "batch_size": 32, "image_size": 67, "width": 0.0625,
        "val_size": 40, "lr": 0.02, **train,
    }  # fmt: skip
    params["evaluate"] |= {"batch_size": 64}
    return params


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture
def workspace(tmp_path, tiny_mirror) -> Path:
    """A git + DVC repository holding the project's dvc.yaml and tiny params."""
    root = tmp_path / "ws"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(*tiny_mirror)))
    env = workspace_env(tmp_path)
    run(["git", "init", "-q"], root)
    run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init"],
        root,
    )
    run([f"{VENV_BIN}/dvc", "init", "-q"], root, env)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "workspace"], root)
    return root


def workspace_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


@pytest.fixture
def ws_env(tmp_path, workspace) -> dict:
    return workspace_env(tmp_path)


@pytest.fixture
def prepared(tmp_path, tiny_mirror, monkeypatch):
    """A project root with fetched and prepared tiny data, and its own MLflow store."""
    root = tmp_path / "root"
    raw = tiny_params(*tiny_mirror, epochs=4)
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    loaded = params.from_dict(raw)
    paths = Paths(root, loaded.base.dataset)
    fetch.run(loaded, paths)
    prepare.run(loaded, paths)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return root


def stage_command(root: Path, stage: str) -> list[str]:
    """`alexops <stage>` on a project root, as DVC would run it there."""
    return [
        sys.executable,
        "-m",
        "alexops.cli",
        "--root",
        str(root),
        "--params",
        str(root / "params.yaml"),
        stage,
    ]
