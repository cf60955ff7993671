"""Element-wise ops: unary and binary math, activations, Clip, Where, Cast, Dropout, IsNaN/IsInf."""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from .core import Tensor, _ONNX_DTYPE, _cast_to, _is_int, _opt, register


def _unary(op: str, fn: Callable[[Tensor], Tensor]) -> None:
    register(op)(lambda inputs, attrs, opset: [fn(inputs[0])])


for _op, _fn in {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "HardSwish": F.hardswish,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Exp": torch.exp,
    "Log": torch.log,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # both round half to even
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Identity": lambda x: x,
}.items():
    _unary(_op, _fn)


def _binary(op: str, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    register(op)(lambda inputs, attrs, opset: [fn(inputs[0], inputs[1])])


def _div(a: Tensor, b: Tensor) -> Tensor:
    """Integer Div truncates toward zero in ORT (C++ semantics), not floor like torch's //."""
    if _is_int(a) and _is_int(b):
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _pow(a: Tensor, b: Tensor) -> Tensor:
    """Output type follows the base (ONNX), e.g. float ** int64 exponent stays float32."""
    y = torch.pow(a, b)
    return y if y.dtype == a.dtype else y.to(a.dtype)


for _op, _fn in {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _div,
    "Pow": _pow,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}.items():
    _binary(_op, _fn)


def _variadic(op: str, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    register(op)(lambda inputs, attrs, opset: [functools.reduce(fn, inputs)])


_variadic("Min", torch.minimum)
_variadic("Max", torch.maximum)
_variadic("Sum", torch.add)


@register("Mean")
def mean(inputs, attrs, opset):
    return [functools.reduce(torch.add, inputs) / len(inputs)]


@register("LeakyRelu")
def leaky_relu(inputs, attrs, opset):
    return [F.leaky_relu(inputs[0], attrs.get("alpha", 0.01))]


@register("PRelu")
def prelu(inputs, attrs, opset):
    """Slope broadcasts unidirectionally (numpy-style), unlike torch's per-channel F.prelu."""
    x, slope = inputs
    return [torch.where(x < 0, x * slope, x)]


@register("Elu")
def elu(inputs, attrs, opset):
    return [F.elu(inputs[0], attrs.get("alpha", 1.0))]


@register("Selu")
def selu(inputs, attrs, opset):
    alpha = attrs.get("alpha", 1.67326319217681884765625)
    gamma = attrs.get("gamma", 1.05070102214813232421875)
    x = inputs[0]
    return [gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))]


@register("HardSigmoid")
def hard_sigmoid(inputs, attrs, opset):
    """ONNX's HardSigmoid has alpha/beta attrs (default 0.2/0.5), not torch's fixed 1/6, 1/2."""
    return [torch.clamp(inputs[0] * attrs.get("alpha", 0.2) + attrs.get("beta", 0.5), 0.0, 1.0)]


@register("Gelu")
def gelu(inputs, attrs, opset):
    return [F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))]


@register("IsInf")
def is_inf(inputs, attrs, opset):
    """detect_negative / detect_positive (both default 1) pick which infinities count."""
    x = inputs[0]
    neg, pos = attrs.get("detect_negative", 1), attrs.get("detect_positive", 1)
    if neg and pos:
        return [torch.isinf(x)]
    if neg:
        return [torch.isneginf(x)]
    if pos:
        return [torch.isposinf(x)]
    return [torch.zeros_like(x, dtype=torch.bool)]


@register("Clip")
def clip(inputs, attrs, opset):
    """min/max are attributes before opset 11 and optional inputs from 11 on."""
    x = inputs[0]
    if opset < 11:
        lo, hi = attrs.get("min"), attrs.get("max")
    else:
        lo, hi = _opt(inputs, 1), _opt(inputs, 2)
    if lo is None and hi is None:
        return [x]
    return [torch.clamp(x, lo, hi)]


@register("Where")
def where(inputs, attrs, opset):
    return [torch.where(inputs[0].bool(), inputs[1], inputs[2])]


@register("Cast")
def cast(inputs, attrs, opset):
    """To float16/bfloat16 rounds through that type but stays float32; double becomes float32."""
    to = attrs["to"]
    if to not in _ONNX_DTYPE:
        raise NotImplementedError(f"Cast to ONNX type {to} has no torch lifting")
    return [_cast_to(inputs[0], _ONNX_DTYPE[to])]


@register("CastLike")
def cast_like(inputs, attrs, opset):
    return [inputs[0].to(inputs[1].dtype)]


@register("Dropout")
def dropout(inputs, attrs, opset):
    """Inference: identity; the optional mask output is all-true."""
    x = inputs[0]
    return [x, torch.ones_like(x, dtype=torch.bool)]
