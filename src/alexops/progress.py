"""The per-epoch progress line `train` prints, and its parser for orchestrators.

One format serves both readers: a person watching `dvc repro`, and `pipeline/` turning the
lines of a running stage into a Prefect progress artifact (it sees only the stage's output,
whatever copy of the workspace DVC runs it in).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EPOCH = re.compile(
    r"^epoch (?P<epoch>\d+)/(?P<epochs>\d+): loss (?P<loss>\S+) acc (?P<acc>\S+) "
    r"val_loss (?P<val_loss>\S+) val_acc (?P<val_acc>\S+) lr \S+ · (?P<seconds>\d+) s · "
    r"ETA (?P<eta_m>\d+)m(?P<eta_s>\d+)s$"
)


@dataclass(frozen=True)
class Epoch:
    """One finished epoch: losses and accuracies as fractions, times in seconds."""

    epoch: int
    epochs: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float
    eta_s: float

    @property
    def fraction(self) -> float:
        return self.epoch / self.epochs


def format_epoch(history: list[dict], epochs: int) -> str:
    """`epoch 3/30: loss 0.4123 acc 0.8512 val_loss 0.3561 val_acc 0.8634 lr 3.20e-02 · 26 s · ETA 11m42s`
    from train's history rows (the ETA: the mean epoch time so far × epochs left)."""
    row = history[-1]
    mean_s = sum(r["seconds"] for r in history) / len(history)
    eta_s = round(mean_s * (epochs - row["epoch"]))
    return (
        f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} "
        f"val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f} lr {row['lr']:.2e} "
        f"· {row['seconds']:.0f} s · ETA {eta_s // 60}m{eta_s % 60:02d}s"
    )


def parse_epoch(line: str) -> Epoch | None:
    """The epoch a `format_epoch` line describes; None for any other line."""
    found = _EPOCH.match(line.strip())
    if found is None:
        return None
    g = found.groupdict()
    return Epoch(
        int(g["epoch"]), int(g["epochs"]), float(g["loss"]), float(g["acc"]), float(g["val_loss"]),
        float(g["val_acc"]), float(g["seconds"]), 60 * float(g["eta_m"]) + float(g["eta_s"]),
    )  # fmt: skip
