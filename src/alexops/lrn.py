"""Local Response Normalisation (Krizhevsky, Sutskever, Hinton 2012, section 3.3), made fast.

    b_c = a_c / (k + alpha/n * sum_{c' in window(c)} a_c'^2) ** beta

The window covers ``n = size`` neighbouring channels, zero-padded at the edges; like
``torch.nn.LocalResponseNorm`` it starts ``n // 2`` channels before ``c`` and ends
``(n - 1) // 2`` after it, so for even ``n`` it leans towards lower channels.

PyTorch builds the window sum with ``avg_pool3d`` on a padded copy of the square and lets
autograd differentiate the chain: several full-size temporaries and kernels. Here an
autograd Function with the analytic gradient

    d = k + alpha/n * S(x^2),  y = x d^-beta,
    grad_x = g d^-beta - (2 alpha beta / n) x S'(g x d^(-beta-1))

(S' is the window sum transposed) does the work, tuned per device:

* CPU: every pass is a memory-bound elementwise op. The batch is walked in cache-sized
  chunks and the window sum is ``n - 1`` in-place adds of channel-shifted slices; d's
  powers are saved, so the backward makes 8 passes over the data instead of 18.
* GPU: memory is pooled and kernel launches dominate, so the whole batch is done at once,
  the window sum is one reduction over an unfolded view, and d's powers are saved.

Under ``torch.compile`` a plain tensor-ops formula is used instead, which traces cleanly and
which the compiler fuses by itself; under ``torch.export`` (hence ONNX export) a variant of it
whose window sum is a 1×1 convolution, which onnxruntime runs fastest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Paper constants in PyTorch's parametrisation. The paper writes alpha * sum(a^2) with
# alpha = 1e-4; PyTorch divides alpha by n, so the same layer is alpha = 5 * 1e-4 here.
PAPER_SIZE = 5
PAPER_ALPHA = 5e-4
PAPER_BETA = 0.75
PAPER_K = 2.0

# Elements per CPU chunk (4 MiB of float32 per tensor). Measured on a 2-core EPYC: 2**19
# and 2**20 tie, larger chunks fall out of cache (whole batch is ~1.8x slower). Larger
# chunks mean fewer ops, which matters only when other processes compete for the cores.
_CHUNK_ELEMENTS = 1 << 20


# --------------------------------------------------------------------------- plain formula
def _window_sum(t: Tensor, size: int, before: int) -> Tensor:
    """Sum over ``size`` channels (dim 1) starting ``before`` channels earlier, zero-padded."""
    channels = t.shape[1]
    pad = [0, 0] * (t.dim() - 2) + [before, size - 1 - before]
    padded = F.pad(t, pad)
    total = padded.narrow(1, 0, channels)
    for i in range(1, size):
        total = total + padded.narrow(1, i, channels)
    return total


def _plain_forward(x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    # Only ops that torch.export / ONNX and inductor handle natively (pad, slice, add, pow).
    denom = _window_sum(x * x, size, size // 2) * (alpha / size) + k
    return x * denom.pow(-beta)


def _export_forward(x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    """The plain formula, shaped for onnxruntime: the window sum as a 1×1 convolution of x^2
    with a banded C×C weight, and d^-0.75 as 1/sqrt(d sqrt(d)). Measured on a 2-core CPU,
    onnxruntime runs the whole AlexNet 1.5× faster this way than with slices and Pow."""
    if x.dim() != 4:
        return _plain_forward(x, size, alpha, beta, k)
    channels = torch.arange(x.shape[1], device=x.device)
    offset = channels[None, :] - channels[:, None]  # input channel - output channel
    band = (offset >= -(size // 2)) & (offset <= (size - 1) // 2)
    weight = band.to(x.dtype)[:, :, None, None] * (alpha / size)
    denom = F.conv2d(x * x, weight) + k
    if beta == 0.75 and x.dtype in (torch.float32, torch.float64):  # d·sqrt(d) overflows fp16
        return x / torch.sqrt(denom * torch.sqrt(denom))
    return x * denom.pow(-beta)


def _plain_backward(x: Tensor, grad: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    """Analytic gradient with differentiable ops, used when a double backward is requested."""
    denom = _window_sum(x * x, size, size // 2) * (alpha / size) + k
    scale = denom.pow(-beta)
    # Each input channel feeds the outputs whose window contains it: the transposed window
    # starts (size - 1) // 2 channels before (differs from the forward only for even size).
    spread = _window_sum(grad * x * scale / denom, size, (size - 1) // 2)
    return grad * scale - (2.0 * alpha * beta / size) * x * spread


# --------------------------------------------------------------------------- eager kernels
def _is_cpu(t: Tensor) -> bool:
    """Picks the CPU or the GPU strategy (tests flip it to run the GPU one on CPU)."""
    return t.device.type == "cpu"


def _memory_format(x: Tensor) -> torch.memory_format:
    # Channels-last activations stay channels-last: channel slices are then strided views,
    # which the elementwise kernels handle without a layout round trip.
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# CPU: every pass is a memory-bound elementwise op. So the batch is walked in chunks that
# stay in cache, outputs double as scratch, and the window sum is a few in-place adds of
# channel-shifted slices (no padded copy). For a backward, d^-b and d^(-b-1) are saved:
# two more full-size tensors, which cost page faults on first touch unless malloc keeps
# freed memory, as training sets it up to (`train.keep_freed_memory`). There, forward and
# backward ran ×1.16-1.33 faster than with d recomputed in the backward, at the default
# model's and the paper's LRN shapes, with the same bits (`benchmarks/bench_lrn.py`).
def _cpu_rows(x: Tensor) -> int:
    return max(1, min(x.shape[0], _CHUNK_ELEMENTS // max(1, x[0].numel())))


def _spans(n: int, rows: int) -> list[tuple[int, int]]:
    return [(start, min(rows, n - start)) for start in range(0, n, rows)]


def _add_shifted(
    dst: Tensor, src: Tensor, shift: int, factor: Tensor | None = None, value: float = 1.0
) -> None:
    """``dst[:, c] += value * src[:, c + shift] (* factor[:, c])`` where c + shift exists."""
    channels = dst.shape[1]
    if abs(shift) >= channels:
        return
    lo, length = max(0, -shift), channels - abs(shift)
    target, source = dst.narrow(1, lo, length), src.narrow(1, lo + shift, length)
    if factor is None:
        target.add_(source, alpha=value)
    else:
        target.addcmul_(factor.narrow(1, lo, length), source, value=value)


def _cpu_denominator(x: Tensor, scratch: Tensor, out: Tensor, size: int, alpha: float, k: float) -> Tensor:
    """``out = k + alpha/n * sum of x^2 over channels c - n//2 .. c + (n-1)//2``."""
    zero = torch.zeros((), dtype=x.dtype)
    torch.addcmul(zero, x, x, value=alpha / size, out=scratch)  # one pass for alpha/n x^2
    torch.add(scratch, k, out=out)
    for shift in range(-(size // 2), size - size // 2):
        if shift:
            _add_shifted(out, scratch, shift)
    return out


def _cpu_inverse_power(denom: Tensor, beta: float, out: Tensor) -> Tensor:
    """``out = denom ** -beta``; CPU pow is ~3x slower than sqrt/rsqrt, so 0.75 is special."""
    if beta != 0.75:
        return torch.pow(denom, -beta, out=out)
    return torch.sqrt(denom, out=out).mul_(denom).rsqrt_()  # (d * d^0.5) ** -0.5


def _cpu_forward(
    x: Tensor, size: int, alpha: float, beta: float, k: float, for_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(y, d^-b, d^(-b-1)); the powers only when a backward will need them."""
    y = torch.empty_like(x)
    rows = _cpu_rows(x)
    if for_grad:
        scale, scale_over_d = torch.empty_like(x), torch.empty_like(x)
    else:
        scratch = torch.empty_like(x[:rows])
    for start, m in _spans(x.shape[0], rows):
        xc, yc = x.narrow(0, start, m), y.narrow(0, start, m)  # yc holds alpha/n x^2 meanwhile
        if for_grad:
            qc, qdc = scale.narrow(0, start, m), scale_over_d.narrow(0, start, m)
            denom = _cpu_denominator(xc, yc, qdc, size, alpha, k)
            torch.mul(_cpu_inverse_power(denom, beta, out=qc), xc, out=yc)
            torch.div(qc, denom, out=qdc)  # d's memory becomes d^(-b-1)
        else:
            denom = _cpu_denominator(xc, yc, scratch[:m], size, alpha, k)
            _cpu_inverse_power(denom, beta, out=yc).mul_(xc)
    return (y, scale, scale_over_d) if for_grad else (y, None, None)


def _cpu_backward(
    x: Tensor, grad: Tensor, scale: Tensor, scale_over_d: Tensor, size: int, alpha: float, beta: float
) -> Tensor:
    """grad_x = g q - (2ab/n) x S'(g x q / d), with q = d^-b and S' the transposed window."""
    grad_x = torch.empty_like(x)
    rows = _cpu_rows(x)
    scratch = torch.empty_like(x[:rows])
    coeff = -2.0 * alpha * beta / size
    for start, m in _spans(x.shape[0], rows):
        xc, gc, gxc, qc, qdc = (t.narrow(0, start, m) for t in (x, grad, grad_x, scale, scale_over_d))
        spread = torch.mul(qdc, gc, out=scratch[:m]).mul_(xc)  # g x q / d
        torch.mul(qc, gc, out=gxc)
        # Output c's window holds input c + j, j in -(n//2) .. (n-1)//2, so input c
        # collects from outputs c - j.
        for shift in range(-(size // 2), size - size // 2):
            _add_shifted(gxc, spread, -shift, xc, coeff)
    return grad_x


# GPU: memory is pooled by the caching allocator and kernel launches dominate at AlexNet
# sizes, so the whole batch is done at once, the window sum is one reduction over an
# unfolded padded buffer, and d's powers are saved for the backward.
def _padded(like: Tensor, size: int, before: int, fill: float) -> tuple[Tensor, Tensor]:
    """Buffer with ``size - 1`` extra channels (pads set to ``fill``) and its inner view."""
    channels = like.shape[1]
    shape = (like.shape[0], channels + size - 1, *like.shape[2:])
    buf = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=_memory_format(like))
    buf.narrow(1, 0, before).fill_(fill)
    buf.narrow(1, before + channels, size - 1 - before).fill_(fill)
    return buf, buf.narrow(1, before, channels)


def _window_total(buf: Tensor, size: int) -> Tensor:
    """``out[:, c] = sum(buf[:, c : c + size])`` in one kernel."""
    return buf.unfold(1, size, 1).sum(dim=-1)


def _gpu_forward(
    x: Tensor, size: int, alpha: float, beta: float, k: float, for_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(y, d^-b, d^(-b-1)); the powers only when a backward will need them."""
    # Pads hold k/n: every window then sums n entries of (k/n + alpha/n x^2), i.e. d.
    squares, inner = _padded(x, size, size // 2, k / size)
    share = torch.full((), k / size, dtype=x.dtype, device=x.device)
    torch.addcmul(share, x, x, value=alpha / size, out=inner)
    denom = _window_total(squares, size)
    scale = denom.pow(-beta)
    y = x * scale
    if not for_grad:
        return y, None, None
    return y, scale, scale.div(denom)


def _gpu_backward(
    x: Tensor, grad: Tensor, scale: Tensor, scale_over_d: Tensor, size: int, alpha: float, beta: float
) -> Tensor:
    spread, inner = _padded(x, size, (size - 1) // 2, 0.0)  # transposed window
    torch.mul(grad, x, out=inner).mul_(scale_over_d)
    total = _window_total(spread, size)
    return torch.mul(grad, scale).addcmul_(x, total, value=-2.0 * alpha * beta / size)


class _LocalResponseNormFn(torch.autograd.Function):
    """Analytic forward/backward; saves x, d^-b and d^(-b-1)."""

    @staticmethod
    def forward(ctx, x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:  # type: ignore[override]
        ctx.hyper = (size, alpha, beta, k)
        forward = _cpu_forward if _is_cpu(x) else _gpu_forward
        y, scale, scale_over_d = forward(x, size, alpha, beta, k, for_grad=True)
        ctx.save_for_backward(x, scale, scale_over_d)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:  # type: ignore[override]
        x, scale, scale_over_d = ctx.saved_tensors
        size, alpha, beta, k = ctx.hyper
        if torch.is_grad_enabled():
            # create_graph=True: build the gradient from differentiable ops (double backward).
            return _plain_backward(x, grad, size, alpha, beta, k), None, None, None, None
        grad = grad.contiguous(memory_format=_memory_format(x))
        backward = _cpu_backward if _is_cpu(x) else _gpu_backward
        return backward(x, grad, scale, scale_over_d, size, alpha, beta), None, None, None, None


# --------------------------------------------------------------------------- public API
def local_response_norm(
    x: Tensor,
    size: int = PAPER_SIZE,
    alpha: float = PAPER_ALPHA,
    beta: float = PAPER_BETA,
    k: float = PAPER_K,
) -> Tensor:
    """Same values and gradients as ``torch.nn.functional.local_response_norm``, faster.

    Accepts (N, C, *) input (NCHW or channels_last); the output keeps the memory format.
    """
    if x.dim() < 3:
        raise ValueError(f"local_response_norm expects (N, C, *) input, got {x.dim()}-D")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not x.is_floating_point():
        raise TypeError(f"local_response_norm needs a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        return x.clone()
    # The eager path writes into views with out=; tracers want plain functional ops.
    if torch.compiler.is_exporting():
        return _export_forward(x, size, alpha, beta, k)
    if torch.compiler.is_compiling():
        return _plain_forward(x, size, alpha, beta, k)
    x = x.contiguous(memory_format=_memory_format(x))
    if torch.is_grad_enabled() and x.requires_grad:
        return _LocalResponseNormFn.apply(x, size, alpha, beta, k)
    forward = _cpu_forward if _is_cpu(x) else _gpu_forward
    return forward(x, size, alpha, beta, k, for_grad=False)[0]


class LocalResponseNorm(nn.Module):
    """Drop-in for ``torch.nn.LocalResponseNorm`` with the AlexNet paper's defaults."""

    def __init__(
        self,
        size: int = PAPER_SIZE,
        alpha: float = PAPER_ALPHA,
        beta: float = PAPER_BETA,
        k: float = PAPER_K,
    ) -> None:
        super().__init__()
        self.size = size
        self.alpha = alpha
        self.beta = beta
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        return local_response_norm(x, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"
