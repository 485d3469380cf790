"""Dataset descriptions and readers: raw files → uint8 image and int64 label tensors."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alexops.errors import AlexopsError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    # raw file name → SHA-256 of its decompressed content (ALEXNET.md)
    files: dict[str, str]
    classes: tuple[str, ...]
    channels: int


FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    files={
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),  # fmt: skip
    channels=1,
)

SPECS = {spec.name: spec for spec in (FASHION_MNIST,)}


def spec(name: str) -> DatasetSpec:
    return SPECS[name]


_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format): magic, big-endian dims, then data."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise AlexopsError(f"{path} is missing. Fix: run `dvc repro fetch` first.") from exc
    if len(data) < 4 or data[0:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise AlexopsError(f"{path} is not an IDX file of unsigned bytes. Fix: `dvc repro -f fetch`.")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise AlexopsError(f"{path} is truncated inside its header. Fix: `dvc repro -f fetch`.")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise AlexopsError(
            f"{path} is truncated or padded: {len(data)} bytes, its header promises {expected}. "
            "Fix: `dvc repro -f fetch`."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_split(raw_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of an MNIST-family dataset: images (N, 1, H, W) uint8, labels (N,) int64."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(raw_dir / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(raw_dir / f"{prefix}-labels-idx1-ubyte")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise AlexopsError(
            f"{raw_dir}: {split} images {images.shape} and labels {labels.shape} do not pair up. "
            "Fix: `dvc repro -f fetch`."
        )
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
