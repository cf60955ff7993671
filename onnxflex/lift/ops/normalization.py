"""Normalisation and softmax: Softmax, LogSoftmax, LayerNorm, BatchNorm, InstanceNorm."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .core import Tensor, _axis, _opt, register


def _coerce_2d(x: Tensor, axis: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Opset<13 (Log)Softmax: flatten to [prod(shape[:axis]), prod(shape[axis:])], apply on dim 1."""
    axis = _axis(axis, x.dim())
    shape = x.shape
    lead = math.prod(shape[:axis])
    return fn(x.reshape(lead, -1)).reshape(shape)


def _softmax_op(fn):
    """Softmax/LogSoftmax: before opset 13 over the input coerced to 2-D at ``axis`` (default 1)."""
    def lift(inputs, attrs, opset):
        x = inputs[0]
        if opset < 13:
            return [_coerce_2d(x, attrs.get("axis", 1), lambda t: fn(t, 1))]
        return [fn(x, attrs.get("axis", -1))]
    return lift


register("Softmax")(_softmax_op(torch.softmax))
register("LogSoftmax")(_softmax_op(torch.log_softmax))


@register("LayerNormalization")
def layer_norm(inputs, attrs, opset):
    """Normalise over dims [axis, rank); Scale/B broadcast. Also returns Mean and InvStdDev."""
    x, scale, bias = inputs[0], inputs[1], _opt(inputs, 2)
    eps = attrs.get("epsilon", 1e-5)
    axis = _axis(attrs.get("axis", -1), x.dim())
    dims = tuple(range(axis, x.dim()))
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    inv = torch.rsqrt(var + eps)
    y = (x - mu) * inv * scale
    if bias is not None:
        y = y + bias
    return [y, mu, inv]


@register("BatchNormalization")
def batch_norm(inputs, attrs, opset):
    """Inference form only (running statistics); training_mode=1 is refused."""
    if attrs.get("training_mode", 0):
        raise NotImplementedError("BatchNormalization with training_mode=1 has no torch lifting")
    x, scale, b, mean_, var = inputs[:5]
    return [F.batch_norm(x, mean_, var, scale, b, False, 0.0, attrs.get("epsilon", 1e-5))]


@register("InstanceNormalization")
def instance_norm(inputs, attrs, opset):
    x, scale, b = inputs[:3]
    return [F.instance_norm(x, weight=scale, bias=b, eps=attrs.get("epsilon", 1e-5))]
