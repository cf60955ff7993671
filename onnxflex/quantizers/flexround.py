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

from .grid import WeightQuantizer, broadcast_shape, round_ste


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

    def _log_divisor(self) -> Tensor:
        t = self.expand_blocks(self.log_s1) + self.log_S2
        if self.log_s3 is not None:
            t = t + self.log_s3
        if self.log_s4 is not None:
            t = t + self.log_s4
        return t

    def _z(self) -> Tensor:
        return (self.weight if self.w_signed is None else self.w_signed) / torch.exp(self._log_divisor())

    def forward(self) -> Tensor:
        return self.scale_broadcast() * torch.clamp(round_ste(self._z()), self.qmin, self.qmax)

    @torch.no_grad()
    def integers(self) -> Tensor:
        return torch.clamp(torch.round(self._z()), self.qmin, self.qmax).to(torch.int32)
