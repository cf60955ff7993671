"""Activation fake quantization: per-tensor symmetric, learnable step (LSQ), plus QDrop mixing."""
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
    """y = s * clamp(round(x / s), qmin, qmax), qmin/qmax = act_qrange(bits), zero point 0.

    x / s (not x * (1/s)) matches ONNX QuantizeLinear. With ``learn`` the step s is a parameter
    trained by LSQ: straight-through rounding and gradient scale 1/sqrt(numel * qmax) so its
    updates are comparable to the weights'. ``enabled = False`` makes it the identity.
    """

    def __init__(self, scale: float, bits: int = 8, learn: bool = True, eps: float = 1e-12):
        super().__init__()
        self.bits = int(bits)
        self.qmin, self.qmax = act_qrange(self.bits)
        self.learn = bool(learn)
        self.eps = float(eps)
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
        return s.clamp_min(self.eps)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        s = self._step(x.numel())
        # clamp before rounding (LSQ's order): same values as QuantizeLinear's round-then-saturate
        # since the bounds are integers, but the gradient treats z in (qmax, qmax + 0.5] as clipped
        return round_ste(torch.clamp(x / s, self.qmin, self.qmax)) * s

    def scale(self) -> float:
        """Current step as a Python float (written as the QuantizeLinear/DequantizeLinear scale)."""
        return float(self.step.detach().clamp_min(self.eps))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale():.6g}, learn={self.learn}, enabled={self.enabled}"


def qdrop(x_q: Tensor, x_fp: Tensor, p: float = 0.5) -> Tensor:
    """QDrop (Wei et al. 2022): element-wise take the quantized value with probability p, else FP."""
    if p >= 1.0:
        return x_q
    if p <= 0.0:
        return x_fp
    return torch.where(torch.rand_like(x_q) < p, x_q, x_fp)
