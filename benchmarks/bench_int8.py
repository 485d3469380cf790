"""int8 against fp32 onnxruntime, per trained model: speed at batch 1 and 64, accuracy on the
whole test set.

    python benchmarks/bench_int8.py MODEL.pt [MODEL.pt ...] [--data DIR] [--rounds 10]
        [--variants conv1-2-float,conv1-float,all-int8] [--out FILE]

Each MODEL.pt is a trained model in train's format (artifacts/<dataset>/model.pt, or what
`bench_train.py --save` and `bench_recipe.py accuracy` write under artifacts/bench/). For
each: export to ONNX as the export stage does; quantise as the quantize stage does (static
QDQ, 512 calibration training images) with conv1 and conv2 float (the stage's default), with
conv1 alone float, and with every layer but the LRNs int8; then the centre-crop test accuracy
of every session on all 10,000 test images, and speed with the sessions taking turns in
`--rounds` rounds (speed-up = median of the per-round ratios, as this shared machine's speed
drifts), pausing between turns since onnxruntime's idle threads spin for a while after a run.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bench_train  # noqa: E402

from alexops import augment, export, quantize  # noqa: E402
from alexops.model import count_parameters, layer_summary, load_trained  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parent / "results" / "int8.json"
SEED = 42


def exported(model_path: Path, workdir: Path):
    """(fp32 ONNX path, model config, recipe, parameters, forward multiply-adds)."""
    model, config, recipe, classes = load_trained(model_path, "cpu")
    shape = (config["in_channels"], config["image_size"], config["image_size"])
    proto = export.to_onnx(model, torch.zeros(2, *shape), opset=18)
    export.add_metadata(proto, classes, recipe.as_dict(), {"width": config["width"]})
    path = workdir / f"{model_path.stem}.onnx"
    path.write_bytes(proto.SerializeToString())
    macs = sum(row["multiply_adds"] for row in layer_summary(model, config["in_channels"]))
    return path, config, recipe, count_parameters(model), macs


# name → the paper's convolutions kept float (the LRNs always are)
VARIANTS = {"conv1-2-float": ("conv1", "conv2"), "conv1-float": ("conv1",), "all-int8": ()}


def int8_variants(fp32: Path, batches: list[np.ndarray], names: list[str]) -> dict[str, bytes]:
    """One int8 model per variant; `conv1-2-float` is the quantize stage's default."""
    return {
        name: quantize.quantize(fp32, batches, export.INPUT_NAME, VARIANTS[name]).SerializeToString()
        for name in names
    }


def timed_turns(sessions: dict[str, ort.InferenceSession], batch: np.ndarray, rounds: int, seconds: float):
    """img/s of each session per round, the sessions taking turns, each ~`seconds` per turn."""
    feeds = {name: {s.get_inputs()[0].name: batch} for name, s in sessions.items()}
    runs = {}
    for name, s in sessions.items():  # warm up, and size each turn to about `seconds`
        s.run(None, feeds[name])
        started = time.perf_counter()
        s.run(None, feeds[name])
        runs[name] = max(3, round(seconds / max(1e-4, time.perf_counter() - started)))
    speeds = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            time.sleep(0.2)  # onnxruntime's idle threads spin after a run: let them settle
            times = []
            for _ in range(runs[name]):
                started = time.perf_counter()
                s.run(None, feeds[name])
                times.append(time.perf_counter() - started)
            speeds[name].append(len(batch) / statistics.median(times))
    return speeds


def measure(model_path: Path, data, args, workdir: Path) -> dict:
    train_x, _, test_x, test_y = data
    fp32_path, config, recipe, parameters, macs = exported(model_path, workdir)
    batches = quantize.calibration_batches(train_x, recipe, args.calibration, SEED)
    int8 = int8_variants(fp32_path, batches, args.variants)
    sessions = {"fp32": quantize.session(fp32_path.read_bytes())}
    sessions |= {f"int8 {name}": quantize.session(blob) for name, blob in int8.items()}
    print(f"{model_path.name}: {config['image_size']} px, width {config['width']}: accuracy on the test set")
    accuracy = quantize.accuracy(sessions, test_x, test_y, recipe)
    result = {
        "model": str(model_path),
        "image_size": config["image_size"],
        "width": config["width"],
        "parameters": parameters,
        "forward_multiply_adds": macs,
        "bytes": {"fp32": fp32_path.stat().st_size} | {f"int8 {n}": len(b) for n, b in int8.items()},
        "test_images": len(test_y),
        "accuracy_center_crop": accuracy,
        "accuracy_drop_points": {n: 100 * (accuracy["fp32"] - a) for n, a in accuracy.items() if n != "fp32"},
    }
    for size in (1, 64):
        batch = augment.preprocess(test_x[:size], recipe).numpy()
        speeds = timed_turns(sessions, batch, args.rounds, args.turn_seconds)
        entry = {"img_per_s": {n: statistics.median(v) for n, v in speeds.items()}, "by_round": speeds}
        for name in sessions:
            if name != "fp32":
                ratios = [a / b for a, b in zip(speeds[name], speeds["fp32"], strict=True)]
                entry[f"{name} vs fp32"] = {"median": statistics.median(ratios), "by_round": ratios}
        result[f"batch_{size}"] = entry
        print(f"  batch {size}: " + ", ".join(f"{n} {v:.1f} img/s" for n, v in entry["img_per_s"].items()))
        for name in int8:
            ratio = entry[f"int8 {name} vs fp32"]
            low, high = min(ratio["by_round"]), max(ratio["by_round"])
            print(f"    int8 {name}: {ratio['median']:.2f}× fp32 (rounds {low:.2f}–{high:.2f})")
    for name, drop in result["accuracy_drop_points"].items():
        print(f"  {name}: accuracy {accuracy[name]:.4f} vs fp32 {accuracy['fp32']:.4f} ({drop:+.2f} points)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--turn-seconds", type=float, default=1.0)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    data = bench_train.read_fashion_mnist(args.data)
    result = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "machine": platform.processor() or platform.machine(),
        "onnxruntime": ort.__version__,
        "threads": "onnxruntime default (one per core), as the server",
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        for path in args.models:
            result["models"].append(measure(path, data, args, Path(tmp)))
    bench_train.write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
