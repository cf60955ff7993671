"""Activation fake quantization: per-tensor scale and zero point, learnable step (LSQ)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .grid import act_qrange, round_ste


def grad_scale(x: Tensor, g: float) -> Tensor:
    """Forward value exactly ``x``; gradient multiplied by ``g`` (LSQ's step-size gradient scale)."""
    xg = x * g
    return x.detach() + (xg - xg.detach()) if x.requires_grad else x


class ActQuantizer(nn.Module):
    """y = s * (clamp(round(x / s) + z, qmin, qmax) - z): QuantizeLinear then DequantizeLinear with
    scale s and zero point z (0 for symmetric targets); qmin/qmax = act_qrange(bits), or [0, 2^bits - 1]
    when ``signed`` is False (uint8).

    x / s (not x * (1/s)) matches ONNX QuantizeLinear. With ``learn`` the step s is a parameter
    trained by LSQ: straight-through rounding and gradient scale 1/sqrt(numel * qmax) so its
    updates are comparable to the weights'. ``enabled = False`` makes it the identity.
    """

    def __init__(self, scale: float, bits: int = 8, learn: bool = True, eps: float = 1e-12, zero_point: int = 0,
                 signed: bool = True, max_scale: float = float("inf")):
        super().__init__()
        self.bits = int(bits)
        self.qmin, self.qmax = act_qrange(self.bits) if signed else (0, 2 ** self.bits - 1)
        if not self.qmin <= zero_point <= self.qmax:
            raise ValueError(f"zero point {zero_point} outside [{self.qmin}, {self.qmax}]")
        self.zero_point = int(zero_point)
        self.learn = bool(learn)
        self.eps = float(eps)
        self.max_scale = float(max_scale)  # a learned step never grows past it (a clamp the runtime folds into Q)
        self.enabled = True
        s = torch.tensor(float(scale), dtype=torch.float32)
        if not s > 0:
            raise ValueError(f"activation scale must be positive, got {scale}")
        if self.learn:
            self.step = nn.Parameter(s)
        else:
            self.register_buffer("step", s)

    def _step(self, numel: int) -> Tensor:
        s = self.step
        if self.learn and s.requires_grad:
            s = grad_scale(s, 1.0 / math.sqrt(max(numel, 1) * self.qmax))
        return s.clamp(self.eps, self.max_scale)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        s = self._step(x.numel())
        # clamp before rounding (LSQ's order): same values as QuantizeLinear's round-then-saturate
        # since the bounds are integers, but the gradient treats z in (qmax, qmax + 0.5] as clipped;
        # the zero point shifts the bounds (round(x/s) + z, not round(x/s + z): ties round to even)
        z = self.zero_point
        if not (torch.is_grad_enabled() and (x.requires_grad or s.requires_grad)):
            # the same values in place: one temporary instead of five (the streams' widest tensors are
            # hundreds of MB per batch)
            return torch.div(x, s).clamp_(self.qmin - z, self.qmax - z).round_().mul_(s)
        return round_ste(torch.clamp(x / s, self.qmin - z, self.qmax - z)) * s

    @torch.no_grad()
    def set_range(self, scale: float, zero_point: int = 0) -> None:
        """Replace the step and zero point (the calibrated candidates tried per activation)."""
        self.step.data.fill_(float(scale))
        self.zero_point = int(zero_point)

    def scale(self) -> float:
        """Current step as a Python float (written as the QuantizeLinear/DequantizeLinear scale)."""
        return float(self.step.detach().clamp(self.eps, self.max_scale))

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, scale={self.scale():.6g}, zero_point={self.zero_point}, learn={self.learn}, "
                f"enabled={self.enabled}")

