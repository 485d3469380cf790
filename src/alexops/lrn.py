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

* CPU: fresh full-size buffers cost page faults on first touch, more than the arithmetic.
  The batch is walked in cache-sized chunks, the window sum is ``n`` in-place adds of
  channel slices, and only ``x`` is saved; the backward recomputes d chunk by chunk.
* GPU: memory is pooled and kernel launches dominate, so the whole batch is done at once,
  the window sum is one reduction over an unfolded view, and d's powers are saved.

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


def _padded(
    like: Tensor, rows: int, size: int, before: int, fill: float, fmt: torch.memory_format
) -> tuple[Tensor, Tensor]:
    """Buffer with ``size - 1`` extra channels (pads set to ``fill``) and its inner view."""
    channels = like.shape[1]
    shape = (rows, channels + size - 1, *like.shape[2:])
    buf = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
    buf.narrow(1, 0, before).fill_(fill)
    buf.narrow(1, before + channels, size - 1 - before).fill_(fill)
    return buf, buf.narrow(1, before, channels)


def _window_total(buf: Tensor, size: int, out: Tensor) -> Tensor:
    """``out[:, c] = sum(buf[:, c : c + size])``."""
    if not _is_cpu(buf):
        # One reduction kernel; on GPUs launches, not bandwidth, dominate at AlexNet sizes.
        return torch.sum(buf.unfold(1, size, 1), dim=-1, out=out)
    # On CPU, size - 1 in-place adds of channel slices beat the strided reduction (and
    # by ~1.5x for channels_last, where the reduction runs over a 5-long inner dim).
    channels = out.shape[1]
    out.copy_(buf.narrow(1, 0, channels))
    for i in range(1, size):
        out.add_(buf.narrow(1, i, channels))
    return out


def _inverse_power(denom: Tensor, beta: float, out: Tensor) -> Tensor:
    """``out = denom ** -beta``; CPU pow is ~3x slower than sqrt/rsqrt, so special-case 0.75."""
    if beta == 0.75 and _is_cpu(denom):
        torch.sqrt(denom, out=out)
        return out.mul_(denom).rsqrt_()
    return torch.pow(denom, -beta, out=out)


def _denominator(
    x: Tensor, squares: Tensor, inner: Tensor, size: int, alpha: float, k: float, out: Tensor
) -> Tensor:
    """``out = k + alpha/n * window_sum(x^2)`` via ``squares``, whose pads hold k/n."""
    # Every window sums n entries of (k/n + alpha/n * x^2), which yields k without an
    # extra pass over the data.
    share = torch.full((), k / size, dtype=x.dtype, device=x.device)
    torch.addcmul(share, x, x, value=alpha / size, out=inner)
    return _window_total(squares, size, out)


class _Chunks:
    """Scratch space for walking the batch in chunks that keep temporaries in cache (CPU)."""

    def __init__(self, x: Tensor, size: int, alpha: float, k: float) -> None:
        self.size, self.alpha, self.k = size, alpha, k
        self.fmt = _memory_format(x)
        self.rows = max(1, min(x.shape[0], _CHUNK_ELEMENTS // max(1, x[0].numel())))
        self.squares, self.inner = _padded(x, self.rows, size, size // 2, k / size, self.fmt)
        shape = (self.rows, *x.shape[1:])
        self.denom = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=self.fmt)
        self.scale = torch.empty_like(self.denom)

    def spans(self, n: int) -> list[tuple[int, int]]:
        return [(s, min(self.rows, n - s)) for s in range(0, n, self.rows)]

    def terms(self, xc: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        """(d, d ** -beta) for the chunk ``xc``, in scratch space."""
        m = xc.shape[0]
        squares, inner = self.squares.narrow(0, 0, m), self.inner.narrow(0, 0, m)
        denom = _denominator(xc, squares, inner, self.size, self.alpha, self.k, self.denom[:m])
        return denom, _inverse_power(denom, beta, self.scale.narrow(0, 0, m))


def _cpu_forward(x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    # Fresh full-size CPU tensors cost page faults on first touch (more than the arithmetic),
    # so only the output is full size; the rest lives in chunk-sized scratch.
    y = torch.empty_like(x)
    work = _Chunks(x, size, alpha, k)
    for start, m in work.spans(x.shape[0]):
        xc = x.narrow(0, start, m)
        _, scale = work.terms(xc, beta)
        torch.mul(xc, scale, out=y.narrow(0, start, m))
    return y


def _cpu_backward(x: Tensor, grad: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    """grad_x = g d^-b - (2ab/n) x S'(g x d^(-b-1)), recomputing d per chunk (see _cpu_forward)."""
    grad_x = torch.empty_like(x)
    work = _Chunks(x, size, alpha, k)
    # Transposed window: see _plain_backward.
    spread_buf, spread_in = _padded(x, work.rows, size, (size - 1) // 2, 0.0, work.fmt)
    spread = torch.empty_like(work.denom)
    coeff = -2.0 * alpha * beta / size
    for start, m in work.spans(x.shape[0]):
        xc, gc, gxc = (t.narrow(0, start, m) for t in (x, grad, grad_x))
        denom, scale = work.terms(xc, beta)
        torch.mul(gc, xc, out=spread_in[:m]).mul_(scale).div_(denom)
        total = _window_total(spread_buf[:m], size, spread[:m])
        torch.mul(gc, scale, out=gxc).addcmul_(xc, total, value=coeff)
    return grad_x


def _gpu_forward(
    x: Tensor, size: int, alpha: float, beta: float, k: float, for_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(y, d^-b, d^(-b-1)) over the whole batch: GPU memory comes from the caching allocator,
    so keeping both powers for the backward is cheaper than relaunching kernels for them."""
    fmt = _memory_format(x)
    squares, inner = _padded(x, x.shape[0], size, size // 2, k / size, fmt)
    denom = _denominator(x, squares, inner, size, alpha, k, torch.empty_like(x))
    scale = _inverse_power(denom, beta, torch.empty_like(x))
    y = torch.mul(x, scale)
    if not for_grad:
        return y, None, None
    return y, scale, torch.div(scale, denom)


def _gpu_backward(
    x: Tensor,
    grad: Tensor,
    scale: Tensor,
    scale_over_d: Tensor,
    size: int,
    alpha: float,
    beta: float,
) -> Tensor:
    before = (size - 1) // 2  # transposed window: see _plain_backward
    spread_buf, spread_in = _padded(x, x.shape[0], size, before, 0.0, _memory_format(x))
    torch.mul(grad, x, out=spread_in).mul_(scale_over_d)
    total = _window_total(spread_buf, size, torch.empty_like(x))
    return torch.mul(grad, scale).addcmul_(x, total, value=-2.0 * alpha * beta / size)


class _LocalResponseNormFn(torch.autograd.Function):
    """Fast forward/backward. CPU saves only x (recomputing d is cheaper than page faults);
    GPUs save d^-b and d^(-b-1) (memory is pooled there, launches are what costs)."""

    @staticmethod
    def forward(ctx, x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:  # type: ignore[override]
        ctx.hyper = (size, alpha, beta, k)
        if _is_cpu(x):
            ctx.save_for_backward(x)
            return _cpu_forward(x, size, alpha, beta, k)
        y, scale, scale_over_d = _gpu_forward(x, size, alpha, beta, k, for_grad=True)
        ctx.save_for_backward(x, scale, scale_over_d)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:  # type: ignore[override]
        x, *powers = ctx.saved_tensors
        size, alpha, beta, k = ctx.hyper
        if torch.is_grad_enabled():
            # create_graph=True: build the gradient from differentiable ops (double backward).
            grad_x = _plain_backward(x, grad, size, alpha, beta, k)
        elif powers:
            grad = grad.contiguous(memory_format=_memory_format(x))
            grad_x = _gpu_backward(x, grad, *powers, size, alpha, beta)
        else:
            grad = grad.contiguous(memory_format=_memory_format(x))
            grad_x = _cpu_backward(x, grad, size, alpha, beta, k)
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
    x = x.contiguous(memory_format=_memory_format(x))
    if torch.is_grad_enabled() and x.requires_grad:
        return _LocalResponseNormFn.apply(x, size, alpha, beta, k)
    if _is_cpu(x):
        return _cpu_forward(x, size, alpha, beta, k)
    return _gpu_forward(x, size, alpha, beta, k, for_grad=False)[0]


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
