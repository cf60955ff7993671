"""GPTQ: closed-form, error-compensating rounding on the Gram statistics (no training).

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023, arXiv:2210.17323; a.k.a. OPTQ), following the reference
implementation (github.com/IST-DASLab/gptq, ``gptq.py``): columns are quantized one at a time and
each column's rounding error is pushed onto the not-yet-quantized columns through the upper
Cholesky factor of the inverse Hessian H = XᵀX, with lazy block updates, optional act-order
(largest diag(H) first) and damping ``damp * mean(diag(H))``.

Differences from the reference, both deliberate:

* The grid is the quantizer's per-channel symmetric scale (zero point 0), the one RTN, FlexRound and
  AdaRound start from. GPTQ chooses the integers; with ``ratios`` it also picks each output channel's
  grid among multiples of that scale by the Gram loss of its GPTQ solution (``gptq_search``). The
  initial scale minimises the weights' own rounding error; at 4 bits the layer's output error often
  prefers a slightly different clip, and rows are independent problems on one H, so the choice is
  exact per row and costs one wider sweep.
* Input-error correction. The reconstruct pass's Gram form (``gram.py``) is
  ``dWᵀ G dW - 2 dW∘C + ||R||²`` with ``R = Y_fp - op(X_q, W)``, ``C = RᵀX_q``: the inputs are the
  *quantized* model's, the target the float model's. Completing the square, this is
  ``(W_hat - W*) G (W_hat - W*)ᵀ + const`` with ``W* = W + C G⁻¹``, the least-squares weight that
  maps X_q to Y_fp. Classic GPTQ (C ignored) quantizes around W; given ``correction=C`` we quantize
  around W*, so GPTQ greedily minimises exactly the loss the other methods train on. The solve
  uses the same damped G as GPTQ itself (a ridge regulariser on the shift).

Dead inputs (diag(H) == 0, an input that is always zero) get H_ii = 1 as in the reference. The
reference also zeroes their weights; we keep the RTN integer instead: with H_ii isolated the two
choices have the same calibration loss (the column's error never propagates), and keeping the
weight does not break the layer on data where that input is not zero.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .gram import GramStats, out_by_in
from .grid import WeightQuantizer


# grid scales GPTQ tries per output channel with --gptq-grid-search, as multiples of the initial (lp) scale;
# 1.0 first, so a tie keeps the initial grid. Measured on EfficientNet-Lite0/1/2 W4A8; a finer grid (0.8 to 1.2
# in steps of 0.025) lost top-1 on Lite1 and Lite2 at level SQNR (README, "GPTQ's grid search")
SEARCH_RATIOS = (1.0, 0.95, 0.9, 0.85, 1.05, 1.1)


def _damped_factor(H: Tensor, damp: float, tries: int = 6) -> Tuple[Tensor, Tensor]:
    """Dead-column fix and damping of a batched [g, K, K] float64 H, and its lower Cholesky factor.

    If float error leaves the damped H not positive definite, the damping grows 10x per try
    rather than failing the whole quantization run.
    """
    H = H.clone()
    diag = H.diagonal(dim1=1, dim2=2)
    diag[diag == 0] = 1.0
    base = diag.mean(dim=1, keepdim=True)  # [g, 1]
    d = float(damp)
    for _ in range(tries):
        Hd = H.clone()
        Hd.diagonal(dim1=1, dim2=2).add_(d * base)
        L, info = torch.linalg.cholesky_ex(Hd)
        if not bool(info.any()):
            return Hd, L
        d = max(d * 10.0, 1e-6)
    raise RuntimeError(f"GPTQ: Hessian not positive definite even with damp={d / 10:g}")


def _quantize_columns(W: Tensor, U: Tensor, s: Tensor, qmin, qmax, block: int) -> Tensor:
    """The GPTQ sweep: W [g, og, K], U [g, K, K] upper Cholesky of H⁻¹, s [g, og, 1] (a scale per row)
    or [g, og, K] (per element: block-wise scales); qmin/qmax ints or [g, og, K].

    Returns the integers [g, og, K] (as W's float dtype). Within a block the error is applied column by
    column; the rest of the matrix gets the block's accumulated error in one matmul (the "lazy batch").
    The sweep works on Wᵀ [g, K, og], so a column and each of its updates are contiguous rows: the same
    element-wise arithmetic as on W, 1.5-3x faster on a CPU.
    """
    g, og, K = W.shape
    WT = W.transpose(1, 2).contiguous()
    QT = torch.empty_like(WT)
    sT, loT, hiT = (v.transpose(1, 2) if isinstance(v, Tensor) else v for v in (s, qmin, qmax))

    def row(v, i):  # column i of W as a [g, og] row of Wᵀ; a scalar or a per-row [g, 1, og] as it is
        return v if not isinstance(v, Tensor) else v[:, i if v.shape[1] > 1 else 0, :]

    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = WT[:, i1:i2, :]  # a view: updates land in WT
        E1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i, :]
            si = row(sT, i1 + i)
            q = torch.clamp(torch.round(w / si), row(loT, i1 + i), row(hiT, i1 + i))
            QT[:, i1 + i, :] = q
            e = (w - q * si) / U1[:, i, i].unsqueeze(1)  # [g, og]
            E1[:, i, :] = e
            if i + 1 < i2 - i1:
                W1[:, i + 1:, :] -= U1[:, i, i + 1:].unsqueeze(2) * e.unsqueeze(1)
        if i2 < K:
            WT[:, i2:, :] -= torch.bmm(U[:, i1:i2, i2:].transpose(1, 2), E1)
    return QT.transpose(1, 2)


@torch.no_grad()
def gptq_integers(w2d: Tensor, H: Tensor, scale: Tensor, qmin, qmax, damp: float = 0.01,
                  block: int = 128, act_order: bool = True, correction: Optional[Tensor] = None) -> Tensor:
    """GPTQ integers of ``w2d`` on the fixed grid ``scale``; see ``gptq_search`` (one ratio, 1)."""
    return gptq_search(w2d, H, scale, qmin, qmax, damp, block, act_order, correction)[0]


@torch.no_grad()
def gptq_search(w2d: Tensor, H: Tensor, scale: Tensor, qmin, qmax, damp: float = 0.01,
                block: int = 128, act_order: bool = True, correction: Optional[Tensor] = None,
                ratios: Sequence[float] = (1.0,)) -> Tuple[Tensor, Tensor]:
    """GPTQ integers of ``w2d`` [Cout, K] on the fixed grid ``scale`` ([Cout], scalar, or [Cout, K] for
    block-wise scales), centred: ``qmin``/``qmax`` are ints or [Cout, K] tensors (an asymmetric grid's
    [-z, 2^b - 1 - z]), as the quantizers hold them.

    H: [K, K], or GramStats.G's [g, K, K] for grouped / depthwise convs, where output channels
    j*Cout/g .. (j+1)*Cout/g - 1 see H[j] (each group is an independent, exact GPTQ problem; they
    are solved batched). correction: GramStats.C, [Cout, K] in the same row order; when given the
    target is W* = W + C (H + damping)⁻¹ instead of W (see the module docstring). H and C need only
    be consistent with each other (sums or means over the same samples).
    ratios: grid scales tried per output row, as multiples of ``scale`` (the first wins ties). Rows are
    independent GPTQ problems on the same H, so one sweep solves every (ratio, row) pair and each
    row keeps the ratio whose integers give the lowest Gram loss ``dᵀ H d - 2 d·C`` (d = s·q - w):
    a per-channel clipping choice made on the layer's output error rather than on the weights alone.
    Returns (int32 [Cout, K] in [qmin, qmax], the chosen ratio per row [Cout]). The sweep runs in
    w2d's float dtype (at least float32) so that, where no error propagates (diagonal H), the result
    is bit-identical to RTN; the factorisations and the correction solve run in float64.
    """
    if w2d.ndim != 2:
        raise ValueError(f"w2d must be [Cout, K], got {tuple(w2d.shape)}")
    cout, K = w2d.shape
    Hb = H.unsqueeze(0) if H.ndim == 2 else H
    if Hb.ndim != 3 or Hb.shape[1:] != (K, K) or cout % Hb.shape[0]:
        raise ValueError(f"H {tuple(H.shape)} does not match w2d {tuple(w2d.shape)}")
    g = Hb.shape[0]
    og = cout // g
    dev = w2d.device
    wdt = torch.promote_types(w2d.dtype, torch.float32)
    W = w2d.detach().to(wdt).reshape(g, og, K).clone()
    s = scale.detach().to(device=dev, dtype=wdt)
    if s.numel() == cout * K and s.ndim == 2:
        s = s.reshape(g, og, K)
    else:
        s = s.reshape(-1)
        if s.numel() == 1:
            s = s.expand(cout)
        if s.numel() != cout:
            raise ValueError(f"scale has {s.numel()} entries for {cout} output channels")
        s = s.reshape(g, og, 1)
    bounds = [b.detach().to(device=dev, dtype=wdt).reshape(g, og, K) if isinstance(b, Tensor) else b for b in (qmin, qmax)]

    H64 = Hb.detach().to(device=dev, dtype=torch.float64)
    Hd, L = _damped_factor(H64, damp)
    Cg = None
    if correction is not None:
        if correction.shape != (cout, K):
            raise ValueError(f"correction {tuple(correction.shape)} must be [Cout, K] = {(cout, K)}")
        Cg = correction.detach().to(device=dev, dtype=torch.float64).reshape(g, og, K)
        shift = torch.cholesky_solve(Cg.transpose(1, 2), L).transpose(1, 2)  # C Hd⁻¹ (Hd symmetric)
        W = (W.to(torch.float64) + shift).to(wdt)
    R = len(ratios)
    if R < 1:
        raise ValueError("ratios must hold at least one scale multiple")
    if R > 1:  # the rows of every ratio side by side: [g, R*og, K], ratio-major
        r = torch.tensor(list(ratios), dtype=wdt, device=dev).repeat_interleave(og).reshape(1, R * og, 1)
        W, s = W.repeat(1, R, 1), s.repeat(1, R, 1) * r
        bounds = [b.repeat(1, R, 1) if isinstance(b, Tensor) else b for b in bounds]
    s_rows = s
    Hinv = torch.cholesky_inverse(L)
    if act_order:
        perm = torch.argsort(Hd.diagonal(dim1=1, dim2=2), dim=1, descending=True, stable=True)  # [g, K]
        idx = perm.unsqueeze(1).expand(g, W.shape[1], K)
        W = W.gather(2, idx)
        s = s.gather(2, idx) if s.shape[2] > 1 else s
        bounds = [b.gather(2, idx) if isinstance(b, Tensor) else b for b in bounds]
        bi = torch.arange(g, device=dev)[:, None, None]
        Hinv = Hinv[bi, perm[:, :, None], perm[:, None, :]]  # (P H Pᵀ)⁻¹ = P H⁻¹ Pᵀ
    U = torch.linalg.cholesky(Hinv, upper=True).to(wdt)
    Q = _quantize_columns(W, U, s, bounds[0], bounds[1], max(1, int(block)))
    if act_order:
        Q = Q.gather(2, torch.argsort(perm, dim=1).unsqueeze(1).expand(g, R * og, K))
    if R == 1:
        return Q.reshape(cout, K).to(torch.int32), torch.ones(cout, dtype=wdt, device=dev)
    W0 = w2d.detach().to(torch.float64).reshape(g, og, K)
    d = (s_rows.to(torch.float64) * Q.to(torch.float64) - W0.repeat(1, R, 1))  # [g, R*og, K]
    loss = (torch.bmm(d, H64) * d).sum(2)
    if Cg is not None:
        loss = loss - 2 * (d * Cg.repeat(1, R, 1)).sum(2)
    best = loss.reshape(g, R, og).argmin(dim=1)  # [g, og]: the first ratio wins a tie
    Q = Q.reshape(g, R, og, K).gather(1, best[:, None, :, None].expand(g, 1, og, K))[:, 0]
    chosen = torch.tensor(list(ratios), dtype=wdt, device=dev)[best]
    return Q.reshape(cout, K).to(torch.int32), chosen.reshape(cout)


class GPTQQuantizer(WeightQuantizer):
    """Fixed RTN scale (per channel, or per block: static groups), integers from GPTQ once
    ``solve(stats)`` has seen the layer's Gram statistics.

    Starts as RTN (q = clamp(round(W / s))). No learnable parameters: the reconstruct pass calls
    ``solve`` instead of training. ``forward() == s * q`` in the weight's own layout. Block-wise, the
    scales are fixed from the FP weights before the sweep (GPTQ's "static groups"), so they are the
    ones RTN and FlexRound start from; on the asymmetric grid the zero points are fixed the same way.
    """

    def __init__(self, weight, bits, out_axis, in_axis, per_channel=True, scale_method="lp", init_scale=None,
                 block_size=0, grid="narrow"):
        super().__init__(weight, bits, out_axis, in_axis, per_channel, scale_method, init_scale, block_size, grid)
        self.register_buffer("s", self.s_init())
        self.register_buffer("s_base", self.s.clone())  # the initial grid, which every solve's ratios multiply
        self.register_buffer("q", torch.clamp(torch.round(self.weight / self.s), self.qmin, self.qmax))

    def scale_broadcast(self) -> Tensor:
        return self.s

    def forward(self) -> Tensor:
        return self.s * self.q

    @torch.no_grad()
    def integers(self) -> Tensor:
        return self.q.to(torch.int32)

    # -- Gram layout ----------------------------------------------------------------------------
    def _moved_shape(self) -> list:
        shape = list(self.weight.shape)
        return [shape[self.out_axis]] + shape[:self.out_axis] + shape[self.out_axis + 1:]

    def out_by_in(self, w: Tensor) -> Tensor:
        """A weight-shaped tensor as [Cout, K], the Gram statistics' layout.

        Conv [Cout, Cin/g, kh, kw] -> reshape; MatMul [K, N] (out_axis 1) -> transpose.
        """
        if self.out_axis is None:
            raise ValueError("GPTQ needs the weight's output axis to lay it out as [Cout, K]")
        return out_by_in(w, self.out_axis)

    def from_out_by_in(self, w2d: Tensor) -> Tensor:
        """Inverse of ``out_by_in``."""
        return w2d.reshape(self._moved_shape()).movedim(0, self.out_axis)

    @torch.no_grad()
    def solve(self, stats: GramStats, damp: float = 0.01, block: int = 128, act_order: bool = True,
              correct_inputs: bool = True, ratios: Sequence[float] = (1.0,)) -> "GPTQQuantizer":
        """Set the integers by GPTQ on ``stats`` (sum the mini-batches' GramStats with ``+`` first).

        ``correct_inputs`` (default) quantizes around W* = W + C G⁻¹, i.e. minimises the same Gram
        loss (quantized inputs, float target) the trained methods use; False is classic GPTQ.
        ``ratios``: per-channel grids to try, as multiples of the initial scale; each output channel
        keeps the one with the lowest Gram loss (``gptq_search``). Per-tensor grids keep their scale.
        """
        w2d = self.out_by_in(self.weight)
        if tuple(stats.C.shape) != tuple(w2d.shape):
            raise ValueError(f"stats are for a [{', '.join(map(str, stats.C.shape))}] weight, "
                             f"this one is {tuple(w2d.shape)} as [Cout, K]")
        dev = self.weight.device
        corr = stats.C.to(dev) if correct_inputs else None
        base = self.s_base
        s = self.out_by_in(base.expand_as(self.weight)) if self.block_size else base.reshape(-1)
        bounds = [self.out_by_in(b) if isinstance(b, Tensor) else b for b in (self.qmin, self.qmax)]
        if not self.per_channel:
            ratios = (1.0,)
        q2d, chosen = gptq_search(w2d, stats.G.to(dev), s, bounds[0], bounds[1], damp, block, act_order, corr, ratios)
        if self.per_channel:
            shape = [1] * self.weight.ndim
            shape[self.out_axis] = -1
            self.s.copy_(base * chosen.to(self.s.dtype).reshape(shape))
        self.q.copy_(self.from_out_by_in(q2d.to(self.q.dtype)))
        return self
