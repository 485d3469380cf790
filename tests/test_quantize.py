"""Stage `quantize`: static QDQ int8 on tiny prepared data, its report, and the accuracy gate."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from alexops import augment, export, inference, params, quantize, tracking
from alexops.errors import AlexopsError
from alexops.model import AlexNet
from alexops.paths import Paths
from alexops.prepare import load_split


@pytest.fixture
def exported(prepared):
    """The tiny project root with a (random-weight) tiny AlexNet exported where export puts it."""
    loaded = params.load(prepared / "params.yaml")
    paths = Paths(prepared, loaded.base.dataset)
    stats = json.loads((paths.prepared / "stats.json").read_text())
    recipe = augment.Recipe.create(67, loaded.train.resize_ratio, stats["mean"], stats["std"])
    torch.manual_seed(0)
    net = AlexNet(1, 10, image_size=67, width=0.0625, init="kaiming").eval()
    proto = export.to_onnx(net, torch.zeros(2, 1, 67, 67), opset=18)
    export.add_metadata(proto, stats["classes"], recipe.as_dict(), {"width": 0.0625})
    paths.artifacts.mkdir(parents=True, exist_ok=True)
    paths.onnx.write_bytes(proto.SerializeToString())
    with tracking.new_run(loaded, paths):  # the model's run, as train opens it
        pass
    # nothing leaks into this process's later runs (mlflow.set_experiment would export its id)
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ
    return loaded, paths, recipe


def test_quantize_writes_a_qdq_int8_model_that_runs_and_reports_both(exported):
    loaded, paths, recipe = exported
    quantize.run(loaded, paths)

    proto = onnx.load(str(paths.int8_onnx))
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert ops["Conv"] == 5 + 2 and ops["Gemm"] == 3  # the layers stay, now between Q/DQ pairs
    kept_float = quantize.float_convs(proto)  # conv1, conv2 and the LRNs' window sums
    assert len(kept_float) == 4
    floats = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert all(n.input[1] in floats for n in proto.graph.node if n.name in kept_float)
    int8_tensors = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    dequantized = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    layers = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    int8_layers = [n for n in layers if dequantized.get(n.input[1]) in int8_tensors]
    assert len(int8_layers) == 6  # conv3-5 and the three fully connected layers hold int8 weights

    images, labels = load_split(paths.prepared / "test.pt")
    x = augment.preprocess(images[:16], recipe).numpy()
    int8 = ort.InferenceSession(str(paths.int8_onnx), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(str(paths.onnx), providers=["CPUExecutionProvider"])
    got, want = int8.run(None, {"image": x})[0], fp32.run(None, {"image": x})[0]
    assert got.shape == (16, 10) and np.isfinite(got).all()
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()  # close to fp32, not equal to it
    assert not np.array_equal(got, want)
    served = inference.load_model(paths.int8_onnx.read_bytes(), name="int8", version=None, uri="int8")
    assert served.classes == tuple(json.loads((paths.prepared / "stats.json").read_text())["classes"])

    report = json.loads((paths.reports / "quantize.json").read_text())
    assert report["test_images"] == len(labels) == 80
    assert report["calibration_images"] == loaded.quantize.calibration_images == 64
    everything = augment.preprocess(images, recipe).numpy()  # one batch, as the stage runs 80 images
    for name, session in {"fp32": fp32, "int8": int8}.items():
        predicted = session.run(None, {"image": everything})[0].argmax(1)
        assert report[f"accuracy_{name}"] == pytest.approx((predicted == labels.numpy()).mean())
    assert report["accuracy_drop_points"] == pytest.approx(
        100 * (report["accuracy_fp32"] - report["accuracy_int8"])
    )
    assert (
        report["int8_bytes"]
        == paths.int8_onnx.stat().st_size
        < report["fp32_bytes"]
        == paths.onnx.stat().st_size
    )
    assert report["fp32_images_per_s"] > 0 and report["int8_images_per_s"] > 0
    assert report["int8_ops"]["QuantizeLinear"] == ops["QuantizeLinear"]


def test_the_gate_allows_at_most_the_configured_drop():
    quantize.check_drop(0.900, 0.896, 0.005, 10000)  # 0.4 points
    quantize.check_drop(0.900, 0.910, 0.0, 10000)  # int8 better: no drop
    with pytest.raises(AlexopsError, match=r"1\.00 points below.*quantize\.max_accuracy_drop 0\.50 points"):
        quantize.check_drop(0.900, 0.890, 0.005, 10000)
    # the fix names the cause: a limit tightened below its default, or the calibration
    with pytest.raises(AlexopsError, match=r"max_accuracy_drop is 0\.10 points, set below its default 0\.50"):
        quantize.check_drop(0.900, 0.897, 0.001, 10000)
    with pytest.raises(AlexopsError, match=r"Fix: raise quantize\.calibration_images") as raised:
        quantize.check_drop(0.900, 0.890, 0.005, 10000)
    assert "set below its default" not in str(raised.value)
    with pytest.raises(AlexopsError, match=r"Fix: keep conv1 and conv2 float \(quantize\.float_layers: \["):
        quantize.check_drop(0.900, 0.890, 0.005, 10000, float_layers=())  # the paper-size presets' all-int8


def test_on_a_small_test_set_the_gate_allows_one_image():
    """One image of 18 is 5.56 points, more than any sensible limit: the gate lets one image go
    and names the test set's size as the cause when more go."""
    quantize.check_drop(12 / 18, 11 / 18, 0.005, 18)
    with pytest.raises(AlexopsError, match=r"the test set has 18 images, so one image is 5\.56 points"):
        quantize.check_drop(12 / 18, 10 / 18, 0.005, 18)
    with pytest.raises(AlexopsError, match=r"0\.02 points below"):  # 2 images of 10,000 > 0.01 points
        quantize.check_drop(0.5, 0.4998, 0.0, 10000)


def test_quantize_without_an_exported_model_names_the_stage_to_run(prepared):
    loaded = params.load(prepared / "params.yaml")
    with pytest.raises(AlexopsError, match=r"model\.onnx is missing.*dvc repro export"):
        quantize.run(loaded, Paths(prepared, loaded.base.dataset))
