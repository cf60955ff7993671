"""AdaRound (Nagel et al., ICML 2020): learn up/down rounding per weight; the baseline method.

W_hat = s * clamp(floor(W/s) + h(V), qmin, qmax), h(V) = clip(sigmoid(V)(zeta-gamma)+gamma, 0, 1),
with a regulariser lam * sum(1 - |2h-1|^beta) that pushes h to {0, 1} as beta anneals 20 -> 2
after a 20 % warm-up. The scale s stays fixed at its initial value.

Note on lam: 0.01 is the value from the paper/BRECQ code, where the reconstruction loss is the
squared error *summed over output features and averaged over the batch*; with a plain MSE (mean over
all elements) the regulariser is relatively far stronger, so scale the loss or lam accordingly.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .grid import WeightQuantizer

ZETA = 1.1
GAMMA = -0.1


class AdaRoundQuantizer(WeightQuantizer):
    """Learnable V (weight shape); call ``set_progress`` every step so beta and warm-up advance."""

    def __init__(self, weight, bits, out_axis, in_axis, per_channel=True, scale_method="lp",
                 init_scale=None, lam: float = 0.01, beta_start: float = 20.0, beta_end: float = 2.0,
                 warmup: float = 0.2, block_size=0, grid="narrow"):
        super().__init__(weight, bits, out_axis, in_axis, per_channel, scale_method, init_scale, block_size, grid)
        self.lam, self.beta_start, self.beta_end, self.warmup = float(lam), float(beta_start), float(beta_end), float(warmup)
        s = self.s_init()
        self.register_buffer("s", s)
        z = self.weight / s
        w_floor = torch.floor(z)
        self.register_buffer("w_floor", w_floor)
        rest = (z - w_floor).clamp(0.0, 1.0)
        # h(V) == rest  <=>  sigmoid(V) = (rest - gamma) / (zeta - gamma); rest in [0,1) keeps it inside (0,1)
        self.V = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0))

    def scale_broadcast(self) -> Tensor:
        return self.s

    def h(self) -> Tensor:
        """Soft rounding offset in [0, 1]; hard {0, 1} once frozen."""
        if self.frozen:
            return (self.V >= 0).to(self.V.dtype).detach()
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def forward(self) -> Tensor:
        return self.s * torch.clamp(self.w_floor + self.h(), self.qmin, self.qmax)

    @torch.no_grad()
    def integers(self) -> Tensor:
        return torch.clamp(self.w_floor + (self.V >= 0).to(self.w_floor.dtype), self.qmin, self.qmax).to(torch.int32)

    def beta(self) -> float:
        """Annealed exponent: beta_start at the end of warm-up, linearly down to beta_end at t = 1."""
        if self.progress <= self.warmup:
            return self.beta_start
        rel = (self.progress - self.warmup) / max(1.0 - self.warmup, 1e-12)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1.0 - rel)

    def regularizer(self) -> Tensor:
        if self.frozen or self.progress < self.warmup:
            return self.weight.new_zeros(())
        h = self.h()
        return self.lam * (1.0 - (2.0 * h - 1.0).abs().pow(self.beta())).sum()
