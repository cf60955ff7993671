"""Gram form of a single weighted op's reconstruction loss (DESIGN §3, "Speed on CPU").

For fixed inputs X (im2col patches for a conv), FP weight W, bias b and target Y:

    sum ||op(X, W_hat) + b - Y||^2 = sum_o dW_o G dW_o^T - 2 sum(dW * C) + ||R||^2

with dW = W_hat - W, G = X^T X, R = Y - op(X, W) - b and C = R^T X. G, C and ||R||^2 are computed
once per cached mini-batch; every training step then costs O(Cout * K^2) instead of a full
forward and backward of the op.

Precision: the statistics are *accumulated* in float64 (``accum_dtype``) and *stored* in float32
(``dtype``) for the training loss. Measured here (conv 1x1 256->64 and 3x3 64->64, N=32, inputs
with mean offsets up to 20, with and without activation quantization): float32 statistics give the
mse to 1e-8..1e-7 relative and gradients to ~2e-7 relative of a float64 reference, the same
accuracy as the direct float32 conv loss, and each step is cheaper than in float64. Float64
accumulation costs 2-3x in the one-off statistics pass but keeps the sums safe when many patches or
merged mini-batches (``GramStats.__add__``) are summed. Pass ``dtype=torch.float64`` to also train
on float64 statistics (~1e-14 relative to a float64 direct loss).

Layout conventions: G is always [g, K, K] (g = conv groups; 1 for a regular conv and for linear
layers; C for depthwise, with K = kh*kw). C is [Cout, K], i.e. the layout of W reshaped to
[Cout, Cin/g*kh*kw] (F.unfold's channel-major patch order), or the [N, K] linear weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

# Chunk a linear layer's rows so a large activation never needs more than about this many bytes at once.
_CHUNK_BYTES = 256 * 1024 * 1024
# A conv's patches are made and consumed a few samples at a time: chunks that stay in cache made
# EfficientNet-Lite0's conv statistics 2.9x faster than 256 MiB ones on the 2-core EPYC (1.25 s -> 0.43 s
# over six of its layer shapes, batch 32); below 4 MiB nothing more was gained. A GPU keeps the large
# chunks (fewer kernel launches; not measured there since).
_CONV_CHUNK_BYTES = 4 * 1024 * 1024


@dataclass
class GramStats:
    """Sufficient statistics of one (or several merged) mini-batches for one weighted op.

    G: [g, K, K]; C: [Cout, K]; r2: 0-d ||R||^2; count: number of output elements (for the mean);
    samples: number of samples (x.shape[0]), for the per-sample loss scale AdaRound's lambda assumes;
    x_sum: [g, K] column sums of X and r_sum: [Cout] of R, the constant feature's row of the Gram
    matrix, from which ``bias_shift`` gives the bias that absorbs the mean output error.
    """

    G: Tensor
    C: Tensor
    r2: Tensor
    count: int
    samples: int = 0
    x_sum: Optional[Tensor] = None
    r_sum: Optional[Tensor] = None

    @property
    def groups(self) -> int:
        return self.G.shape[0]

    def __add__(self, other: "GramStats") -> "GramStats":
        """Merge two mini-batches: the sum form is additive, so the merged loss is over both."""
        sums = (None, None) if self.x_sum is None or other.x_sum is None else \
            (self.x_sum + other.x_sum, self.r_sum + other.r_sum)
        return GramStats(self.G + other.G, self.C + other.C, self.r2 + other.r2, self.count + other.count,
                         self.samples + other.samples, *sums)

    @cached_property
    def c_out_last(self) -> Tensor:
        """C as [K, Cout], the layout of a MatMul weight, made once for the per-step loss."""
        return self.C.T.contiguous()

    def scaled(self, f: float) -> "GramStats":
        """The sums times f (count too): statistics of a subset of the output positions, made to
        estimate the sums over all of them (``conv_gram``'s ``row_step``)."""
        if f == 1:
            return self
        sums = (None, None) if self.x_sum is None else (self.x_sum * f, self.r_sum * f)
        return GramStats(self.G * f, self.C * f, self.r2 * f, round(self.count * f), self.samples, *sums)

    def to(self, *args, **kwargs) -> "GramStats":
        sums = (None, None) if self.x_sum is None else (self.x_sum.to(*args, **kwargs), self.r_sum.to(*args, **kwargs))
        return GramStats(self.G.to(*args, **kwargs), self.C.to(*args, **kwargs), self.r2.to(*args, **kwargs),
                         self.count, self.samples, *sums)


def out_by_in(w: Tensor, out_axis: int) -> Tensor:
    """A weight-shaped tensor as [Cout, K], the layout of G and C: the output-channel axis first,
    the rest flattened (Conv [Cout, Cin/g, kh, kw] -> reshape; MatMul [K, N] -> transpose)."""
    return w.movedim(out_axis, 0).reshape(w.shape[out_axis], -1)


def _pad4(padding: Union[int, Sequence[int]], nd: int) -> Tuple[int, ...]:
    """Padding as F.pad's tuple (last dim first): 2-D (l, r, t, b), 1-D (l, r)."""
    if isinstance(padding, int):
        return (padding,) * (2 * nd)
    padding = tuple(int(p) for p in padding)
    if nd == 2:
        if len(padding) == 2:  # symmetric (ph, pw)
            ph, pw = padding
            return (pw, pw, ph, ph)
        if len(padding) == 4:
            return padding
    else:
        if len(padding) == 1:
            return (padding[0], padding[0])
        if len(padding) == 2:
            return padding
    raise ValueError(f"padding {padding!r} not understood for a {nd}-D conv")


def _pair(v, nd: int) -> Tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(t) for t in v)
    if len(v) != nd:
        raise ValueError(f"expected {nd} values, got {v!r}")
    return v


def _taps(xp: Tensor, kh: int, kw: int, stride, dilation, ho: int, wo: int) -> list:
    """The kh*kw strided views [n, Cin, ho, wo] of an already padded input that a conv's taps read, in
    F.unfold's order. Stacked on axis 2 they are its patches (2x faster than im2col on this CPU for a
    3x3 depthwise conv; a plain view for a 1x1 conv)."""
    (sh, sw), (dh, dw) = stride, dilation
    if kh == kw == 1 and sh == sw == 1:
        return [xp[:, :, :ho, :wo]]
    return [xp[:, :, i * dh: i * dh + (ho - 1) * sh + 1: sh, j * dw: j * dw + (wo - 1) * sw + 1: sw]
            for i in range(kh) for j in range(kw)]


def conv_gram(x: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, stride=1, padding=0, dilation=1,
              groups: int = 1, accum_dtype: torch.dtype = torch.float64,
              dtype: torch.dtype = torch.float32, row_step: int = 1, row_offset: int = 0,
              sums: bool = True) -> GramStats:
    """Gram statistics of a 2-D (or 1-D) convolution.

    x: [N, Cin, H, W] (or [N, Cin, L]); w: [Cout, Cin/g, kh, kw]; b: [Cout] or None;
    y: the FP target of the op's linear output [N, Cout, Ho, Wo].
    padding: int, (ph, pw) symmetric, or (left, right, top, bottom) in F.pad order — note ONNX's
    ``pads`` are (top, left, bottom, right); for 1-D: int or (left, right).
    ``row_step``, ``row_offset``: use only the output rows row_offset, row_offset + row_step, ...; the
    sums are scaled by (output rows / rows used) so they estimate the sums over every position.
    ``sums``: also the column sums ``bias_shift`` needs (x_sum, r_sum; a pass over the patches).
    """
    if x.ndim == 3:  # 1-D conv as a 2-D conv of height 1
        pl, pr = _pad4(padding, 1)
        return conv_gram(x.unsqueeze(2), w.unsqueeze(2), b, y.unsqueeze(2), (1, _pair(stride, 1)[0]),
                         (pl, pr, 0, 0), (1, _pair(dilation, 1)[0]), groups, accum_dtype, dtype, sums=sums)
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv_gram supports 1-D and 2-D convs, got x {tuple(x.shape)}, w {tuple(w.shape)}")
    stride, dilation = _pair(stride, 2), _pair(dilation, 2)
    pad = _pad4(padding, 2)
    cout, cin_g, kh, kw = w.shape
    g = int(groups)
    if x.shape[1] != cin_g * g or cout % g:
        raise ValueError(f"channels do not match groups={g}: x {tuple(x.shape)}, w {tuple(w.shape)}")
    K, og = cin_g * kh * kw, cout // g
    N = x.shape[0]
    ho_all = y.shape[2]
    row_offset %= min(row_step, ho_all)
    first_row = row_offset * stride[0]  # output rows off, off+step, ...: a conv of stride (sh*step, sw) from here
    if row_step > 1:
        y = y[:, :, row_offset::row_step]
        stride = (stride[0] * row_step, stride[1])
    dev = x.device
    depthwise = og == 1 and cin_g == 1 and g > 1  # a depthwise conv without channel multiplier
    if depthwise:  # G, C and ||R||² come out of one [K+1]² product per channel
        Ga = torch.zeros(g, K + 1, K + 1, dtype=accum_dtype, device=dev)
    else:
        G = torch.zeros(g, K, K, dtype=accum_dtype, device=dev)
        C = torch.zeros(g, og, K, dtype=accum_dtype, device=dev)
        r2 = torch.zeros((), dtype=accum_dtype, device=dev)
    if sums:
        x_sum = torch.zeros(g, K, dtype=accum_dtype, device=dev)
        r_sum = torch.zeros(cout, dtype=accum_dtype, device=dev)
    wa = w.detach().to(accum_dtype)
    ba = None if b is None else b.detach().to(accum_dtype)
    per_sample = (x[0].numel() * kh * kw + y[0].numel()) * torch.finfo(accum_dtype).bits // 8
    step = max(1, (_CONV_CHUNK_BYTES if dev.type == "cpu" else _CHUNK_BYTES) // max(per_sample, 1))
    count = 0
    for i in range(0, N, step):
        xc = x[i:i + step].detach().to(accum_dtype)
        yc = y[i:i + step].detach().to(accum_dtype)
        n = xc.shape[0]
        xp = F.pad(xc, pad) if any(pad) else xc
        if first_row:
            xp = xp[:, :, first_row:]
        out = F.conv2d(xp, wa, ba, stride=stride, padding=0, dilation=dilation, groups=g)
        if yc.shape != out.shape:
            raise ValueError(f"target shape {tuple(y.shape)} does not match the conv output {tuple(out.shape)}")
        r = out.neg_().add_(yc)  # in place: one activation-sized buffer fewer
        ho, wo = r.shape[2], r.shape[3]
        L = ho * wo
        taps = _taps(xp, kh, kw, stride, dilation, ho, wo)
        if depthwise:  # R as one more tap of its own channel
            aug = torch.stack(taps + [r], 2).reshape(n, g, K + 1, L)
            for s in range(n):
                Ga.baddbmm_(aug[s], aug[s].transpose(1, 2))
        else:
            cols = torch.stack(taps, 2).reshape(n, g, K, L) if len(taps) > 1 else taps[0].reshape(n, g, K, L)
            # one sample at a time, accumulated in place: no [K, n*L] permuted copy (the bulk of the old cost)
            for s in range(n):
                at = cols[s].transpose(1, 2)
                G.baddbmm_(cols[s], at)
                C.baddbmm_(r[s].reshape(g, og, L), at)
            r2 += (r * r).sum()
        if sums:
            x_sum += (aug[:, :, :K] if depthwise else cols).sum((0, 3)).reshape(g, K)
            r_sum += r.sum((0, 2, 3))
        count += r.numel()
    if depthwise:
        G, C, r2 = Ga[:, :K, :K], Ga[:, K, :K], Ga[:, K, K].sum()
    stats = GramStats(G.contiguous().to(dtype), C.reshape(cout, K).to(dtype), r2.to(dtype), count, N,
                      *((x_sum.to(dtype), r_sum.to(dtype)) if sums else (None, None)))
    return stats.scaled(ho_all / y.shape[2])


def linear_gram(x: Tensor, w2d: Tensor, b: Optional[Tensor], y: Tensor, accum_dtype: torch.dtype = torch.float64,
                dtype: torch.dtype = torch.float32) -> GramStats:
    """Gram statistics of y = x @ w2d^T + b, x [..., K], w2d [N, K] (transpose MatMul's [K, N] first).

    C is taken from the residual R = Y - X Wᵀ - b, not expanded as YᵀX - W G. The expansion saves a
    product (3.78 -> 3.24 s a SmolLM2 layer a mini-batch, bench/gram_stats.py), but in float32 its
    error is relative to YᵀX, not to R: 3e-2 of C where |R| = 1e-3 |Y| against 5e-4 from R, and a
    loss reads that error through G's inverse (README, "Decoder LM")."""
    N, K = w2d.shape
    xf = x.detach().reshape(-1, K)
    yf = y.detach().reshape(-1, N)
    if xf.shape[0] != yf.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} have different row counts")
    dev = x.device
    wa = w2d.detach().to(accum_dtype)
    ba = None if b is None else b.detach().to(accum_dtype)
    G = torch.zeros(K, K, dtype=accum_dtype, device=dev)
    C = torch.zeros(N, K, dtype=accum_dtype, device=dev)
    r2 = torch.zeros((), dtype=accum_dtype, device=dev)
    x_sum = torch.zeros(1, K, dtype=accum_dtype, device=dev)
    r_sum = torch.zeros(N, dtype=accum_dtype, device=dev)
    step = max(1, _CHUNK_BYTES // ((K + N) * torch.finfo(accum_dtype).bits // 8))
    for i in range(0, xf.shape[0], step):
        xc = xf[i:i + step].to(accum_dtype)
        r = yf[i:i + step].to(accum_dtype) - F.linear(xc, wa, ba)
        G += xc.T @ xc
        C += r.T @ xc
        r2 += (r * r).sum()
        x_sum += xc.sum(0)
        r_sum += r.sum(0)
    samples = x.shape[0] if x.ndim >= 2 else 1
    return GramStats(G.unsqueeze(0).to(dtype), C.to(dtype), r2.to(dtype), yf.numel(), samples, x_sum.to(dtype),
                     r_sum.to(dtype))


class _GramLoss(torch.autograd.Function):
    """<d, d G> - 2 <d, C> for a constant symmetric G. Its gradient, 2 (d G - C), reuses the forward's
    one matrix product, so an iteration costs one matmul instead of autograd's two (SmolLM2's Gram-form
    FlexRound spent 70 % of its time in these products), and no weight-sized temporaries beyond it.

    ``out_last``: d is a MatMul weight [K, N] and C is given as [K, N] (``GramStats.c_out_last``): the
    product is G d, so the weight is never transposed (a copy of the weight per step otherwise)."""

    @staticmethod
    def forward(ctx, d: Tensor, G: Tensor, C: Tensor, out_last: bool) -> Tensor:
        p = torch.mm(G[0], d) if out_last else torch.bmm(d, G)
        flat = d.reshape(-1)
        value = torch.dot(p.reshape(-1), flat) - 2.0 * torch.dot(C.reshape(-1), flat)
        ctx.save_for_backward(p.sub_(C))
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):
        (p,) = ctx.saved_tensors
        return 2.0 * grad * p, None, None, None


def gram_loss(stats: GramStats, dW: Tensor, out_axis: int = 0) -> Tensor:
    """sum ||op(X, W + dW) + b - Y||^2 from the statistics. dW: weight-shaped with its output channels on
    ``out_axis`` (0: [Cout, ...], reshaped to [Cout, K]; a 2-D MatMul weight [K, N] takes out_axis=1)."""
    cout, K = stats.C.shape
    g = stats.G.shape[0]
    d = dW.to(stats.G.dtype)
    if out_axis == 1 and d.ndim == 2 and g == 1:
        return _GramLoss.apply(d.contiguous(), stats.G, stats.c_out_last, True) + stats.r2
    dg = out_by_in(d, out_axis).reshape(g, cout // g, K).contiguous()
    return _GramLoss.apply(dg, stats.G, stats.C.reshape(g, cout // g, K), False) + stats.r2


def gram_mse(stats: GramStats, dW: Tensor, out_axis: int = 0) -> Tensor:
    """Equals F.mse_loss(op(X, W + dW) + b, Y) (mean over output elements) up to float error."""
    return gram_loss(stats, dW, out_axis) / stats.count


def gram_sample_loss(stats: GramStats, dW: Tensor, out_axis: int = 0) -> Tensor:
    """Squared error summed over each sample's outputs, averaged over samples (x.shape[0]).

    This is the reconstruction-loss scale of the AdaRound/BRECQ code, for which AdaRound's
    lambda = 0.01 was tuned; with ``gram_mse`` the rounding regulariser is ``count/samples`` times
    stronger relative to the data term.
    """
    if stats.samples <= 0:
        raise ValueError("these GramStats do not record a sample count")
    return gram_loss(stats, dW, out_axis) / stats.samples


def bias_shift(stats: GramStats, dW: Tensor, out_axis: int = 0) -> Tensor:
    """[Cout]: the bias change that minimises the loss for a fixed weight change dW: the mean residual
    per output channel, (sum R - dW . sum X) / positions. Rounding errors have a mean wherever the
    inputs do (a ReLU's outputs are all positive), and a bias cancels it exactly, at no cost to run."""
    if stats.x_sum is None:
        raise ValueError("these GramStats carry no column sums")
    cout, K = stats.C.shape
    g = stats.G.shape[0]
    d = out_by_in(dW.to(stats.G.dtype), out_axis).reshape(g, cout // g, K)
    mean_err = torch.bmm(d, stats.x_sum.unsqueeze(2)).reshape(cout)
    return (stats.r_sum - mean_err) / (stats.count // cout)
