"""ONNX export: dynamic batch, metadata, dropout off, onnxruntime parity."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from alexops import export
from alexops.augment import Recipe
from alexops.model import AlexNet


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    model = AlexNet(1, 10, image_size=67, width=0.125, init="kaiming").eval()
    proto = export.to_onnx(model, torch.zeros(2, 1, 67, 67), opset=18)
    recipe = Recipe.create(67, 256 / 224, [0.3], [0.35])
    export.add_metadata(proto, [f"c{i}" for i in range(10)], recipe.as_dict(), {"width": 0.125})
    onnx.checker.check_model(proto)
    return model, proto


def test_onnxruntime_matches_pytorch_at_batch_1_and_n(exported):
    model, proto = exported
    diffs = export.parity(proto, model, (1, 67, 67), seed=3)
    assert set(diffs) == set(export.PARITY_BATCHES)
    assert max(diffs.values()) <= 1e-4


def test_exported_graph_has_no_dropout_and_is_deterministic(exported):
    _, proto = exported
    assert not [n for n in proto.graph.node if n.op_type == "Dropout"]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((4, 1, 67, 67)).astype(np.float32)
    first, second = (session.run(None, {"image": x})[0] for _ in range(2))
    assert np.array_equal(first, second)


def test_batch_axis_is_dynamic_and_metadata_is_present(exported):
    _, proto = exported
    (graph_input,) = proto.graph.input
    assert graph_input.name == "image" and proto.graph.output[0].name == "logits"
    batch_dim = graph_input.type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"])[3] == "c3"
    assert json.loads(meta["preprocessing"])["image_size"] == 67
    assert json.loads(meta["preprocessing"])["resize"] == 77


def test_the_file_names_no_path_of_this_checkout(exported):
    """torch's exporter records each node's Python stack trace: the same weights then gave other
    bytes in every clone, and a served model told where it was built."""
    _, proto = exported
    root = str(Path(export.__file__).resolve().parents[2])
    assert root.encode() not in proto.SerializeToString()
    assert not [n.name for n in proto.graph.node if n.metadata_props]


def test_parity_detects_a_model_that_differs(exported):
    model, proto = exported
    other = AlexNet(1, 10, image_size=67, width=0.125, init="kaiming").eval()
    assert max(export.parity(proto, other, (1, 67, 67), seed=3).values()) > 1e-4
    assert model is not other
