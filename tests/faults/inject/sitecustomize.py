"""Fault injection for tests/faults: on PYTHONPATH, Python imports this in every process.

ALEXOPS_INJECT_NAN_AFTER=N makes torch's cross-entropy return NaN from its N-th call on,
which is what a too-high learning rate ends in, without any hook in the product code.
"""

import os

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
