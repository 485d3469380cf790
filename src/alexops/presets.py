"""Named sets of param overrides: `python -m alexops.presets gpu` prints them as the
`-S key=value` flags of `dvc exp run`, so a preset runs without editing params.yaml and
DVC records exactly what ran.
"""

from __future__ import annotations

import sys

from alexops import params
from alexops.errors import AlexopsError

PRESETS: dict[str, dict[str, object]] = {
    # params.yaml as committed: sized for `make run` on a 2-core CPU in under 20 minutes
    "cpu": {},
    # the paper's recipe (§5–6): 227 px, full width, N(0, 0.01) init, SGD lr 0.01 divided by 10
    # when validation error stalls, 90 epochs, batch 128; bf16 and channels_last on CUDA
    "gpu": {
        "train.image_size": 227,
        "train.resize_ratio": 1.142857,  # 224 crops of 256 (§4.1); the CPU default crops less
        "train.width": 1.0,
        "train.init": "paper",
        "train.schedule": "plateau",
        "train.val_size": 5000,  # the plateau schedule watches validation error
        "train.lr": 0.01,
        "train.epochs": 90,
        "train.batch_size": 128,
        "train.dropout": 0.5,
        "train.label_smoothing": 0.0,
        "train.warmup_epochs": 0.0,
        "train.amp": True,
        "base.device": "cuda",
        "quantize.float_layers": [],  # every convolution int8: at this size, what pays (README, int8)
    },
    # the paper-size network (227 px, width 1.0, the paper's SGD, batch 128, weight decay and
    # augmentation) with the CPU defaults' He init and one-cycle schedule instead of N(0, 0.01)
    # and plateaus (out of the initial plateau in one epoch, not tens), plus label smoothing,
    # random erasing and a weight average; bf16 where the hardware has it. On one H200: 50 epochs
    # in 153 s of training for 94.10% on Fashion-MNIST (10-crop), 30 epochs 93.27% (README, "GPU").
    # Quantised with every convolution int8: its fully connected layers, 96% of the weights, make
    # int8 pay (2.7× fp32 at batch 1, 2.35× at batch 64 on 2 cores; README, "int8 where it pays").
    # `base.device` stays as params.yaml has it.
    "paper": {
        "train.image_size": 227,
        "train.resize_ratio": 1.142857,  # as measured on the GPU: the paper's crops, not the CPU default's
        "train.width": 1.0,
        "train.init": "kaiming",
        "train.schedule": "onecycle",
        "train.val_size": 5000,  # as measured on the GPU
        "train.lr": 0.02,
        "train.epochs": 50,
        "train.batch_size": 128,
        "train.dropout": 0.5,
        "train.warmup_epochs": 0.0,
        "train.label_smoothing": 0.1,
        "train.erasing": 0.5,
        "train.ema_decay": 0.999,
        "train.amp": True,
        "quantize.float_layers": [],
    },
}
# CIFAR-10 (the colour path: 3 channels, PCA lighting on the RGB covariance), CPU- and GPU-sized;
# fetch needs cifar-10-python.tar.gz in /usr/share/datasets/cifar10, a listed mirror or online
PRESETS["cifar10"] = {"base.dataset": "cifar10"}
PRESETS["cifar10-gpu"] = PRESETS["gpu"] | {"base.dataset": "cifar10", "train.epochs": 60}


def overrides(name: str) -> dict[str, object]:
    if name not in PRESETS:
        raise AlexopsError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}.")
    return PRESETS[name]


def apply(base: dict, name: str) -> dict:
    """The raw params dict `base` with the preset's overrides applied (for validation)."""
    return merge(base, overrides(name))


def merge(base: dict, changes: dict[str, object]) -> dict:
    """The raw params dict `base` with `{"section.key": value}` changes applied, as `-S` does."""
    merged = {section: dict(values or {}) for section, values in base.items()}
    for key, value in changes.items():
        section, sep, field = key.partition(".")
        if not sep or not field:
            raise AlexopsError(f"{key!r} is not a param key. Fix: name it as section.key, e.g. train.epochs.")
        merged.setdefault(section, {})[field] = value
    return merged


def dvc_flags(name: str) -> list[str]:
    return [flag for key, value in overrides(name).items() for flag in ("-S", f"{key}={value}")]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        print(" ".join(dvc_flags(args[0] if args else "cpu")))
    except params.AlexopsError as exc:
        print(f"presets: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
