"""Round to nearest: the zero-effort baseline, and what every learned method starts from."""
from __future__ import annotations

import torch
from torch import Tensor

from .grid import WeightQuantizer


class RTNQuantizer(WeightQuantizer):
    """q = clamp(round(W / s1)), s1 from the range search; no learnable parameters."""

    def __init__(self, weight, bits, out_axis, in_axis, per_channel=True, scale_method="lp", init_scale=None,
                 block_size=0, grid="narrow"):
        super().__init__(weight, bits, out_axis, in_axis, per_channel, scale_method, init_scale, block_size, grid)
        self.register_buffer("s", self.s_init())

    def scale_broadcast(self) -> Tensor:
        return self.s

    def _q(self) -> Tensor:
        return torch.clamp(torch.round(self.weight / self.s), self.qmin, self.qmax)

    def forward(self) -> Tensor:
        return self.s * self._q()

    @torch.no_grad()
    def integers(self) -> Tensor:
        return self._q().to(torch.int32)
