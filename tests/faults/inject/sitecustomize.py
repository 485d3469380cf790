"""Fault injection for tests/faults: on PYTHONPATH, Python imports this in every process.

ALEXOPS_INJECT_NAN_AFTER=N makes torch's cross-entropy return NaN from its N-th call on,
which is what a too-high learning rate ends in, without any hook in the product code.

ALEXOPS_INJECT_HOLD_AFTER=TEXT with ALEXOPS_INJECT_GATE=PATH holds the process that writes a
stdout line starting with TEXT, once the line is out, until PATH exists (120 s at most), and
creates PATH.held as it starts to wait: a test acts at a known point of a stage, whatever the
machine's load, and knows that the hold happened.
"""

import os
import sys

if "ALEXOPS_INJECT_NAN_AFTER" in os.environ:
    import torch
    import torch.nn.functional as F

    _calls = {"n": 0}
    _real = F.cross_entropy

    def _poisoned(*args, **kwargs):
        _calls["n"] += 1
        loss = _real(*args, **kwargs)
        if _calls["n"] >= int(os.environ["ALEXOPS_INJECT_NAN_AFTER"]):
            return loss * torch.tensor(float("nan"))
        return loss

    F.cross_entropy = _poisoned


if "ALEXOPS_INJECT_HOLD_AFTER" in os.environ and sys.stdout is not None:
    import time

    class _HoldingStdout:
        def __init__(self, stream, prefix: str, gate: str) -> None:
            self._stream, self._prefix, self._gate, self._state = stream, prefix, gate, "watching"

        def write(self, text: str) -> int:
            written = self._stream.write(text)
            if self._state == "watching" and text.startswith(self._prefix):
                self._state = "in the line"
            if self._state == "in the line" and "\n" in text:  # print writes the newline apart
                self._state = "held"
                self._stream.flush()
                open(self._gate + ".held", "w").close()
                deadline = time.monotonic() + 120
                while not os.path.exists(self._gate) and time.monotonic() < deadline:
                    time.sleep(0.05)
            return written

        def __getattr__(self, name):
            return getattr(self._stream, name)

    sys.stdout = _HoldingStdout(
        sys.stdout, os.environ["ALEXOPS_INJECT_HOLD_AFTER"], os.environ["ALEXOPS_INJECT_GATE"]
    )
