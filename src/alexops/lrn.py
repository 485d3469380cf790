"""Local Response Normalisation (Krizhevsky, Sutskever, Hinton 2012, section 3.3), made fast.

    b_c = a_c / (k + alpha/n * sum_{c' in window(c)} a_c'^2) ** beta

The window covers ``n = size`` neighbouring channels, zero-padded at the edges; like
``torch.nn.LocalResponseNorm`` it starts ``n // 2`` channels before ``c`` and ends
``(n - 1) // 2`` after it, so for even ``n`` it leans towards lower channels.

PyTorch builds the window sum with ``avg_pool3d`` on a padded copy of the square and lets
autograd differentiate the chain, which allocates several full-size temporaries. On CPU the
page faults for those fresh buffers cost more than the arithmetic, so the eager path here:

* sums the window as ``n`` shifted slices of one padded buffer,
* works through the batch in cache-sized chunks, so temporaries stay small and warm,
* uses an analytic backward that saves only ``x`` and recomputes the denominator per chunk.

Under ``torch.compile`` / ``torch.export`` (and hence ONNX export) a plain tensor-ops formula
is used instead, which traces cleanly and which the compiler fuses by itself.
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

# Elements per chunk on CPU: a few such buffers fit the L2 cache (measured on 2-core AMD EPYC;
# 2**18..2**20 were all within noise, far below un-chunked).
_CHUNK_ELEMENTS = 1 << 19


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


def _plain_backward(
    x: Tensor, grad: Tensor, size: int, alpha: float, beta: float, k: float
) -> Tensor:
    """Analytic gradient with differentiable ops, used when a double backward is requested."""
    denom = _window_sum(x * x, size, size // 2) * (alpha / size) + k
    scale = denom.pow(-beta)
    # Each input channel feeds the outputs whose window contains it: the transposed window
    # starts (size - 1) // 2 channels before (differs from the forward only for even size).
    spread = _window_sum(grad * x * scale / denom, size, (size - 1) // 2)
    return grad * scale - (2.0 * alpha * beta / size) * x * spread


# --------------------------------------------------------------------------- fast eager path
def _rows(t: Tensor, channels_last: bool) -> Tensor:
    """View ``t`` as 3-D (N, C, L) or, for channels_last 4-D, (N, L, C) without copying."""
    if channels_last:
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1])
    return t.reshape(t.shape[0], t.shape[1], -1)


def _is_channels_last(x: Tensor) -> bool:
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _dense(t: Tensor, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def _chunk_rows(x3: Tensor) -> int:
    if x3.device.type != "cpu":
        # GPU temporaries come from the caching allocator; fewer kernel launches win there.
        return x3.shape[0]
    per_sample = max(1, x3[0].numel())
    return max(1, min(x3.shape[0], _CHUNK_ELEMENTS // per_sample))


def _padded_buffer(x3: Tensor, rows: int, cdim: int, before: int, size: int, fill: float) -> Tensor:
    """Chunk-sized buffer with ``size - 1`` extra channels; only the pad stripes are filled."""
    shape = list(x3.shape)
    shape[0] = rows
    channels = shape[cdim]
    shape[cdim] = channels + size - 1
    buf = x3.new_empty(shape)
    buf.narrow(cdim, 0, before).fill_(fill)
    buf.narrow(cdim, before + channels, size - 1 - before).fill_(fill)
    return buf


def _sum_slices(buf: Tensor, cdim: int, size: int, out: Tensor) -> Tensor:
    channels = out.shape[cdim]
    if size == 1:
        return out.copy_(buf)
    torch.add(buf.narrow(cdim, 0, channels), buf.narrow(cdim, 1, channels), out=out)
    for i in range(2, size):
        out.add_(buf.narrow(cdim, i, channels))
    return out


def _inverse_power(denom: Tensor, beta: float, out: Tensor) -> Tensor:
    """``out = denom ** -beta``; pow is ~3x slower than sqrt/rsqrt on CPU, so special-case 0.75."""
    if beta == 0.75 and denom.device.type == "cpu":
        torch.sqrt(denom, out=out)
        return out.mul_(denom).rsqrt_()
    return torch.pow(denom, -beta, out=out)


class _Workspace:
    """Chunk-sized scratch tensors shared by every chunk of one call."""

    def __init__(self, x3: Tensor, cdim: int, size: int, alpha: float, k: float) -> None:
        self.cdim, self.size, self.alpha, self.k = cdim, size, alpha, k
        self.rows = _chunk_rows(x3)
        # Pads hold k/n so that summing n buffer entries yields k + alpha/n * S directly.
        self.squares = _padded_buffer(x3, self.rows, cdim, size // 2, size, k / size)
        self.k_share = x3.new_full((), k / size)
        shape = (self.rows, *x3.shape[1:])
        self.denom = x3.new_empty(shape)
        self.scale = x3.new_empty(shape)

    def chunks(self, n: int) -> list[tuple[int, int]]:
        return [(s, min(self.rows, n - s)) for s in range(0, n, self.rows)]

    def denominator(self, xc: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        """Fill and return (d, d ** -beta) for chunk ``xc``."""
        m, channels = xc.shape[0], xc.shape[self.cdim]
        buf = self.squares.narrow(0, 0, m)
        inner = buf.narrow(self.cdim, self.size // 2, channels)
        torch.addcmul(self.k_share, xc, xc, value=self.alpha / self.size, out=inner)
        denom = _sum_slices(buf, self.cdim, self.size, self.denom.narrow(0, 0, m))
        scale = _inverse_power(denom, beta, self.scale.narrow(0, 0, m))
        return denom, scale


def _fast_forward(x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    channels_last = _is_channels_last(x)
    x = _dense(x, channels_last)
    y = torch.empty_like(x)
    x3, y3 = _rows(x, channels_last), _rows(y, channels_last)
    ws = _Workspace(x3, 2 if channels_last else 1, size, alpha, k)
    for start, m in ws.chunks(x3.shape[0]):
        xc = x3.narrow(0, start, m)
        _, scale = ws.denominator(xc, beta)
        torch.mul(xc, scale, out=y3.narrow(0, start, m))
    return y


def _fast_backward(
    x: Tensor, grad: Tensor, size: int, alpha: float, beta: float, k: float
) -> Tensor:
    channels_last = _is_channels_last(x)
    x, grad = _dense(x, channels_last), _dense(grad, channels_last)
    grad_x = torch.empty_like(x)
    x3, g3, gx3 = (_rows(t, channels_last) for t in (x, grad, grad_x))
    cdim = 2 if channels_last else 1
    ws = _Workspace(x3, cdim, size, alpha, k)
    before = (size - 1) // 2  # transposed window, see _plain_backward
    spread_buf = _padded_buffer(x3, ws.rows, cdim, before, size, 0.0)
    spread = torch.empty_like(ws.denom)
    coeff = -2.0 * alpha * beta / size
    for start, m in ws.chunks(x3.shape[0]):
        xc, gc, gxc = (t.narrow(0, start, m) for t in (x3, g3, gx3))
        denom, scale = ws.denominator(xc, beta)
        buf = spread_buf.narrow(0, 0, m)
        inner = buf.narrow(cdim, before, x3.shape[cdim])
        torch.mul(gc, xc, out=inner).mul_(scale).div_(denom)
        sc = _sum_slices(buf, cdim, size, spread.narrow(0, 0, m))
        torch.mul(gc, scale, out=gxc).addcmul_(xc, sc, value=coeff)
    return grad_x


class _LocalResponseNormFn(torch.autograd.Function):
    """Fast forward/backward; saves only the input (the denominator is cheap to recompute)."""

    @staticmethod
    def forward(ctx, x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.hyper = (size, alpha, beta, k)
        return _fast_forward(x, size, alpha, beta, k)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: build the gradient from differentiable ops (double backward).
            grad_x = _plain_backward(x, grad, *ctx.hyper)
        else:
            grad_x = _fast_backward(x, grad, *ctx.hyper)
        return grad_x, None, None, None, None


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
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        # The eager path writes into views with out=; tracers want plain functional ops.
        return _plain_forward(x, size, alpha, beta, k)
    if torch.is_grad_enabled() and x.requires_grad:
        return _LocalResponseNormFn.apply(x, size, alpha, beta, k)
    return _fast_forward(x, size, alpha, beta, k)


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
