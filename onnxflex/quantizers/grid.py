"""Integer grids, scale initialisation and the common WeightQuantizer interface.

Weights and activations are symmetric with zero point 0 by default (TensorRT's convention, DESIGN
§3); the target picks the weights' grid (``WEIGHT_GRIDS``, targets.Target.weight_grid):

* ``narrow`` [-(2^(b-1)-1), 2^(b-1)-1] (int8 [-127, 127]): symmetric, the W8A8 convention;
* ``full`` [-2^(b-1), 2^(b-1)-1] (int4 [-8, 7]) with positive scales: one more level, which at
  4 bits is a 7/8 step where a row's range allows it (weight-only: nothing else reads the grid);
* ``signed``: the full grid with a per-row (per-block) scale sign chosen so the row's largest
  magnitude lands on the -2^(b-1) side, as onnxruntime's own int4 quantizer does: every row gets
  the finer step. DequantizeLinear takes the negative scale as it is (TensorRT wants scales > 0).
* ``asymmetric``: unsigned [0, 2^b - 1] with an integer zero point per row (per block): the grid
  spans [min, max] of the row instead of [-max|w|, max|w|] (onnxruntime only: uint4/uint8 weights
  with zero points, which MatMulNBits takes).

Activations use the full range [-2^(b-1), 2^(b-1)-1].
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn


WEIGHT_GRIDS = ("narrow", "full", "signed", "asymmetric")


def weight_qrange(bits: int, grid: str = "narrow") -> Tuple[int, int]:
    """Stored integer weight range: narrow int8 -> (-127, 127), int4 -> (-7, 7); full/signed int4 -> (-8, 7);
    asymmetric int4 -> (0, 15)."""
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"weight bits must be an integer in 2..16, got {bits!r}")
    if grid not in WEIGHT_GRIDS:
        raise ValueError(f"unknown weight grid {grid!r}; use one of {', '.join(WEIGHT_GRIDS)}")
    if grid == "asymmetric":
        return 0, 2 ** bits - 1
    qmax = 2 ** (bits - 1) - 1
    return (-qmax - 1 if grid != "narrow" else -qmax), qmax


def act_qrange(bits: int) -> Tuple[int, int]:
    """Full signed activation range: int8 -> (-128, 127), int16 -> (-32768, 32767)."""
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"activation bits must be an integer in 2..16, got {bits!r}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_ste(x: Tensor) -> Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through).

    Written as ``round(x) + (x - x.detach())`` rather than ``(round(x) - x).detach() + x`` so the
    forward value is *exactly* ``round(x)`` (adding an exact 0.0), which keeps the trained forward
    bit-identical to the deployed integers times the scale.
    """
    return torch.round(x) + (x - x.detach())


def broadcast_shape(ndim: int, axis: Optional[int], size: int) -> list:
    """Shape [1, .., size, .., 1] that broadcasts a per-axis vector against an ndim tensor."""
    shape = [1] * ndim
    if axis is not None:
        shape[axis] = size
    return shape


def _norm_axis(axis: Optional[int], ndim: int) -> Optional[int]:
    if axis is None:
        return None
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}-D weight")
    return axis % ndim


def init_weight_scale(w: Tensor, bits: int, out_axis: Optional[int], method: str = "lp",
                      p: float = 2.4, n_grid: int = 20, n_refine: int = 20, min_ratio: float = 0.3,
                      grid: str = "narrow") -> Tensor:
    """Initial symmetric weight scale, per channel of ``out_axis`` (or per tensor when None).

    ``minmax``: the smallest scale that clips nothing on the grid (max|w| / qmax on the narrow
    grid; on the full grid max(max(-w)/2^(b-1), max(w)/qmax); on the signed grid the row is first
    oriented so its largest magnitude is negative, and the returned scale carries that sign).
    ``lp`` (default): search clipping ratios r in [min_ratio, 1] of that scale and keep, per
    channel, the scale minimising sum |w - Q(w)|^p; at 4 bits and below clipping a few outliers
    wins a finer grid for the rest. ``mse`` is ``lp`` with p = 2.
    The search is coarse-to-fine for speed: ``n_grid`` evenly spaced ratios (r = 1, i.e. minmax,
    included, so lp never loses to minmax), then ``n_refine`` ratios per channel within one coarse
    step of that channel's best: 40 passes over the weight reach a finer resolution (~0.004) than
    a flat 100-point grid (0.007); |e|^2.4 dominates the cost (~1 s per 10^6 weights here).
    Each pass is vectorised over channels; memory stays O(numel).

    Returns float32 with shape broadcastable to ``w`` (keepdims on ``out_axis``; all ones per
    tensor); negative entries only on the signed grid. All-zero channels get scale 1/qmax (any
    positive scale quantizes them to 0).
    """
    if grid == "asymmetric":
        raise ValueError("the asymmetric grid has a zero point too: use init_weight_zero_scale")
    wf, shape = _rows(w, out_axis)
    qmin, qmax = weight_qrange(bits, grid)
    if grid == "signed":  # W = s*q = |s|*(-q) for s < 0: orient each row so its peak is negative
        peak = wf.gather(1, wf.abs().argmax(dim=1, keepdim=True))[:, 0]
        sign = torch.where(peak > 0, -1.0, 1.0)
        wf = wf * sign[:, None]
    else:
        sign = torch.ones(wf.shape[0], device=wf.device)
    # the minmax scale: no clipping on either side of the (possibly asymmetric) grid
    amax = torch.maximum((-wf).clamp(min=0).amax(dim=1) / -qmin, wf.clamp(min=0).amax(dim=1) / qmax)
    amax = torch.where(amax > 0, amax, torch.full_like(amax, 1.0 / qmax))

    def err_at(r: Tensor) -> Tensor:
        sb = (amax * r)[:, None]
        return wf - torch.clamp(torch.round(wf / sb), qmin, qmax) * sb

    r = _ratio_search(err_at, wf, method, p, n_grid, n_refine, min_ratio)
    return (amax * r * sign).reshape(shape)


def init_weight_zero_scale(w: Tensor, bits: int, out_axis: Optional[int], method: str = "lp",
                           p: float = 2.4, n_grid: int = 20, n_refine: int = 20,
                           min_ratio: float = 0.3) -> Tuple[Tensor, Tensor]:
    """Initial asymmetric (scale, zero point) per channel of ``out_axis``: the grid [0, 2^b - 1]
    spans [r * min(w, 0), r * max(w, 0)] with the ratio r searched as in :func:`init_weight_scale`
    (``minmax``: r = 1). The zero point is an integer, so 0 stays exactly representable. Both are
    float32, shaped to broadcast against ``w``."""
    wf, shape = _rows(w, out_axis)
    qmax = 2 ** bits - 1
    lo0, hi0 = wf.amin(dim=1).clamp(max=0), wf.amax(dim=1).clamp(min=0)

    def grid_at(r: Tensor) -> Tuple[Tensor, Tensor]:
        s = (hi0 - lo0) * r / qmax
        s = torch.where(s > 0, s, torch.full_like(s, 1.0 / qmax))
        return s, torch.clamp(torch.round(-lo0 * r / s), 0, qmax)

    def err_at(r: Tensor) -> Tensor:
        s, z = grid_at(r)
        s, z = s[:, None], z[:, None]
        return wf - (torch.clamp(torch.round(wf / s) + z, 0, qmax) - z) * s

    s, z = grid_at(_ratio_search(err_at, wf, method, p, n_grid, n_refine, min_ratio))
    return s.reshape(shape), z.reshape(shape)


def _rows(w: Tensor, out_axis: Optional[int]) -> Tuple[Tensor, list]:
    """The weight as [channels, rest] float32 rows (one row per tensor when out_axis is None) and the
    keepdims shape a per-row value takes to broadcast against ``w``."""
    w = w.detach().to(torch.float32)
    ax = _norm_axis(out_axis, w.ndim) if w.ndim else None
    if ax is None:
        return w.reshape(1, -1), [1] * w.ndim
    return w.movedim(ax, 0).reshape(w.shape[ax], -1), broadcast_shape(w.ndim, ax, w.shape[ax])


def _ratio_search(err_at, rows: Tensor, method: str, p: float, n_grid: int, n_refine: int,
                  min_ratio: float) -> Tensor:
    """Per row of ``rows``, the clipping ratio r in [min_ratio, 1] minimising sum |err_at(r)|^p (r = 1
    for minmax): ``n_grid`` coarse ratios, then ``n_refine`` within one coarse step of each row's best."""
    ones = torch.ones(rows.shape[0], device=rows.device)
    if method == "minmax":
        return ones
    if method not in ("lp", "mse"):
        raise ValueError(f"unknown scale method {method!r}; use lp, mse or minmax")
    pp = 2.0 if method == "mse" else float(p)

    def lp(r: Tensor) -> Tensor:
        return err_at(r).abs_().pow_(pp).sum(dim=1)

    best_r, best_err = ones, lp(ones)

    def keep(r: Tensor) -> None:
        nonlocal best_r, best_err
        err = lp(r)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, r, best_r)

    n_grid = max(int(n_grid), 2)
    step = (1.0 - min_ratio) / (n_grid - 1)
    for r in torch.linspace(1.0, min_ratio, n_grid).tolist()[1:]:
        keep(torch.full_like(ones, r))
    centre = best_r
    for u in torch.linspace(-1.0, 1.0, int(n_refine) + 2).tolist()[1:-1] if n_refine > 0 else []:
        keep((centre + u * step).clamp(min_ratio * 0.5, 1.0))
    return best_r


def quantize_weight(w: Tensor, scale_b: Tensor, bits: int, grid: str = "narrow") -> Tuple[Tensor, Tensor]:
    """Round to nearest on the given (broadcastable) scale: returns (int32 q, dequantized w_hat = scale*q).
    Symmetric grids only (the asymmetric one needs a zero point: use a WeightQuantizer)."""
    if grid == "asymmetric":
        raise ValueError("quantize_weight is for the symmetric grids; the asymmetric grid needs a zero point")
    qmin, qmax = weight_qrange(bits, grid)
    q = torch.clamp(torch.round(w / scale_b), qmin, qmax)
    return q.to(torch.int32), scale_b * q


class WeightQuantizer(nn.Module):
    """Common interface of the weight quantizers (RTN, FlexRound, AdaRound).

    ``forward()`` gives the dequantized weight used in training; ``integers()`` and ``scale()`` are
    what the QDQ pass writes (DequantizeLinear input and scale). After ``freeze()``,
    ``forward() == integers() * scale()`` broadcast, bit for bit (float32).

    The initial scale lives in log space (``log_s_init``) and every subclass derives its s1 as
    ``scale_sign * exp(log_s_init)``: FlexRound learns ``log_s1`` starting from the same tensor, so at
    init all three methods deploy bit-identical scales and FlexRound with S2 = s3 = s4 = 1 *is* RTN.
    ``scale_sign`` is all ones except on the ``signed`` grid, where it is fixed at init.

    ``qmin``/``qmax`` bound the *centred* integers W / s1 that every method rounds: ints on the
    symmetric grids; on the asymmetric grid per-element tensors [-z, 2^b - 1 - z] (z the zero point,
    fixed at init), so the methods run unchanged and ``integers() + zero point`` is what is stored.
    """

    def element_parameters(self) -> list:
        """The per-weight learned parameters (FlexRound's S2), which may take their own learning rate."""
        return []

    def __init__(self, weight: Tensor, bits: int, out_axis: Optional[int], in_axis: Optional[int],
                 per_channel: bool = True, scale_method: str = "lp", init_scale: Optional[Tensor] = None,
                 block_size: int = 0, grid: str = "narrow"):
        super().__init__()
        w = weight.detach().to(torch.float32)
        nd = w.ndim
        self.out_axis = _norm_axis(out_axis, nd) if nd else None
        self.in_axis = _norm_axis(in_axis, nd) if nd >= 2 else None
        if self.in_axis is not None and self.in_axis == self.out_axis:
            raise ValueError("in_axis and out_axis must differ")
        self.per_channel = bool(per_channel and self.out_axis is not None)
        self.block_size = int(block_size or 0)
        if self.block_size and not (self.per_channel and self.in_axis is not None and nd == 2):
            raise ValueError("block-wise scales need a 2-D weight with output and input axes, per channel")
        self.bits = int(bits)
        self.grid = grid
        self.frozen = False
        self.progress = 0.0
        self.register_buffer("weight", w)
        # each input row's block, for expand_blocks
        self.register_buffer("block_of_row", torch.arange(w.shape[self.in_axis], device=w.device) // self.block_size
                             if self.block_size else None, persistent=False)
        sshape = self._scale_shape()
        z0 = torch.zeros(sshape)
        if grid == "asymmetric":
            if init_scale is not None:  # another quantizer's initial_grid(): (scale, zero point)
                if not isinstance(init_scale, tuple) or len(init_scale) != 2:
                    raise ValueError("init_scale on the asymmetric grid is a (scale, zero point) pair")
                s0, z0 = (torch.as_tensor(t, dtype=torch.float32, device=w.device) for t in init_scale)
            elif self.block_size:
                s0, z0 = (self._from_blocks(t) for t in init_weight_zero_scale(self._blocks(w), self.bits, 0, scale_method))
            else:
                s0, z0 = init_weight_zero_scale(w, self.bits, self.out_axis if self.per_channel else None, scale_method)
        elif init_scale is None and self.block_size:
            s0 = init_weight_scale(self._blocks(w), self.bits, 0, scale_method, grid=grid)
            s0 = self._from_blocks(s0)
        elif init_scale is None:
            s0 = init_weight_scale(w, self.bits, self.out_axis if self.per_channel else None, scale_method, grid=grid)
        else:
            s0 = torch.as_tensor(init_scale, dtype=torch.float32, device=w.device).reshape(sshape)
            if not bool((s0 > 0).all() or (grid == "signed" and (s0 != 0).all())):
                raise ValueError("init_scale must be positive (non-zero on the signed grid)")
        s0 = s0.reshape(sshape)
        self._s0 = s0  # as searched (or given), for initial_grid()
        self.register_buffer("log_s_init", torch.log(s0.abs()))
        self.register_buffer("scale_sign", torch.sign(s0))
        self.register_buffer("zero", z0.reshape(sshape).to(w.device))
        qmin, qmax = weight_qrange(self.bits, grid)
        if grid == "asymmetric":
            z = self.expand_blocks(self.zero)
            self.register_buffer("qmin", (qmin - z).expand_as(w).contiguous())
            self.register_buffer("qmax", (qmax - z).expand_as(w).contiguous())
        else:
            self.qmin, self.qmax = qmin, qmax

    def initial_grid(self):
        """The initial scale this quantizer searched (with its zero points on the asymmetric grid), to
        pass as ``init_scale`` to another method's quantizer of the same weight and grid: the same
        starting grid bit for bit, without the range search again (a SmolLM2 LM head's took 14 s)."""
        return (self._s0, self.zero) if self.grid == "asymmetric" else self._s0

    # -- shapes -------------------------------------------------------------------------------
    def _scale_shape(self) -> list:
        """Shape of the deployed s1: per tensor all ones; per channel [Cout] on out_axis; block-wise
        the weight's shape with ceil(K / block_size) on in_axis (ONNX's blocked DequantizeLinear)."""
        w = self.weight
        if self.block_size:
            shape = list(w.shape)
            shape[self.in_axis] = self.num_blocks
            return shape
        if self.per_channel:
            return broadcast_shape(w.ndim, self.out_axis, w.shape[self.out_axis])
        return [1] * w.ndim

    @property
    def num_blocks(self) -> int:
        return -(-self.weight.shape[self.in_axis] // self.block_size) if self.block_size else 1

    def _blocks(self, w: Tensor) -> Tensor:
        """[Cout * num_blocks, block_size] rows of a 2-D weight (the last block zero-padded, which no
        range search or rounding error sees), so per-row code serves per-block scales."""
        wt = w.movedim(self.in_axis, 1)  # [Cout, K]
        pad = self.num_blocks * self.block_size - wt.shape[1]
        if pad:
            wt = torch.nn.functional.pad(wt, (0, pad))
        return wt.reshape(-1, self.block_size)

    def _from_blocks(self, s_rows: Tensor) -> Tensor:
        """Per-row values from :meth:`_blocks` back to the scale shape."""
        return s_rows.reshape(-1, self.num_blocks).movedim(1, self.in_axis).contiguous()

    def expand_blocks(self, s: Tensor) -> Tensor:
        """A scale-shaped tensor repeated over each block so it broadcasts against the weight
        (identity unless block-wise)."""
        if not self.block_size:
            return s
        # a gather by block index: its backward is one index_add, where repeat_interleave's was a zero-padded
        # copy and a reshaped sum (5x slower fwd + bwd on a 576 x 1536 weight, each training step)
        return s.index_select(self.in_axis, self.block_of_row)

    @property
    def num_out(self) -> int:
        return self.weight.shape[self.out_axis] if self.out_axis is not None else 1

    def s_init(self) -> Tensor:
        """The initial scale, broadcastable, as every method uses it (signed exp of the stored log)."""
        return self.expand_blocks(self.scale_sign * torch.exp(self.log_s_init))

    # -- interface ----------------------------------------------------------------------------
    def scale_broadcast(self) -> Tensor:
        """Current deployed scale s1, shaped to broadcast against the weight (differentiable)."""
        raise NotImplementedError

    def forward(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def integers(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def scale(self) -> Tensor:
        """Deployed s1, float32, detached: 1-D [Cout] per channel, 0-d per tensor, block-wise the
        weight's rank with ceil(K / block_size) on in_axis."""
        s = self.scale_broadcast().detach().to(torch.float32)
        if self.block_size:
            idx = torch.arange(0, self.weight.shape[self.in_axis], self.block_size, device=s.device)
            return s.index_select(self.in_axis, idx).clone()
        return s.reshape(-1).clone() if self.per_channel else s.reshape(()).clone()

    def zero_point(self) -> Tensor:
        """Deployed zero point, int32, in ``scale()``'s shape (all zeros on the symmetric grids)."""
        z = self.zero.detach().to(torch.int32)
        if self.block_size:
            return z.clone()
        return z.reshape(-1).clone() if self.per_channel else z.reshape(()).clone()

    def stored_integers(self) -> Tensor:
        """What DequantizeLinear stores: ``integers()`` shifted by the zero point (unsigned on the
        asymmetric grid; the same integers on the symmetric ones)."""
        return self.integers() + self.expand_blocks(self.zero).to(torch.int32)

    def expand_scale(self, s: Tensor) -> Tensor:
        """Reshape a ``scale()`` back to the shape that broadcasts against the weight."""
        return self.expand_blocks(s.reshape(self._scale_shape()))

    def deployed_weight(self) -> Tensor:
        """integers() * scale() broadcast: the weight ONNX Runtime will see after DequantizeLinear."""
        return self.integers().to(torch.float32) * self.expand_scale(self.scale())

    def regularizer(self) -> Tensor:
        """Extra loss term added to the reconstruction loss (0 unless the method needs one)."""
        return self.weight.new_zeros(())

    def set_progress(self, t: float) -> None:
        """Fraction 0..1 of the training run done; drives schedules (AdaRound's beta)."""
        self.progress = float(min(max(t, 0.0), 1.0))

    def freeze(self) -> None:
        """Switch to the hard, deployed behaviour."""
        self.frozen = True

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.weight.shape)}, bits={self.bits}, out_axis={self.out_axis}, "
                f"in_axis={self.in_axis}, per_channel={self.per_channel}, block_size={self.block_size}, grid={self.grid}")
