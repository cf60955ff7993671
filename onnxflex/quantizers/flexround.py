"""FlexRound (Lee et al., ICML 2023): learnable element-wise division for weight rounding.

Follows the official code's log-space parameterisation:
    W_hat = s1 * clamp(round_ste(W / exp(log_s1 + log_S2 + log_s3 [+ log_s4])), qmin, qmax)
The divisor contains the same learned s1 as the outer multiplier, so only the integers
q = clamp(round(W / (s1*S2*s3*s4))) and s1 are deployed (S2, s3, s4 are folded into q).
On the signed grid s1 = sign * exp(log_s1) with the sign fixed at init (W / s1 = sign * W / |s1|).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .grid import WeightQuantizer, broadcast_shape


def _divide(w: Tensor, log_S2: Tensor, rest: Tensor) -> Tensor:
    """w / exp(log_S2 + rest), the element-wise division, in two buffers' worth of passes. The one
    arithmetic shared by training and by ``integers()``, so the deployed integers are the trained ones."""
    e = torch.add(log_S2, rest).exp_()
    return torch.div(w, e, out=e)


class _DivideRound(torch.autograd.Function):
    """s * clamp(round(w / exp(log_S2 + rest)), qmin, qmax) with straight-through rounding.

    Autograd of the same chain made about three times as many passes over the weight and kept more of
    them alive; on SmolLM2's MLP linears those passes, not the Gram product, were most of a step. Here
    the gradient of the divisor's log is one saved tensor, -s*z where the integer is inside the grid
    and 0 where clamped, and the scale's gradient reads the saved integers.
    """

    @staticmethod
    def forward(ctx, w, log_S2, rest, s, qmin, qmax):
        z = _divide(w, log_S2, rest)
        q = torch.round(z)
        inside = (q >= qmin) & (q <= qmax)
        q = torch.clamp(q, qmin, qmax)
        ctx.save_for_backward(z.mul_(s).mul_(inside).neg_(), q)  # z's buffer becomes d out / d log-divisor
        ctx.shapes = (rest.shape, s.shape)
        return q * s

    @staticmethod
    def backward(ctx, grad):
        dt, q = ctx.saved_tensors
        rest_shape, s_shape = ctx.shapes
        g_t = grad * dt
        g_rest = g_t.sum_to_size(rest_shape) if ctx.needs_input_grad[2] else None
        g_s = (grad * q).sum_to_size(s_shape) if ctx.needs_input_grad[3] else None
        return None, g_t, g_rest, g_s, None, None


class FlexRoundQuantizer(WeightQuantizer):
    """Learnable ``log_s1`` (scale shape), ``log_S2`` (weight shape), ``log_s3`` (per out channel)
    and, for conv weights (>= 3 dims), ``log_s4`` (per input channel), all initialised so the
    quantizer starts as RTN. Train them all with one Adam learning rate; no regulariser.

    ``use_s4``: None = the paper's choice (conv only); True/False to force it (needs ``in_axis``).
    """

    def __init__(self, weight, bits, out_axis, in_axis, per_channel=True, scale_method="lp",
                 init_scale=None, use_s4: Optional[bool] = None, block_size=0, grid="narrow"):
        super().__init__(weight, bits, out_axis, in_axis, per_channel, scale_method, init_scale, block_size, grid)
        w = self.weight
        # the weight seen through the sign of its scale, so the divisor stays exp(...) > 0
        self.register_buffer("w_signed", w * self.expand_blocks(self.scale_sign) if grid == "signed" else None,
                             persistent=False)
        self.log_s1 = nn.Parameter(self.log_s_init.clone())
        self.log_S2 = nn.Parameter(torch.zeros_like(w))
        if self.out_axis is not None:
            self.log_s3 = nn.Parameter(torch.zeros(broadcast_shape(w.ndim, self.out_axis, w.shape[self.out_axis]),
                                                   device=w.device))
        else:
            self.log_s3 = None
        if use_s4 is None:
            use_s4 = w.ndim >= 3 and self.in_axis is not None
        if use_s4:
            if self.in_axis is None:
                raise ValueError("use_s4 needs in_axis")
            self.log_s4 = nn.Parameter(torch.zeros(broadcast_shape(w.ndim, self.in_axis, w.shape[self.in_axis]),
                                                   device=w.device))
        else:
            self.log_s4 = None

    def element_parameters(self) -> list:
        return [self.log_S2]

    def scale_broadcast(self) -> Tensor:
        return self.expand_blocks(self.scale_sign * torch.exp(self.log_s1))

    def _divisor_rest(self) -> Tensor:
        """log(s1 * s3 * s4): the divisor's log without the per-weight S2 (block-expanded to the weight's
        shape when block-wise, broadcastable otherwise). s3 joins s1 before the block expansion: one
        weight-sized add and reduction fewer per step."""
        t = self.log_s1 if self.log_s3 is None else self.log_s1 + self.log_s3
        t = self.expand_blocks(t)
        if self.log_s4 is not None:
            t = t + self.log_s4
        return t

    def _signed_weight(self) -> Tensor:
        return self.weight if self.w_signed is None else self.w_signed

    def _z(self) -> Tensor:
        return _divide(self._signed_weight(), self.log_S2, self._divisor_rest())

    def forward(self) -> Tensor:
        return _DivideRound.apply(self._signed_weight(), self.log_S2, self._divisor_rest(), self.scale_broadcast(),
                                  self.qmin, self.qmax)

    @torch.no_grad()
    def integers(self) -> Tensor:
        return torch.clamp(torch.round(self._z()), self.qmin, self.qmax).to(torch.int32)
