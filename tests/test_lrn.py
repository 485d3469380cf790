"""alexops.lrn against torch.nn.LocalResponseNorm: values, gradients, layouts, ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alexops import lrn
from alexops.lrn import LocalResponseNorm, local_response_norm

# (shape, size, alpha, beta, k). Inputs are scaled by 10 (post-ReLU activations are large),
# so the window term moves the result by far more than the tolerance: an off-by-one window
# or a wrong edge pad fails these checks.
CASES = [
    ((2, 96, 9, 9), 5, 5e-4, 0.75, 2.0),  # conv1-like, paper constants
    ((3, 7, 5, 6), 5, 5e-4, 0.75, 2.0),  # odd channel count
    ((1, 8, 4, 4), 5, 5e-4, 0.75, 2.0),  # batch 1
    ((2, 8, 4, 5), 4, 1e-2, 0.75, 1.0),  # even size: window leans to lower channels
    ((2, 9, 3, 3), 2, 5e-2, 0.5, 1.0),  # smallest even size
    ((2, 6, 3, 3), 3, 1e-1, 1.0, 1.5),  # other odd size and beta
    ((2, 3, 4, 4), 7, 1e-2, 0.75, 2.0),  # window wider than the channel count
    ((2, 5, 3, 3), 1, 1e-1, 0.75, 2.0),  # window of one channel
]
IDS = [f"{'x'.join(map(str, c[0]))}-n{c[1]}" for c in CASES]


def reference(size: int, alpha: float, beta: float, k: float) -> torch.nn.Module:
    return torch.nn.LocalResponseNorm(size, alpha, beta, k)


def inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * 10, torch.randn(shape, generator=gen)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # float32, relative 1e-5; the tiny atol only covers entries that are ~0 in both.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def grads(fn, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x, upstream)
    return y.detach(), gx


@pytest.mark.parametrize(("shape", "size", "alpha", "beta", "k"), CASES, ids=IDS)
def test_values_match_torch(shape, size, alpha, beta, k):
    x, _ = inputs(shape)
    close(local_response_norm(x, size, alpha, beta, k), reference(size, alpha, beta, k)(x))


@pytest.mark.parametrize(("shape", "size", "alpha", "beta", "k"), CASES, ids=IDS)
def test_gradients_match_torch(shape, size, alpha, beta, k):
    x, upstream = inputs(shape, seed=1)
    y, gx = grads(lambda t: local_response_norm(t, size, alpha, beta, k), x, upstream)
    y_ref, gx_ref = grads(reference(size, alpha, beta, k), x, upstream)
    close(y, y_ref)
    close(gx, gx_ref)


@pytest.mark.parametrize("size", [5, 4, 3])
def test_gradcheck_float64(size):
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)

    def fn(t):
        return local_response_norm(t, size, 0.3, 0.75, 1.0)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))  # create_graph takes the plain-ops backward


def test_channels_last_keeps_layout_and_matches():
    x, upstream = inputs((3, 10, 6, 5), seed=2)
    x_cl = x.to(memory_format=torch.channels_last)
    y, gx = grads(LocalResponseNorm(), x_cl, upstream.to(memory_format=torch.channels_last))
    y_ref, gx_ref = grads(reference(5, 5e-4, 0.75, 2.0), x, upstream)
    assert y.is_contiguous(memory_format=torch.channels_last)
    close(y, y_ref)
    close(gx, gx_ref)


def test_non_contiguous_input_and_expanded_upstream_gradient():
    x, _ = inputs((4, 9, 5, 3), seed=3)
    x = x.transpose(2, 3)  # neither contiguous nor channels_last
    upstream = torch.ones(()).expand(x.shape)  # what y.sum().backward() sends
    y, gx = grads(local_response_norm, x, upstream)
    y_ref, gx_ref = grads(reference(5, 5e-4, 0.75, 2.0), x, upstream)
    close(y, y_ref)
    close(gx, gx_ref)


@pytest.mark.parametrize("shape", [(2, 7, 11), (2, 6, 3, 2, 4)], ids=["3d", "5d"])
def test_other_ranks(shape):
    x, upstream = inputs(shape, seed=4)
    y, gx = grads(lambda t: local_response_norm(t, 4, 1e-2), x, upstream)
    y_ref, gx_ref = grads(reference(4, 1e-2, 0.75, 2.0), x, upstream)
    close(y, y_ref)
    close(gx, gx_ref)


def test_batch_split_into_uneven_chunks(monkeypatch):
    # Two samples per chunk over a batch of 5: the last chunk is partial.
    shape = (5, 12, 4, 3)
    monkeypatch.setattr(lrn, "_CHUNK_ELEMENTS", 2 * 12 * 4 * 3)
    x, upstream = inputs(shape, seed=5)
    y, gx = grads(lambda t: local_response_norm(t, 4, 1e-2), x, upstream)
    y_ref, gx_ref = grads(reference(4, 1e-2, 0.75, 2.0), x, upstream)
    close(y, y_ref)
    close(gx, gx_ref)
    close(local_response_norm(x, 4, 1e-2), y_ref)  # no-grad path too


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("size", [5, 4])
def test_gpu_strategy_on_cpu_tensors(monkeypatch, size, channels_last):
    # CI has no GPU: run the GPU strategy (whole batch, unfold-sum, saved powers) on CPU.
    monkeypatch.setattr(lrn, "_is_cpu", lambda t: False)
    x, upstream = inputs((3, 9, 4, 5), seed=9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y, gx = grads(lambda t: local_response_norm(t, size, 1e-2), x, upstream)
    y_ref, gx_ref = grads(reference(size, 1e-2, 0.75, 2.0), x, upstream)
    close(y, y_ref)
    close(gx, gx_ref)
    close(local_response_norm(x, size, 1e-2), y_ref)  # no-grad path


def test_module_defaults_are_the_paper_constants():
    module = LocalResponseNorm()
    assert (module.size, module.alpha, module.beta, module.k) == (5, 5e-4, 0.75, 2.0)
    assert repr(module) == "LocalResponseNorm(5, alpha=0.0005, beta=0.75, k=2.0)"
    x, _ = inputs((2, 16, 5, 5), seed=6)
    close(module(x), reference(5, 5e-4, 0.75, 2.0)(x))


def test_module_takes_torch_positional_arguments():
    x, _ = inputs((2, 11, 4, 4), seed=7)
    close(LocalResponseNorm(3, 1e-2, 0.5, 1.0)(x), torch.nn.LocalResponseNorm(3, 1e-2, 0.5, 1.0)(x))


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="3-D|2-D"):
        local_response_norm(torch.ones(4, 5))
    with pytest.raises(ValueError, match="size"):
        local_response_norm(torch.ones(1, 4, 2, 2), size=0)
    with pytest.raises(TypeError):
        local_response_norm(torch.ones(1, 4, 2, 2, dtype=torch.int64))


def test_empty_batch():
    assert local_response_norm(torch.ones(0, 4, 2, 2)).shape == (0, 4, 2, 2)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 12),
    hw=st.integers(1, 5),
    size=st.integers(1, 8),
    channels_last=st.booleans(),
)
def test_property_matches_torch(n, c, hw, size, channels_last):
    x, upstream = inputs((n, c, hw, hw + 1), seed=n * 100 + c)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y, gx = grads(lambda t: local_response_norm(t, size, 1e-2, 0.75, 2.0), x, upstream)
    y_ref, gx_ref = grads(reference(size, 1e-2, 0.75, 2.0), x, upstream)
    close(y, y_ref)
    close(gx, gx_ref)


@pytest.mark.parametrize(
    "size, alpha, beta, k",
    [(5, 5e-4, 0.75, 2.0), (4, 1.0, 0.75, 1.0), (3, 2.0, 0.6, 1.0)],  # large alpha: the window sum matters
)
def test_onnx_export_runs_in_onnxruntime(tmp_path, size, alpha, beta, k):
    path = tmp_path / "lrn.onnx"
    model = LocalResponseNorm(size, alpha, beta, k).eval()
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        model, (inputs((2, 10, 5, 5))[0],), str(path), dynamo=True,
        input_names=["x"], dynamic_shapes={"x": {0: batch}},
    )  # fmt: skip
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = {node.op_type for node in proto.graph.node}
    assert "Conv" in ops  # the window sum as a 1×1 convolution (lrn._export_forward)
    assert ("Pow" not in ops and "Sqrt" in ops) if beta == 0.75 else "Pow" in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x, _ = inputs((n, 10, 5, 5), seed=n)
        (out,) = session.run(None, {"x": x.numpy()})
        expected = reference(size, alpha, beta, k)(x).numpy()
        assert out.shape == expected.shape
        assert np.abs(out - expected).max() <= 1e-5


def test_torch_compile_matches_torch():
    # aot_eager runs dynamo + AOT autograd (the tracing path) without inductor's codegen cost.
    compiled = torch.compile(LocalResponseNorm(4, 1e-2), backend="aot_eager", fullgraph=True)
    x, upstream = inputs((2, 7, 3, 3), seed=8)
    y, gx = grads(compiled, x, upstream)
    y_ref, gx_ref = grads(reference(4, 1e-2, 0.75, 2.0), x, upstream)
    close(y, y_ref)
    close(gx, gx_ref)
