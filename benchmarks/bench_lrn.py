"""Time torch.nn.LocalResponseNorm against alexops.lrn at AlexNet's LRN shapes.

    python benchmarks/bench_lrn.py [--out FILE] [--device cpu|cuda] [--repeats N] [--quick]

Per shape it reports the median forward+backward time (the training cost) and the median
no-grad forward time (inference) of both, their ratios, and the largest relative
difference of output and input-gradient, as a table and as JSON (written atomically). On
a CPU also ours against its kernels before d's powers were saved for the backward (the same
bits, taking turns), under the allocator settings training runs with.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

try:
    from alexops import lrn
    from alexops.lrn import LocalResponseNorm
    from alexops.train import keep_freed_memory
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from alexops import lrn
    from alexops.lrn import LocalResponseNorm
    from alexops.train import keep_freed_memory

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lrn.json"

# (label, shape): the LRN inputs after conv1 and conv2 of the paper's AlexNet.
SHAPES: list[tuple[str, tuple[int, int, int, int]]] = [
    ("conv1 227px b128", (128, 96, 55, 55)),
    ("conv2 227px b128", (128, 256, 27, 27)),
    ("conv1 99px b64", (64, 96, 23, 23)),
    ("conv2 99px b64", (64, 256, 11, 11)),
    ("conv1 99px w0.25 b128", (128, 24, 23, 23)),  # params.yaml's CPU default
    ("conv2 99px w0.25 b128", (128, 64, 11, 11)),
]
QUICK_SHAPES = SHAPES[2:]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in ms; synchronises CUDA so queued kernels are counted."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _fwd_bwd(module: torch.nn.Module, x: Tensor, grad: Tensor) -> Callable[[], object]:
    return lambda: torch.autograd.grad(module(x), x, grad)


def _fwd(module: torch.nn.Module, x: Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return module(x)

    return run


class _RecomputedLRN(torch.autograd.Function):
    """alexops.lrn's CPU kernels as they were before d's powers were saved (up to 4b21f8c): only x
    is kept, and the backward recomputes d chunk by chunk. The same arithmetic, so the same bits."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return lrn._cpu_forward(x, lrn.PAPER_SIZE, lrn.PAPER_ALPHA, lrn.PAPER_BETA, lrn.PAPER_K, False)[0]

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        size, alpha, beta, k = lrn.PAPER_SIZE, lrn.PAPER_ALPHA, lrn.PAPER_BETA, lrn.PAPER_K
        grad = grad.contiguous(memory_format=lrn._memory_format(x))
        grad_x, rows = torch.empty_like(x), lrn._cpu_rows(x)
        scratch = torch.empty_like(x[:rows])
        for start, m in lrn._spans(x.shape[0], rows):
            xc, gc, gxc = (t.narrow(0, start, m) for t in (x, grad, grad_x))
            denom = lrn._cpu_denominator(xc, gxc, scratch[:m], size, alpha, k)
            scale = lrn._cpu_inverse_power(denom, beta, out=gxc)
            spread = torch.div(scale, denom, out=denom).mul_(gc).mul_(xc)
            gxc.mul_(gc)
            for shift in range(-(size // 2), size - size // 2):
                lrn._add_shifted(gxc, spread, -shift, xc, -2.0 * alpha * beta / size)
        return grad_x


class RecomputedLRN(torch.nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _RecomputedLRN.apply(x.contiguous(memory_format=lrn._memory_format(x)))


def training_steps(rounds: int, steps: int) -> dict:
    """The default model's training step (params.yaml: 99 px, width 0.25, batch 128, channels-last,
    SGD; no dropout, whose masks the two would draw from one generator) with ours against the
    recomputing kernels: the two models taking turns, `steps` steps a round, on the same batch
    from the same initial weights, whose final weights are compared."""
    from alexops.model import AlexNet

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(128, 1, 99, 99, generator=gen).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (128,), generator=gen)
    runs = {}
    for name in ("recomputed", "saved"):
        torch.manual_seed(0)
        model = AlexNet(1, 10, image_size=99, width=0.25, dropout=0.0, init="kaiming")
        if name == "recomputed":
            model.features[2], model.features[6] = RecomputedLRN(), RecomputedLRN()
        model = model.to(memory_format=torch.channels_last)
        runs[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))

    def step(name: str) -> None:
        model, optimiser = runs[name]
        optimiser.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimiser.step()

    times: dict[str, list[float]] = {name: [] for name in runs}
    for turn in range(rounds):
        for name in ("recomputed", "saved") if turn % 2 == 0 else ("saved", "recomputed"):
            start = time.perf_counter()
            for _ in range(steps):
                step(name)
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    by_round = [a / b for a, b in zip(times["recomputed"], times["saved"], strict=True)]
    weights = [torch.cat([p.flatten() for p in runs[name][0].parameters()]) for name in runs]
    return {
        "steps_per_round": steps,
        "rounds": rounds,
        "ms_per_step": {name: statistics.median(t) for name, t in times.items()},
        "speedup": statistics.median(by_round),
        "speedup_by_round": by_round,
        "same_weights": bool(torch.equal(*weights)),
    }


def _max_rel_diff(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def bench_shape(shape: tuple[int, ...], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    # ReLU'd activations of the scale conv layers produce, so the normaliser does something.
    x = (torch.randn(shape, generator=gen) * 8).relu().to(device).requires_grad_()
    grad = torch.randn(shape, generator=gen).to(device)
    ref = torch.nn.LocalResponseNorm(5, 5e-4, 0.75, 2.0)
    ours = LocalResponseNorm()

    y_ref, y_ours = ref(x), ours(x)
    (g_ref,), (g_ours,) = torch.autograd.grad(y_ref, x, grad), torch.autograd.grad(y_ours, x, grad)
    row = {
        "max_rel_diff_out": _max_rel_diff(y_ours, y_ref),
        "max_rel_diff_grad": _max_rel_diff(g_ours, g_ref),
    }
    if device.type == "cpu":  # and against the kernels before d's powers were saved
        recomputed = RecomputedLRN()
        y_old = recomputed(x)
        (g_old,) = torch.autograd.grad(y_old, x, grad)
        row["same_bits_as_recomputed"] = bool(torch.equal(y_old, y_ours) and torch.equal(g_old, g_ours))
        del y_old, g_old
    del y_ref, y_ours, g_ref, g_ours
    row["torch_fwd_bwd_ms"] = median_ms(_fwd_bwd(ref, x, grad), device, warmup, repeats)
    row["ours_fwd_bwd_ms"] = median_ms(_fwd_bwd(ours, x, grad), device, warmup, repeats)
    if device.type == "cpu":  # taking turns with ours, round by round
        saved, again = [], []
        for _ in range(3):
            again.append(median_ms(_fwd_bwd(recomputed, x, grad), device, warmup, max(1, repeats // 3)))
            saved.append(median_ms(_fwd_bwd(ours, x, grad), device, warmup, max(1, repeats // 3)))
        row["recomputed_fwd_bwd_ms"] = statistics.median(again)
        row["saved_vs_recomputed"] = statistics.median(a / b for a, b in zip(again, saved, strict=True))
    row["torch_fwd_ms"] = median_ms(_fwd(ref, x), device, warmup, repeats)
    row["ours_fwd_ms"] = median_ms(_fwd(ours, x), device, warmup, repeats)
    row["speedup_fwd_bwd"] = row["torch_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"]
    row["speedup_fwd"] = row["torch_fwd_ms"] / row["ours_fwd_ms"]
    return row


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write via a temp file in the same directory, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def print_table(rows: list[dict]) -> None:
    head = f"{'shape':<24}{'N,C,H,W':<20}{'torch f+b':>11}{'ours f+b':>10}{'x':>7}"
    head += f"{'torch fwd':>11}{'ours fwd':>10}{'x':>7}{'rel.err':>10}"
    print(head)
    for r in rows:
        err = max(r["max_rel_diff_out"], r["max_rel_diff_grad"])
        print(
            f"{r['label']:<24}{','.join(map(str, r['shape'])):<20}"
            f"{r['torch_fwd_bwd_ms']:>9.1f}ms{r['ours_fwd_bwd_ms']:>8.1f}ms"
            f"{r['speedup_fwd_bwd']:>6.2f}x"
            f"{r['torch_fwd_ms']:>9.1f}ms{r['ours_fwd_ms']:>8.1f}ms{r['speedup_fwd']:>6.2f}x"
            f"{err:>10.1e}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--quick", action="store_true", help="skip the large 227 px shapes")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    # As in training (train.build): a CPU process keeps the memory it frees for reuse. The CPU
    # LRN's saved powers are two fresh full-size tensors a call, page faults each without it.
    allocator = "keep_freed_memory" if device.type == "cpu" and keep_freed_memory() else "default"
    # Other processes on the cores distort CPU timings (ours more: it runs more, smaller
    # ops); the load average goes into the results so that such runs can be told apart.
    load_before = os.getloadavg()
    rows = []
    for label, shape in QUICK_SHAPES if args.quick else SHAPES:
        row = {"label": label, "shape": list(shape)}
        row |= bench_shape(shape, device, args.warmup, args.repeats)
        rows.append(row)
        print(f"{label}: {row['speedup_fwd_bwd']:.2f}x forward+backward", flush=True)
    print()
    print_table(rows)
    steps = None
    if device.type == "cpu":
        steps = training_steps(rounds=8, steps=15)
        print(f"\nthe default model's step: {steps['speedup']:.2f}x with saved powers, "
              f"same weights: {steps['same_weights']}")  # fmt: skip

    payload = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "benchmark": "LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=2) forward+backward",
        "device": args.device,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "allocator": allocator,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "dtype": "float32",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "statistic": "median",
        "results": rows,
        "default_model_step": steps,
    }
    write_json_atomic(args.out, payload)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
