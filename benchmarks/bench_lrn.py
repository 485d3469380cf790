"""Time torch.nn.LocalResponseNorm against alexops.lrn at AlexNet's LRN shapes.

    python benchmarks/bench_lrn.py [--out FILE] [--device cpu|cuda] [--repeats N] [--quick]

Per shape it reports the median forward+backward time (the training cost) and the median
no-grad forward time (inference) of both, their ratios, and the largest relative
difference of output and input-gradient, as a table and as JSON (written atomically).
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
    from alexops.lrn import LocalResponseNorm
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from alexops.lrn import LocalResponseNorm

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lrn.json"

# (label, shape): the LRN inputs after conv1 and conv2 of the paper's AlexNet.
SHAPES: list[tuple[str, tuple[int, int, int, int]]] = [
    ("conv1 227px b128", (128, 96, 55, 55)),
    ("conv2 227px b128", (128, 256, 27, 27)),
    ("conv1 99px b64", (64, 96, 23, 23)),
    ("conv2 99px b64", (64, 256, 11, 11)),
    ("conv1 67px w0.25 b128", (128, 24, 15, 15)),  # params.yaml CPU default
    ("conv2 67px w0.25 b128", (128, 64, 7, 7)),
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
    del y_ref, y_ours, g_ref, g_ours
    row["torch_fwd_bwd_ms"] = median_ms(_fwd_bwd(ref, x, grad), device, warmup, repeats)
    row["ours_fwd_bwd_ms"] = median_ms(_fwd_bwd(ours, x, grad), device, warmup, repeats)
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

    payload = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "benchmark": "LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=2) forward+backward",
        "device": args.device,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "dtype": "float32",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "statistic": "median",
        "results": rows,
    }
    write_json_atomic(args.out, payload)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
