"""Fixtures: tiny Fashion-MNIST look-alikes in the real IDX format, and a DVC workspace."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from alexops import fetch, params, prepare
from alexops.paths import Paths

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)

# What every process a test starts inherits: DVC sends no usage analytics (each command
# started a daemon that tried to, offline; the flows' DVC commands too).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# For the MLflow servers the tests start themselves: no job consumers (GenAI scorers), seven
# processes per server, each importing MLflow. The stack and `make mlflow-server` do the same.
NO_MLFLOW_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

# The longest test files first, so that `make test`'s workers (pytest-xdist, one file per
# worker, --no-loadscope-reorder keeping this order) start them together rather than end on
# one of them alone. Measured at 5977501 (seconds of setup + call + teardown under `make
# test`'s load): stack 811, faults 733, runs 707, flow 556, pipeline 498, experiments 448,
# faults_tracking 338, serve 227, folder_pipeline 211, train 171.
LONGEST_FIRST = (
    "test_stack.py", "test_faults.py", "test_runs.py", "test_flow.py", "test_pipeline.py",
    "test_experiments.py", "test_faults_tracking.py", "test_serve.py", "test_folder_pipeline.py",
    "test_train.py", "test_protocols.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order


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
    params["register"] |= {
        "min_accuracy": 0.0,
        "significance": 1.0,
    }  # a 2-epoch tiny model is no better than chance
    # 80 test images: one changed prediction is 1.25 points, so the int8 gate cannot hold here
    params["quantize"] = {"calibration_images": 64, "max_accuracy_drop": 1.0}
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
    shutil.copy(REPO / ".gitignore", root / ".gitignore")  # what git must not hold, as in a real clone
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "datasets", root / "datasets")  # fetch depends on it (declared datasets)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(*tiny_mirror)))
    env = workspace_env(tmp_path)
    run(["git", "init", "-q"], root)
    run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init"],
        root,
    )
    run([f"{VENV_BIN}/dvc", "init", "-q"], root, env)
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")  # dvc.yaml's curve template
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


# --- CIFAR-10: tiny archives in the published python-version format ---------------------------


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_FOLDER = "cifar-10-batches-py"
_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce__()[0]


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle did when CIFAR-10 was published (protocol 2): every string is
    an 8-bit string, which encoding='bytes' reads back as bytes, and numpy's array rebuilder is
    numpy.core.multiarray._reconstruct. Python 3's own protocol 2 would pickle bytes through
    _codecs.encode, a global the published batches never name."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_8bit_string(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_8bit_string
    dispatch[str] = save_8bit_string

    def save_global(self, obj, name=None):
        if obj is _RECONSTRUCT:  # numpy 2 calls it numpy._core.multiarray._reconstruct
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar10_synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten learnable classes: class c is a bright bar at rows 3c..3c+2 of colour channel c % 3."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 3, 32, 32))
    for i, c in enumerate(labels):
        images[i, c % 3, 3 * c : 3 * c + 3, 2:30] = 230
    return images.astype(np.uint8), labels.astype(np.int64)


def cifar10_batch_pickle(images: np.ndarray, labels, batch_label: str) -> bytes:
    """One batch as published: rows of 1024 red, 1024 green, 1024 blue bytes, labels a list."""
    rows = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1)
    return py2_pickle(
        {
            b"batch_label": batch_label.encode(),
            b"labels": [int(v) for v in labels],
            b"data": rows,
            b"filenames": [f"synthetic_{i:05d}.png".encode() for i in range(len(rows))],
        }
    )


def cifar10_meta_pickle(classes=CIFAR10_CLASSES) -> bytes:
    names = [c.encode() for c in classes]
    return py2_pickle({b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072})


def cifar10_members(n_train: int = 100, n_test: int = 20, seed: int = 5) -> dict[str, bytes]:
    """Member name → bytes of the published archive: train spread over data_batch_1..5."""
    images, labels = cifar10_synthetic_split(n_train, seed)
    members = {
        f"{CIFAR10_FOLDER}/data_batch_{i + 1}": cifar10_batch_pickle(
            images[part], labels[part], f"training batch {i + 1} of 5"
        )
        for i, part in enumerate(np.array_split(np.arange(n_train), 5))
    }
    test_images, test_labels = cifar10_synthetic_split(n_test, seed + 1)
    members[f"{CIFAR10_FOLDER}/test_batch"] = cifar10_batch_pickle(
        test_images, test_labels, "testing batch 1 of 1"
    )
    members[f"{CIFAR10_FOLDER}/batches.meta"] = cifar10_meta_pickle()
    members[f"{CIFAR10_FOLDER}/readme.html"] = b"<html>synthetic CIFAR-10</html>"
    return members


def cifar10_tar_gz(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    """A .tar.gz holding the folder entry, `members` (name → bytes) and `symlinks` (name → target).
    Fixed times, so the same members always give the same checksum."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        folder = tarfile.TarInfo(CIFAR10_FOLDER)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return gzip.compress(buffer.getvalue(), mtime=0)


def write_cifar10_mirror(
    directory: Path, n_train: int = 100, n_test: int = 20, seed: int = 5
) -> dict[str, str]:
    """Write cifar-10-python.tar.gz; return {name: SHA-256 of the archive}, for fetch.checksums."""
    directory.mkdir(parents=True, exist_ok=True)
    archive = cifar10_tar_gz(cifar10_members(n_train, n_test, seed))
    (directory / "cifar-10-python.tar.gz").write_bytes(archive)
    return {"cifar-10-python.tar.gz": hashlib.sha256(archive).hexdigest()}


@pytest.fixture(scope="session")
def tiny_cifar10_mirror(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    directory = tmp_path_factory.mktemp("cifar10-mirror")
    return directory, write_cifar10_mirror(directory)
