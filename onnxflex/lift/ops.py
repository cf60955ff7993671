"""ONNX op -> torch function registry.

Regions of an ONNX graph are re-executed in torch so that their weights can be optimised by
gradient descent. Every function here must reproduce ONNX Runtime's result for the same node
(to ~1e-5), otherwise the reconstruction target (ORT's FP32 output) and the torch replay
disagree before any quantization happens.

Conventions
-----------
``fn(inputs, attrs, opset) -> list[Tensor]``: ``inputs`` in ONNX order with ``None`` for omitted
optional inputs; ``attrs`` as decoded by :func:`node_attrs`; the result lists outputs in ONNX order
(trailing optional outputs may be missing). Floating tensors are float32 throughout; integer
tensors (shape arithmetic) stay int64 so that Shape/Gather/Concat/Reshape chains work on-device.
Values that steer control (shapes, axes, pads) are read with ``.tolist()`` and never need grads.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

Tensor = torch.Tensor
OpFn = Callable[[list, dict, int], list]

OPS: dict[str, OpFn] = {}

#: Reserved attrs key: callers put ``len(node.output)`` here. Split without explicit sizes (opset<18)
#: divides into as many parts as the node has outputs, which the attributes alone do not tell.
NUM_OUTPUTS = "_num_outputs"


def register(*op_types: str) -> Callable[[OpFn], OpFn]:
    """Decorator: register ``fn`` as the torch lifting of the given ONNX op types."""

    def deco(fn: OpFn) -> OpFn:
        for op in op_types:
            OPS[op] = fn
        return fn

    return deco


def is_supported(op_type: str) -> bool:
    """True when ``op_type`` (default ONNX domain) has a torch lifting."""
    return op_type in OPS


# --------------------------------------------------------------------------------------------
# attribute / tensor conversion
# --------------------------------------------------------------------------------------------


def _decode_attr(a: onnx.AttributeProto):
    v = onnx.helper.get_attribute_value(a)
    T = onnx.AttributeProto
    if a.type == T.STRING:
        return v.decode("utf-8")
    if a.type == T.STRINGS:
        return [s.decode("utf-8") for s in v]
    if a.type == T.TENSOR:
        return numpy_helper.to_array(v)
    if a.type == T.TENSORS:
        return [numpy_helper.to_array(t) for t in v]
    if a.type in (T.INTS, T.FLOATS):
        return list(v)
    return v  # INT, FLOAT, GRAPH(S), SPARSE_TENSOR, TYPE_PROTO: as onnx gives them


def node_attrs(node: onnx.NodeProto) -> dict:
    """Attributes of ``node`` as plain python values (str, int, float, lists, numpy arrays)."""
    return {a.name: _decode_attr(a) for a in node.attribute}


def numpy_to_torch(arr: np.ndarray) -> Tensor:
    """Convert an ONNX constant to torch: floats -> float32, bool kept, integers kept integer.

    Unsigned types other than uint8 have poor torch support, so they widen to int64.
    """
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        dtype = np.float32
    elif arr.dtype.kind == "u" and arr.dtype != np.uint8:
        dtype = np.int64
    elif arr.dtype.kind in "biu":
        dtype = arr.dtype
    else:
        raise NotImplementedError(f"constant of dtype {arr.dtype} has no torch lifting")
    # own, writable, C-ordered copy (keeps 0-d shape, unlike np.ascontiguousarray)
    return torch.from_numpy(np.array(arr, dtype=dtype, order="C", copy=True))


# ONNX TensorProto enum -> torch dtype used to *store* the result. Float16/bfloat16 are rounded
# through their type and stored as float32 (the region computes in float32); double is float32.
_ONNX_DTYPE = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.UINT16: torch.int32,
    onnx.TensorProto.UINT32: torch.int64,
    onnx.TensorProto.UINT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
}


def _cast_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype in (torch.float16, torch.bfloat16):
        return x.to(dtype).to(torch.float32)  # same rounding as ORT, still computed in float32
    return x.to(dtype)


def onnx_to_torch_dtype(elem_type: int) -> torch.dtype:
    """Torch dtype that holds tensors of ONNX ``elem_type`` (floats all map to float32)."""
    if elem_type not in _ONNX_DTYPE:
        raise NotImplementedError(f"ONNX tensor type {elem_type} has no torch lifting")
    d = _ONNX_DTYPE[elem_type]
    return torch.float32 if d in (torch.float16, torch.bfloat16) else d


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _opt(inputs: list, i: int) -> Optional[Tensor]:
    """Optional input ``i``: None when omitted ('' name or trailing)."""
    return inputs[i] if i < len(inputs) else None


def _ints(t) -> list[int]:
    if isinstance(t, Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in np.asarray(t).reshape(-1).tolist()]


def _floats(t) -> list[float]:
    if isinstance(t, Tensor):
        return [float(v) for v in t.reshape(-1).tolist()]
    return [float(v) for v in np.asarray(t).reshape(-1).tolist()]


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _is_int(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex()


def _spatial_pads(attrs: dict, in_spatial, kernel, strides, dilations) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial dim, resolving auto_pad the way ORT does."""
    n = len(kernel)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        res = []
        for i in range(n):
            out = -(-in_spatial[i] // strides[i])
            k_eff = (kernel[i] - 1) * dilations[i] + 1
            total = max(0, (out - 1) * strides[i] + k_eff - in_spatial[i])
            small = total // 2
            res.append((small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small))
        return res
    if auto_pad == "VALID":
        return [(0, 0)] * n
    pads = attrs.get("pads", [0] * (2 * n))
    return [(int(pads[i]), int(pads[i + n])) for i in range(n)]


def _torch_pad(pads: list[tuple[int, int]]) -> list[int]:
    """ONNX per-dim (begin, end) for trailing dims -> F.pad's last-dim-first flat list."""
    out: list[int] = []
    for b, e in reversed(pads):
        out += [b, e]
    return out


def _by_rank(n: int, fns: tuple, what: str):
    if not 1 <= n <= len(fns):
        raise NotImplementedError(f"{what} with {n} spatial dims has no torch lifting")
    return fns[n - 1]


# --------------------------------------------------------------------------------------------
# convolution / linear algebra
# --------------------------------------------------------------------------------------------


@register("Conv")
def conv(inputs, attrs, opset):
    """N-d convolution; asymmetric (e.g. SAME_UPPER) pads go through F.pad since torch pads symmetrically."""
    x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
    n = w.dim() - 2
    strides = attrs.get("strides", [1] * n)
    dil = attrs.get("dilations", [1] * n)
    pads = _spatial_pads(attrs, list(x.shape[2:]), list(w.shape[2:]), strides, dil)
    if all(pb == pe for pb, pe in pads):
        padding = [pb for pb, _ in pads]
    else:
        x, padding = F.pad(x, _torch_pad(pads)), 0
    fn = _by_rank(n, (F.conv1d, F.conv2d, F.conv3d), "Conv")
    return [fn(x, w, b, strides, padding, dil, attrs.get("group", 1))]


@register("ConvTranspose")
def conv_transpose(inputs, attrs, opset):
    """Transposed conv: run unpadded, then crop pads / extend by output_padding (bias added last
    so the output_padding border holds the bias, as in ONNX)."""
    x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
    n = w.dim() - 2
    strides = attrs.get("strides", [1] * n)
    dil = attrs.get("dilations", [1] * n)
    group = attrs.get("group", 1)
    in_sp = list(x.shape[2:])
    k = list(w.shape[2:])
    out_pad = list(attrs.get("output_padding", [0] * n))
    full = [strides[i] * (in_sp[i] - 1) + (k[i] - 1) * dil[i] + 1 for i in range(n)]
    auto_pad = attrs.get("auto_pad", "NOTSET")
    out_shape = attrs.get("output_shape")
    if out_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if out_shape is None:
            out_shape = [in_sp[i] * strides[i] for i in range(n)]
        out_shape = list(out_shape)[-n:]
        pads = []
        for i in range(n):
            total = full[i] + out_pad[i] - out_shape[i]
            half = total // 2
            pads.append((half, total - half) if auto_pad == "SAME_UPPER" else (total - half, half))
    elif auto_pad == "VALID":
        pads = [(0, 0)] * n
    else:
        p = attrs.get("pads", [0] * (2 * n))
        pads = [(int(p[i]), int(p[i + n])) for i in range(n)]
    fn = _by_rank(n, (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), "ConvTranspose")
    y = fn(x, w, None, strides, 0, 0, group, dil)
    # extend by output_padding (zeros), then crop begin/end pads (negative F.pad = crop)
    y = F.pad(y, _torch_pad([(-pb, op - pe) for (pb, pe), op in zip(pads, out_pad)]))
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * n)
    return [y]


@register("Gemm")
def gemm(inputs, attrs, opset):
    a, b, c = inputs[0], inputs[1], _opt(inputs, 2)
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    y = a @ b
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else c * beta)
    return [y]


@register("MatMul")
def matmul(inputs, attrs, opset):
    return [torch.matmul(inputs[0], inputs[1])]


@register("Einsum")
def einsum(inputs, attrs, opset):
    return [torch.einsum(attrs["equation"].replace(" ", ""), *inputs)]


# --------------------------------------------------------------------------------------------
# elementwise
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# normalisation / softmax
# --------------------------------------------------------------------------------------------


def _coerce_2d(x: Tensor, axis: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Opset<13 (Log)Softmax: flatten to [prod(shape[:axis]), prod(shape[axis:])], apply on dim 1."""
    axis = _axis(axis, x.dim())
    shape = x.shape
    lead = math.prod(shape[:axis])
    return fn(x.reshape(lead, -1)).reshape(shape)


@register("Softmax")
def softmax(inputs, attrs, opset):
    x = inputs[0]
    if opset < 13:
        return [_coerce_2d(x, attrs.get("axis", 1), lambda t: torch.softmax(t, 1))]
    return [torch.softmax(x, attrs.get("axis", -1))]


@register("LogSoftmax")
def log_softmax(inputs, attrs, opset):
    x = inputs[0]
    if opset < 13:
        return [_coerce_2d(x, attrs.get("axis", 1), lambda t: torch.log_softmax(t, 1))]
    return [torch.log_softmax(x, attrs.get("axis", -1))]


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


# --------------------------------------------------------------------------------------------
# reductions / pooling
# --------------------------------------------------------------------------------------------


def _reduce(inputs, attrs, opset, axes_input_since: int, fn) -> list:
    """Shared Reduce* handling: axes attr (old opsets) or input, keepdims, noop_with_empty_axes."""
    x = inputs[0]
    keep = bool(attrs.get("keepdims", 1))
    if opset >= axes_input_since:
        a = _opt(inputs, 1)
        axes = _ints(a) if a is not None else []
    else:
        axes = list(attrs.get("axes", []))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0) or x.dim() == 0:
            return [x]
        axes = list(range(x.dim()))
    dims = tuple(sorted(_axis(a, x.dim()) for a in axes))
    return [fn(x, dims, keep)]


@register("ReduceMean")
def reduce_mean(inputs, attrs, opset):
    return _reduce(inputs, attrs, opset, 18, lambda x, d, k: torch.mean(x, d, keepdim=k))


@register("ReduceSum")
def reduce_sum(inputs, attrs, opset):
    return _reduce(inputs, attrs, opset, 13, lambda x, d, k: torch.sum(x, d, keepdim=k))


@register("ReduceMax")
def reduce_max(inputs, attrs, opset):
    return _reduce(inputs, attrs, opset, 18, lambda x, d, k: torch.amax(x, d, keepdim=k))


@register("ReduceMin")
def reduce_min(inputs, attrs, opset):
    return _reduce(inputs, attrs, opset, 18, lambda x, d, k: torch.amin(x, d, keepdim=k))


@register("ReduceSumSquare")
def reduce_sum_square(inputs, attrs, opset):
    return _reduce(inputs, attrs, opset, 18, lambda x, d, k: torch.sum(x * x, d, keepdim=k))


@register("ReduceL2")
def reduce_l2(inputs, attrs, opset):
    return _reduce(inputs, attrs, opset, 18, lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)))


@register("GlobalAveragePool")
def global_average_pool(inputs, attrs, opset):
    x = inputs[0]
    return [x.mean(tuple(range(2, x.dim())), keepdim=True)]


@register("GlobalMaxPool")
def global_max_pool(inputs, attrs, opset):
    x = inputs[0]
    return [x.amax(tuple(range(2, x.dim())), keepdim=True)]


def _pool_geometry(attrs: dict, x: Tensor):
    """Kernel, strides, dilations, (begin,end) pads and the extra end padding ceil_mode needs.

    The extra padding never counts towards averages; a last window that would start inside the
    end padding is dropped (ORT and torch agree on that rule).
    """
    kernel = list(attrs["kernel_shape"])
    n = len(kernel)
    strides = list(attrs.get("strides", [1] * n))
    dil = list(attrs.get("dilations", [1] * n))
    in_sp = list(x.shape[2:])
    pads = _spatial_pads(attrs, in_sp, kernel, strides, dil)
    extra = []
    for i in range(n):
        k_eff = (kernel[i] - 1) * dil[i] + 1
        span = in_sp[i] + pads[i][0] + pads[i][1] - k_eff
        if attrs.get("ceil_mode", 0):
            out = -(-span // strides[i]) + 1
            if (out - 1) * strides[i] >= in_sp[i] + pads[i][0]:
                out -= 1
        else:
            out = span // strides[i] + 1
        extra.append(max(0, (out - 1) * strides[i] + k_eff - (in_sp[i] + pads[i][0] + pads[i][1])))
    return kernel, strides, dil, pads, extra


@register("AveragePool")
def average_pool(inputs, attrs, opset):
    """Pad explicitly (pads may be asymmetric), then divide window sums by a count map so that
    count_include_pad and ceil_mode follow ORT exactly."""
    x = inputs[0]
    kernel, strides, dil, pads, extra = _pool_geometry(attrs, x)
    n = len(kernel)
    if any(d != 1 for d in dil):
        raise NotImplementedError("AveragePool with dilations has no torch lifting")
    avg = _by_rank(n, (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d), "AveragePool")
    if all(p == (0, 0) for p in pads) and not any(extra):
        return [avg(x, kernel, strides)]
    full = [(pb, pe + ex) for (pb, pe), ex in zip(pads, extra)]
    ksize = math.prod(kernel)
    sums = avg(F.pad(x, _torch_pad(full)), kernel, strides) * ksize
    ones = torch.ones([1, 1] + list(x.shape[2:]), dtype=x.dtype, device=x.device)
    if attrs.get("count_include_pad", 0):
        ones = F.pad(ones, _torch_pad(pads), value=1.0)
        ones = F.pad(ones, _torch_pad([(0, ex) for ex in extra]), value=0.0)
    else:
        ones = F.pad(ones, _torch_pad(full), value=0.0)
    counts = avg(ones, kernel, strides) * ksize
    return [sums / counts]


@register("MaxPool")
def max_pool(inputs, attrs, opset):
    """Pads with -inf (asymmetric allowed). The optional Indices output is not produced."""
    x = inputs[0]
    kernel, strides, dil, pads, extra = _pool_geometry(attrs, x)
    n = len(kernel)
    mp = _by_rank(n, (F.max_pool1d, F.max_pool2d, F.max_pool3d), "MaxPool")
    full = [(pb, pe + ex) for (pb, pe), ex in zip(pads, extra)]
    if any(p != (0, 0) for p in full):
        low = float("-inf") if x.is_floating_point() else torch.iinfo(x.dtype).min
        x = F.pad(x, _torch_pad(full), value=low)
    return [mp(x, kernel, strides, 0, dil)]


# --------------------------------------------------------------------------------------------
# shape manipulation
# --------------------------------------------------------------------------------------------


@register("Reshape")
def reshape(inputs, attrs, opset):
    """0 copies the input dim (unless allowzero=1), -1 is inferred."""
    x = inputs[0]
    shape = _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


@register("Flatten")
def flatten(inputs, attrs, opset):
    x = inputs[0]
    axis = _axis(attrs.get("axis", 1), x.dim())
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


@register("Transpose")
def transpose(inputs, attrs, opset):
    x = inputs[0]
    perm = attrs.get("perm", list(range(x.dim()))[::-1])
    return [x.permute(perm)]


@register("Concat")
def concat(inputs, attrs, opset):
    return [torch.cat([t for t in inputs if t is not None], dim=attrs["axis"])]


@register("Split")
def split(inputs, attrs, opset):
    """Sizes from input (opset>=13) or attr; else num_outputs (ceil chunks, opset 18) or equal parts."""
    x = inputs[0]
    axis = _axis(attrs.get("axis", 0), x.dim())
    sizes = None
    if opset >= 13:
        s = _opt(inputs, 1)
        if s is not None and s.numel():
            sizes = _ints(s)
    elif attrs.get("split"):
        sizes = list(attrs["split"])
    d = x.shape[axis]
    if sizes is None:
        if "num_outputs" in attrs:
            n = attrs["num_outputs"]
            chunk = -(-d // n)
            sizes = [chunk] * (n - 1) + [d - chunk * (n - 1)]
        elif NUM_OUTPUTS in attrs:
            n = attrs[NUM_OUTPUTS]
            if d % n:
                raise ValueError(f"Split: dim {d} not divisible into {n} equal outputs")
            sizes = [d // n] * n
        else:
            raise ValueError("Split without sizes needs attrs['num_outputs'] or attrs[NUM_OUTPUTS]")
    return list(torch.split(x, sizes, dim=axis))


@register("Slice")
def slice_(inputs, attrs, opset):
    """starts/ends/axes/steps as inputs (opset>=10) or attrs; negative indices and out-of-range
    (e.g. INT64_MAX) ends are clamped per the ONNX spec; negative steps use index_select."""
    x = inputs[0]
    if opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes, steps = attrs.get("axes"), None
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if _opt(inputs, 3) is not None else None
        steps = _ints(inputs[4]) if _opt(inputs, 4) is not None else None
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for a, s, e, st in zip(axes, starts, ends, steps):
        a = _axis(a, x.dim())
        d = x.shape[a]
        if st == 0:
            raise ValueError("Slice step cannot be 0")
        s = s + d if s < 0 else s
        e = e + d if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), d), min(max(e, 0), d)
            x = x[(slice(None),) * a + (slice(s, e, st),)]
        else:
            s, e = min(max(s, 0), d - 1), min(max(e, -1), d - 1)
            x = x.index_select(a, torch.arange(s, e, st, device=x.device))
    return [x]


@register("Gather")
def gather(inputs, attrs, opset):
    """out.shape = data.shape[:axis] + indices.shape + data.shape[axis+1:]; negative indices wrap."""
    x, idx = inputs[0], inputs[1].long()
    axis = _axis(attrs.get("axis", 0), x.dim())
    d = x.shape[axis]
    idx = torch.where(idx < 0, idx + d, idx)
    out = x.index_select(axis, idx.reshape(-1))
    return [out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1 :]))]


@register("GatherND")
def gather_nd(inputs, attrs, opset):
    """indices[..., :k] address data's first k dims after ``batch_dims`` shared leading dims."""
    x, idx = inputs[0], inputs[1].long()
    b = int(attrs.get("batch_dims", 0))
    lead = tuple(x.shape[:b])
    nb = int(np.prod(lead)) if b else 1
    xs = x.reshape((nb,) + tuple(x.shape[b:]))
    ids = idx.reshape((nb,) + tuple(idx.shape[b:]))
    k = ids.shape[-1]
    ids = torch.where(ids < 0, ids + torch.tensor(xs.shape[1:1 + k], device=ids.device), ids)
    outs = [xs[i][tuple(ids[i][..., j] for j in range(k))] for i in range(nb)]
    out = torch.stack(outs)
    return [out.reshape(lead + tuple(out.shape[1:])) if b else out[0]]


@register("GatherElements")
def gather_elements(inputs, attrs, opset):
    x, idx = inputs[0], inputs[1].long()
    axis = _axis(attrs.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return [torch.gather(x, axis, idx)]


@register("Unsqueeze")
def unsqueeze(inputs, attrs, opset):
    """Axes (input from opset 13, attr before) index the *output* rank."""
    x = inputs[0]
    axes = _ints(inputs[1]) if opset >= 13 else list(attrs["axes"])
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return [x]


@register("Squeeze")
def squeeze(inputs, attrs, opset):
    """Axes (input from opset 13, attr before); none = drop every size-1 dim."""
    x = inputs[0]
    if opset >= 13:
        a = _opt(inputs, 1)
        axes = _ints(a) if a is not None else None
    else:
        axes = attrs.get("axes")
    if axes is None:
        return [x.squeeze()]
    return [x.squeeze(tuple(_axis(a, x.dim()) for a in axes))]


@register("Pad")
def pad(inputs, attrs, opset):
    """constant/reflect/edge/wrap; pads (and constant_value, axes) are inputs from opset 11.
    Non-constant modes are done with index_select so they work on any rank and any axis."""
    x = inputs[0]
    mode = attrs.get("mode", "constant")
    axes = None
    if opset < 11:
        pads, value = list(attrs["pads"]), attrs.get("value", 0.0)
    else:
        pads = _ints(inputs[1])
        cv = _opt(inputs, 2)
        value = cv.reshape(-1)[0].item() if cv is not None and cv.numel() else 0
        if _opt(inputs, 3) is not None:
            axes = _ints(inputs[3])
    r = x.dim()
    axes = [_axis(a, r) for a in axes] if axes is not None else list(range(r))
    n = len(axes)
    per_axis = {a: (pads[i], pads[i + n]) for i, a in enumerate(axes)}
    if mode == "constant":
        return [F.pad(x, _torch_pad([per_axis.get(a, (0, 0)) for a in range(r)]), value=value)]
    for a, (b, e) in per_axis.items():
        if b == 0 and e == 0:
            continue
        d = x.shape[a]
        i = torch.arange(-b, d + e, device=x.device)
        if mode == "edge":
            i = i.clamp(0, d - 1)
        elif mode == "reflect":
            period = 2 * (d - 1)
            if period == 0:
                i = torch.zeros_like(i)
            else:
                i = i.remainder(period)
                i = torch.where(i >= d, period - i, i)
        elif mode == "wrap":
            i = i.remainder(d)
        else:
            raise NotImplementedError(f"Pad mode {mode!r} has no torch lifting")
        x = x.index_select(a, i)
    return [x]


@register("Expand")
def expand(inputs, attrs, opset):
    """Bidirectional broadcast (a target dim of 1 keeps the input's dim), unlike Tensor.expand."""
    x = inputs[0]
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(inputs[1])))
    return [x.expand(shape)]


@register("Tile")
def tile(inputs, attrs, opset):
    return [inputs[0].repeat(_ints(inputs[1]))]


@register("Shape")
def shape(inputs, attrs, opset):
    """int64 shape on the input's device; start/end (opset 15) are clamped like Python slices."""
    x = inputs[0]
    dims = list(x.shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return [torch.tensor(dims[start:end], dtype=torch.int64, device=x.device)]


@register("Size")
def size(inputs, attrs, opset):
    return [torch.tensor(inputs[0].numel(), dtype=torch.int64, device=inputs[0].device)]


@register("ConstantOfShape")
def constant_of_shape(inputs, attrs, opset):
    shp = inputs[0]
    value = attrs.get("value")
    v = numpy_to_torch(value if value is not None else np.zeros(1, np.float32)).reshape(-1)[0]
    return [torch.full(_ints(shp), v.item(), dtype=v.dtype, device=shp.device)]


@register("Range")
def range_(inputs, attrs, opset):
    start, limit, delta = inputs
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)]


@register("Constant")
def constant(inputs, attrs, opset):
    """Value from whichever value* attribute is set (on CPU; RegionModule turns these into buffers)."""
    if "value" in attrs:
        return [numpy_to_torch(attrs["value"])]
    if "value_float" in attrs:
        return [torch.tensor(attrs["value_float"], dtype=torch.float32)]
    if "value_floats" in attrs:
        return [torch.tensor(list(attrs["value_floats"]), dtype=torch.float32)]
    if "value_int" in attrs:
        return [torch.tensor(attrs["value_int"], dtype=torch.int64)]
    if "value_ints" in attrs:
        return [torch.tensor(list(attrs["value_ints"]), dtype=torch.int64)]
    raise NotImplementedError(f"Constant with attributes {sorted(attrs)} has no torch lifting")


# --------------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------------


def _resize_coords(ctm: str, out_len: int, in_len: int, scale: float, roi: tuple[float, float]) -> np.ndarray:
    """Source coordinate of every output index, in float32 with ORT's operation order, so that
    nearest-neighbour ties round the same way as ORT."""
    x = np.arange(out_len, dtype=np.float32)
    s = np.float32(scale)
    h = np.float32(0.5)
    if ctm == "half_pixel":
        return (x + h) / s - h
    if ctm == "half_pixel_symmetric":
        adj = np.float32(out_len) / (s * np.float32(in_len))
        center = np.float32(in_len) / np.float32(2)
        offset = center * (np.float32(1) - adj)
        return offset + (x + h) / s - h
    if ctm == "pytorch_half_pixel":
        return (x + h) / s - h if out_len > 1 else np.zeros_like(x)
    if ctm == "align_corners":
        return np.zeros_like(x) if out_len == 1 else x * np.float32(in_len - 1) / np.float32(out_len - 1)
    if ctm == "asymmetric":
        return x / s
    if ctm == "tf_half_pixel_for_nn":
        return (x + h) / s
    if ctm == "tf_crop_and_resize":
        r0, r1 = np.float32(roi[0]), np.float32(roi[1])
        n = np.float32(in_len - 1)
        if out_len > 1:
            return r0 * n + x * (r1 - r0) * n / np.float32(out_len - 1)
        return np.full_like(x, h * (r0 + r1) * n)
    raise NotImplementedError(f"Resize coordinate_transformation_mode {ctm!r} has no torch lifting")


def _nearest(xo: np.ndarray, mode: str, downsample: bool) -> np.ndarray:
    if mode == "round_prefer_floor":
        return np.ceil(xo - np.float32(0.5))
    if mode == "round_prefer_ceil":
        return np.floor(xo + np.float32(0.5))
    if mode == "floor":
        return np.floor(xo)
    if mode == "ceil":
        return np.ceil(xo)
    if mode == "simple":  # opset 10 Resize as implemented by ORT
        return np.ceil(xo) if downsample else np.trunc(xo)
    raise NotImplementedError(f"Resize nearest_mode {mode!r} has no torch lifting")


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic kernel weights for taps at floor(x)-1 .. floor(x)+2, ``t`` = x - floor(x)."""
    a = np.float32(a)
    d = np.stack([t + 1, t, 1 - t, 2 - t], axis=-1).astype(np.float32)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, far).astype(np.float32)


def _resize_axis(x: Tensor, axis: int, out_len: int, scale: float, attrs: dict, ctm: str,
                 nearest_mode: str, roi: tuple[float, float]) -> Tensor:
    """Resample one axis; N-d linear/cubic is separable, so axes are done one after another."""
    in_len = x.shape[axis]
    mode = attrs.get("mode", "nearest")
    xo = _resize_coords(ctm, out_len, in_len, scale, roi)
    dev = x.device
    bshape = [1] * x.dim()
    bshape[axis] = out_len

    def take(i: np.ndarray) -> Tensor:
        return x.index_select(axis, torch.from_numpy(i.astype(np.int64)).to(dev))

    def weight(w: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(dev).reshape(bshape)

    if mode == "nearest":
        idx = np.clip(_nearest(xo, nearest_mode, scale < 1), 0, in_len - 1)
        y = take(idx)
    elif mode == "linear":
        xc = xo if ctm == "tf_crop_and_resize" else np.clip(xo, 0, in_len - 1)
        x0 = np.clip(np.floor(xc), 0, in_len - 1)
        x1 = np.minimum(x0 + 1, in_len - 1)
        w = np.clip(xc - x0, 0, 1).astype(np.float32)
        y = take(x0) * weight(1 - w) + take(x1) * weight(w)
    elif mode == "cubic":
        base = np.floor(xo)
        taps = base[:, None] + np.arange(-1, 3, dtype=np.float32)[None, :]
        w = _cubic_weights(xo - base, attrs.get("cubic_coeff_a", -0.75))
        if attrs.get("exclude_outside", 0):
            w = np.where((taps < 0) | (taps > in_len - 1), 0, w)
            w = w / w.sum(axis=1, keepdims=True)
        taps = np.clip(taps, 0, in_len - 1)
        y = sum(take(taps[:, j]) * weight(w[:, j]) for j in range(4))
    else:
        raise NotImplementedError(f"Resize mode {mode!r} has no torch lifting")
    if ctm == "tf_crop_and_resize":
        outside = (xo < 0) | (xo > in_len - 1)
        if outside.any():
            mask = torch.from_numpy(outside).to(dev).reshape(bshape)
            y = torch.where(mask, torch.as_tensor(attrs.get("extrapolation_value", 0.0), dtype=y.dtype, device=dev), y)
    return y


@register("Resize")
def resize(inputs, attrs, opset):
    """nearest/linear/cubic with every coordinate_transformation_mode, scales or sizes input,
    axes and keep_aspect_ratio_policy (opset 18). Antialiased downscaling is refused."""
    x = inputs[0]
    r = x.dim()
    if opset < 11:
        scales, sizes, roi = _opt(inputs, 1), None, None
        ctm, nearest_mode = "asymmetric", "simple"
    else:
        roi, scales, sizes = _opt(inputs, 1), _opt(inputs, 2), _opt(inputs, 3)
        ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
        nearest_mode = attrs.get("nearest_mode", "round_prefer_floor")
    roi = _floats(roi) if roi is not None and roi.numel() else None
    scales = _floats(scales) if scales is not None and scales.numel() else None
    sizes = _ints(sizes) if sizes is not None and sizes.numel() else None
    axes = [_axis(a, r) for a in attrs["axes"]] if "axes" in attrs else list(range(r))
    n = len(axes)
    in_len = [x.shape[a] for a in axes]
    if sizes is not None:
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            out_len = sizes
            sc = [float(np.float32(o) / np.float32(i)) for o, i in zip(out_len, in_len)]
        else:
            ratios = [np.float32(o) / np.float32(i) for o, i in zip(sizes, in_len)]
            s = min(ratios) if policy == "not_larger" else max(ratios)
            out_len = [int(math.floor(float(s * np.float32(i)) + 0.5)) for i in in_len]
            sc = [float(s)] * n
    elif scales is not None:
        sc = scales
        out_len = [int(np.float32(s) * np.float32(i)) for s, i in zip(sc, in_len)]
    else:
        raise ValueError("Resize needs scales or sizes")
    if attrs.get("antialias", 0) and attrs.get("mode", "nearest") != "nearest" and any(s < 1 for s in sc):
        raise NotImplementedError("Resize with antialias downscaling has no torch lifting")
    for k, a in enumerate(axes):
        if out_len[k] == in_len[k] and sc[k] == 1.0 and ctm != "tf_crop_and_resize":
            continue
        rk = (roi[k], roi[k + n]) if roi is not None and len(roi) == 2 * n else (0.0, 1.0)
        x = _resize_axis(x, a, out_len[k], sc[k], attrs, ctm, nearest_mode, rk)
    return [x]
