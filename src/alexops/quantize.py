"""Stage `quantize`: an int8 copy of the ONNX model by static QDQ quantisation.

onnxruntime's `quantize_static` puts QuantizeLinear/DequantizeLinear pairs around
conv3-5, the fully connected layers, ReLUs and pools (weights int8 per output channel,
activations uint8 with ranges calibrated on training images through the same
preprocessing as the test). The int8 model is kept only if its centre-crop accuracy on the whole prepared test
set is within `quantize.max_accuracy_drop` of the fp32 model's; the report also holds the
file sizes and the throughput of both on this machine at batch 64 (every test image, when fewer).
"""

from __future__ import annotations

import collections
import logging
import statistics
import tempfile
import time
from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from alexops import augment, files, inference, tracking
from alexops.errors import AlexopsError
from alexops.params import Params, QuantizeParams
from alexops.paths import Paths
from alexops.prepare import load_split

# The layers that hold the compute and the weights. The LRN (its window-sum Conv over
# squared activations, Sqrt, Div) stays float: its dynamic range is what int8 handles worst;
# so do the two convolutions that feed it (see float_convs).
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "MaxPool", "Relu"]
DEFAULT_FLOAT_LAYERS = QuantizeParams().float_layers  # conv1, conv2: their outputs feed the LRNs
CALIBRATION_BATCH = 64
EVALUATION_BATCH = 256
THROUGHPUT_BATCH = 64
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class CalibrationImages(CalibrationDataReader):
    """Feeds preprocessed batches to onnxruntime's calibrator, one per call."""

    def __init__(self, batches: list[np.ndarray], input_name: str) -> None:
        self._feeds = iter([{input_name: batch} for batch in batches])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def calibration_batches(
    images: torch.Tensor, recipe: augment.Recipe, count: int, seed: int
) -> list[np.ndarray]:
    """A seeded sample of `count` training images, preprocessed as at test time, in batches."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(images), generator=generator)[: min(count, len(images))]
    sample = images[chosen.sort().values]
    return [
        augment.preprocess(sample[i : i + CALIBRATION_BATCH], recipe).numpy()
        for i in range(0, len(sample), CALIBRATION_BATCH)
    ]


def quantize(
    fp32_model: Path,
    batches: list[np.ndarray],
    input_name: str,
    float_layers: Collection[str] = DEFAULT_FLOAT_LAYERS,
) -> onnx.ModelProto:
    """The static-QDQ int8 model, metadata (classes, recipe) carried over from the fp32 one;
    the convolutions named in `float_layers` and the LRNs stay float (see float_convs)."""
    fp32 = onnx.load(str(fp32_model), load_external_data=False)
    with tempfile.TemporaryDirectory(prefix="alexops-quantize-") as tmp:
        output = Path(tmp) / "model.int8.onnx"
        # onnxruntime logs a hint to run its pre-processing first: measured here, it changed nothing
        logging.disable(logging.WARNING)
        try:
            quantize_static(
                str(fp32_model),
                str(output),
                CalibrationImages(batches, input_name),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=QUANTIZED_OPS,
                nodes_to_exclude=float_convs(fp32, float_layers),
                per_channel=True,
                # uint8 activations × int8 weights: onnxruntime's x86 kernels fuse all five convs into
                # QLinearConv this way (int8 × int8 fused only three here) and ran 1.2× faster, same accuracy
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        finally:
            logging.disable(logging.NOTSET)
        proto = onnx.load(str(output))
    del proto.metadata_props[:]
    proto.metadata_props.extend(fp32.metadata_props)
    proto.metadata_props.append(onnx.StringStringEntryProto(key="quantization", value="int8 static QDQ"))
    return proto


def float_convs(proto: onnx.ModelProto, layers: Collection[str] = DEFAULT_FLOAT_LAYERS) -> list[str]:
    """The convolutions that stay float: each LRN's window sum (a 1×1 Conv over x · x, see
    lrn._export_forward) and the paper's convolutions named in `layers` ("conv1" … "conv5",
    counted in graph order without the window sums). By default conv1 and conv2, whose ReLU
    outputs the LRNs normalise: measured on a 2-core CPU at 99 px and width 0.25, the int8
    model ran 1.4× faster with those two float."""
    producer = {output: node for node in proto.graph.node for output in node.output}
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    kept, number = [], 0
    for conv in (n for n in proto.graph.node if n.op_type == "Conv"):
        square = producer.get(conv.input[0])
        window_sum = (
            square is not None
            and square.op_type == "Mul"
            and square.input[0] == square.input[1]
            and shapes.get(conv.input[1], [])[2:] == [1, 1]
        )
        if not window_sum:
            number += 1
        if window_sum or f"conv{number}" in layers:
            kept.append(conv.name)
    return kept


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(collections.Counter(node.op_type for node in proto.graph.node).items()))


def session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, inference.session_options(0), providers=["CPUExecutionProvider"])


def accuracy(
    sessions: dict[str, ort.InferenceSession],
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: augment.Recipe,
) -> dict[str, float]:
    """Centre-crop test accuracy of each session, the batches preprocessed once for all."""
    correct = dict.fromkeys(sessions, 0)
    for start in range(0, len(images), EVALUATION_BATCH):
        x = augment.preprocess(images[start : start + EVALUATION_BATCH], recipe).numpy()
        truth = labels[start : start + EVALUATION_BATCH].numpy()
        for name, s in sessions.items():
            logits = s.run(None, {s.get_inputs()[0].name: x})[0]
            correct[name] += int((logits.argmax(1) == truth).sum())
    return {name: count / len(labels) for name, count in correct.items()}


def throughput(s: ort.InferenceSession, x: np.ndarray, repeats: int = 10) -> float:
    """Images per second at the batch of `x`: the median of `repeats` timed runs after a warm-up."""
    feed = {s.get_inputs()[0].name: x}
    for _ in range(2):
        s.run(None, feed)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - started)
    return len(x) / statistics.median(times)


def drop_fix(max_drop: float, test_images: int, float_layers: Collection[str] = DEFAULT_FLOAT_LAYERS) -> str:
    """Name the actual cause: a limit the user tightened, a test set too small to measure the
    limit, the LRNs' input convolutions made int8, or calibration that fell short."""
    default = QuantizeParams().max_accuracy_drop
    if max_drop < default:
        return (
            f"quantize.max_accuracy_drop is {100 * max_drop:.2f} points, set below its default "
            f"{100 * default:.2f} in params.yaml; raise it back, or raise quantize.calibration_images."
        )
    if 1 / test_images > max_drop:
        return (
            f"the test set has {test_images} images, so one image is {100 / test_images:.2f} points and "
            "the int8 model missed more than one of them: add test images, or raise "
            "quantize.max_accuracy_drop in params.yaml if this drop is acceptable."
        )
    if not set(DEFAULT_FLOAT_LAYERS) <= set(float_layers):  # the paper-size presets make them int8
        return (
            "keep conv1 and conv2 float (quantize.float_layers: [conv1, conv2], the default: their "
            "outputs feed the LRNs), or raise quantize.calibration_images."
        )
    return "raise quantize.calibration_images (more training images set the int8 ranges)."


def check_drop(
    fp32: float,
    int8: float,
    max_drop: float,
    test_images: int,
    float_layers: Collection[str] = DEFAULT_FLOAT_LAYERS,
) -> None:
    """The gate: int8 accuracy may be lower than fp32's by at most `max_drop` (a fraction), or by
    one image of the `test_images` where the test set is too small to measure less (a small
    folder's: with 18 test images, one is 5.6 points)."""
    allowed = max(max_drop, 1 / test_images)
    if fp32 - int8 > allowed + 1e-12:
        raise AlexopsError(
            f"int8 test accuracy {int8:.2%} is {100 * (fp32 - int8):.2f} points below fp32's {fp32:.2%}, "
            f"more than quantize.max_accuracy_drop {100 * max_drop:.2f} points. No int8 model was written. "
            f"Fix: {drop_fix(max_drop, test_images, float_layers)}"
        )


def run(params: Params, paths: Paths) -> None:
    check_inputs(paths)
    with tracking.continue_run(params, paths, "quantize") as mlflow:
        report = quantize_stage(params, paths)
        numbers = {k: v for k, v in report.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        with tracking.store_write(mlflow):
            mlflow.log_metrics({f"quantize_{k}": float(v) for k, v in numbers.items()})


def check_inputs(paths: Paths) -> None:
    """The exported model must exist before anything is opened or recorded."""
    if not paths.onnx.exists():
        raise AlexopsError(f"{paths.onnx} is missing. Fix: run `dvc repro export` first.")


def quantize_stage(params: Params, paths: Paths) -> dict:
    """Quantise, check the accuracy drop, write model.int8.onnx and quantize.json (after `check_inputs`)."""
    fp32_bytes = paths.onnx.read_bytes()
    fp32_model = inference.load_model(fp32_bytes, name="fp32", version=None, uri=str(paths.onnx))
    train_images, _ = load_split(paths.prepared / "train.pt")
    batches = calibration_batches(
        train_images, fp32_model.recipe, params.quantize.calibration_images, params.base.seed
    )
    proto = quantize(paths.onnx, batches, fp32_model.input.name, params.quantize.float_layers)
    int8_bytes = proto.SerializeToString()
    sessions = {"fp32": fp32_model.session, "int8": session(int8_bytes)}
    test_images, test_labels = load_split(paths.prepared / "test.pt")
    acc = accuracy(sessions, test_images, test_labels, fp32_model.recipe)
    opts = params.quantize
    check_drop(acc["fp32"], acc["int8"], opts.max_accuracy_drop, len(test_labels), opts.float_layers)
    files.write_bytes(paths.int8_onnx, int8_bytes)
    report = make_report(acc, sessions, test_images, fp32_model.recipe, len(fp32_bytes), len(int8_bytes))
    report |= {"calibration_images": sum(len(b) for b in batches), "test_images": len(test_labels)}
    report["float_layers"] = list(params.quantize.float_layers)
    report["int8_ops"] = {op: n for op, n in op_counts(proto).items() if op in QDQ_OPS}
    files.write_json(paths.reports / "quantize.json", report)
    batch = report["throughput_batch"]  # THROUGHPUT_BATCH, or every test image when fewer
    print(
        f"quantize: {paths.int8_onnx} ({len(int8_bytes) / 1e6:.1f} MB), test accuracy int8 {acc['int8']:.4f} "
        f"vs fp32 {acc['fp32']:.4f}, batch-{batch} speed-up {report['int8_speedup']:.2f}×"
    )
    return report


def make_report(
    acc: dict[str, float],
    sessions: dict[str, ort.InferenceSession],
    images: torch.Tensor,
    recipe: augment.Recipe,
    fp32_size: int,
    int8_size: int,
) -> dict:
    batch = augment.preprocess(images[:THROUGHPUT_BATCH], recipe).numpy()
    speed = {name: throughput(s, batch) for name, s in sessions.items()}
    return {
        "accuracy_fp32": acc["fp32"],
        "accuracy_int8": acc["int8"],
        "accuracy_drop_points": 100 * (acc["fp32"] - acc["int8"]),
        "fp32_bytes": fp32_size,
        "int8_bytes": int8_size,
        "size_ratio": fp32_size / int8_size,
        "throughput_batch": len(batch),
        "fp32_images_per_s": speed["fp32"],
        "int8_images_per_s": speed["int8"],
        "int8_speedup": speed["int8"] / speed["fp32"],
    }
