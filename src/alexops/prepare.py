"""Stage `prepare`: the augmentation cache.

Decoded uint8 tensors for train and test (the augmentation itself runs per batch on the
training device), and the statistics augmentation needs: per-channel mean/std for
normalisation and the eigen-decomposition of the channel covariance for PCA lighting.
"""

from __future__ import annotations

import torch

from alexops import files
from alexops.datasets import read_split, spec
from alexops.errors import AlexopsError
from alexops.params import Params
from alexops.paths import Paths


def run(params: Params, paths: Paths) -> None:
    dataset = spec(params.base.dataset)
    splits = {}
    for index, (split, limit) in enumerate(
        (("train", params.prepare.max_train), ("test", params.prepare.max_test))
    ):
        # one generator per split: the test subset must not depend on prepare.max_train
        generator = torch.Generator().manual_seed(params.base.seed * 2 + index)
        images, labels = subset(*read_split(paths.raw, split, dataset), limit, generator)
        splits[split] = (images, labels)
        save_split(paths.prepared / f"{split}.pt", images, labels)
        print(f"prepare: {split} {tuple(images.shape)}")
    stats = {
        "dataset": dataset.name,
        "classes": list(dataset.classes),
        "num_train": len(splits["train"][1]),
        "num_test": len(splits["test"][1]),
        "image_shape": list(splits["train"][0].shape[1:]),
        **channel_statistics(splits["train"][0]),
    }
    files.write_json(paths.prepared / "stats.json", stats)


def subset(
    images: torch.Tensor, labels: torch.Tensor, limit: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of `limit` samples (all when limit is 0), order kept."""
    if limit == 0 or limit >= len(labels):
        return images, labels
    keep = torch.randperm(len(labels), generator=generator)[:limit].sort().values
    return images[keep].contiguous(), labels[keep]


def channel_statistics(images: torch.Tensor) -> dict:
    """Mean, std and covariance eigen-decomposition of pixel values scaled to [0, 1]."""
    pixels = images.permute(1, 0, 2, 3).reshape(images.shape[1], -1).double() / 255
    mean = pixels.mean(dim=1)
    covariance = torch.cov(pixels) if pixels.shape[0] > 1 else pixels.var().reshape(1, 1)
    eigval, eigvec = torch.linalg.eigh(covariance.reshape(len(mean), len(mean)))
    return {
        "mean": mean.tolist(),
        "std": pixels.std(dim=1).clamp_min(1e-6).tolist(),
        "eigval": eigval.clamp_min(0).tolist(),
        "eigvec": eigvec.tolist(),
    }


def save_split(target, images: torch.Tensor, labels: torch.Tensor) -> None:
    files.save_torch(target, {"images": images, "labels": labels})


def load_split(path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        blob = torch.load(path, weights_only=True)
        return blob["images"], blob["labels"]
    except FileNotFoundError as exc:
        raise AlexopsError(f"{path} is missing. Fix: run `dvc repro prepare` first.") from exc
    except Exception as exc:  # a truncated or foreign file: torch raises several kinds
        raise AlexopsError(
            f"{path} is not a readable prepared split ({exc.__class__.__name__}). "
            "Fix: `dvc repro -f prepare`."
        ) from exc
