"""How stages show progress: the per-epoch line `train` prints and its parser for orchestrators,
and the progress bars of every stage.

One format serves both readers: a person watching `dvc repro`, and `pipeline/` turning the
lines of a running stage into a Prefect progress artifact (it sees only the stage's output,
whatever copy of the workspace DVC runs it in).
"""

from __future__ import annotations

import io
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from tqdm import tqdm

# A log (a queued experiment's, Prefect's, CI's) gets a bar's state as a whole line this often,
# and its final state when it ends
LOG_INTERVAL_S = 30.0

_EPOCH = re.compile(
    r"^epoch (?P<epoch>\d+)/(?P<epochs>\d+): loss (?P<loss>\S+) acc (?P<acc>\S+) "
    r"(?:val_loss (?P<val_loss>\S+) val_acc (?P<val_acc>\S+) )?lr \S+ · (?P<seconds>\d+) s · "
    r"ETA (?P<eta_m>\d+)m(?P<eta_s>\d+)s$"
)


@dataclass(frozen=True)
class Epoch:
    """One finished epoch: losses and accuracies as fractions, times in seconds; the val_ fields
    are NaN when the run holds no validation images out (train.val_size 0)."""

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
    from train's history rows (the ETA: the mean epoch time so far × epochs left); without
    validation images (train.val_size 0, NaN in the row) the line has no val_loss and val_acc."""
    row = history[-1]
    mean_s = sum(r["seconds"] for r in history) / len(history)
    eta_s = round(mean_s * (epochs - row["epoch"]))
    validation = ""
    if not math.isnan(row["val_accuracy"]):
        validation = f"val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f} "
    return (
        f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} "
        f"{validation}lr {row['lr']:.2e} · {row['seconds']:.0f} s · ETA {eta_s // 60}m{eta_s % 60:02d}s"
    )


def parse_epoch(line: str) -> Epoch | None:
    """The epoch a `format_epoch` line describes; None for any other line."""
    found = _EPOCH.match(line.strip())
    if found is None:
        return None
    g = found.groupdict()
    return Epoch(
        int(g["epoch"]), int(g["epochs"]), float(g["loss"]), float(g["acc"]), float(g["val_loss"] or "nan"),
        float(g["val_acc"] or "nan"), float(g["seconds"]), 60 * float(g["eta_m"]) + float(g["eta_s"]),
    )  # fmt: skip


def bar(iterable: Iterable | None = None, **options) -> tqdm:
    """A tqdm progress bar on stderr: redrawn in place each second on a terminal; where stderr is
    a file or a pipe, a whole line every LOG_INTERVAL_S seconds and one with the final state
    (none with leave=False), since the terminal's carriage returns would pile every redraw into
    one endless line there."""
    if sys.stderr.isatty():
        return tqdm(iterable, mininterval=1.0, **options)
    # maxinterval too: tqdm's monitor thread otherwise redraws a slow bar every 10 s, unchanged
    interval = {"mininterval": LOG_INTERVAL_S, "maxinterval": LOG_INTERVAL_S}
    return _LogBar(iterable, file=_Lines(sys.stderr), **interval, **options)


class _LogBar(tqdm):
    """tqdm for a log: a new postfix or description waits for the next interval's line, where
    tqdm would draw it at once (a training loop's loss every 20 steps: a line each time)."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s="", refresh=True):
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=False)

    def set_description_str(self, desc=None, refresh=True):
        super().set_description_str(desc, refresh=False)


class _Lines(io.TextIOBase):
    """A stream for tqdm that writes each state it draws (`\\r` + state + padding) as its own line,
    except the first, drawn when the bar starts (0 done), which says nothing yet."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._last: str | None = None

    def write(self, text: str) -> int:
        line = text.strip("\r\n").rstrip()
        if line and self._last is None:
            self._last = line
        elif line and line != self._last:
            self._stream.write(line + "\n")
            self._last = line
        return len(text)

    def flush(self) -> None:
        self._stream.flush()
