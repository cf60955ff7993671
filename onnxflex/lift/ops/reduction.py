"""Reductions, scans (CumSum) and pooling."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .core import Tensor, _axis, _by_rank, _ints, _opt, _spatial_pads, _torch_pad, register


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


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):  # torch.prod takes one dim at a time
        x = torch.prod(x, d, keepdim=keep)
    return x


# op -> (first opset whose axes are an input, not an attribute; the reduction over dims d, keepdim k)
_REDUCTIONS = {
    "ReduceMean": (18, lambda x, d, k: torch.mean(x, d, keepdim=k)),
    "ReduceSum": (13, lambda x, d, k: torch.sum(x, d, keepdim=k)),
    "ReduceMax": (18, lambda x, d, k: torch.amax(x, d, keepdim=k)),
    "ReduceMin": (18, lambda x, d, k: torch.amin(x, d, keepdim=k)),
    "ReduceSumSquare": (18, lambda x, d, k: torch.sum(x * x, d, keepdim=k)),
    "ReduceL2": (18, lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k))),
    "ReduceL1": (18, lambda x, d, k: torch.sum(torch.abs(x), d, keepdim=k)),
    "ReduceProd": (18, _prod),
}
for _op, (_since, _fn) in _REDUCTIONS.items():
    register(_op)(lambda inputs, attrs, opset, since=_since, fn=_fn: _reduce(inputs, attrs, opset, since, fn))


@register("CumSum")
def cum_sum(inputs, attrs, opset):
    """Axis is a (scalar) input; ``exclusive`` shifts the sums by one, ``reverse`` scans from the end.
    The decoders' in-graph position ids (cumsum of the attention mask) use it on int64."""
    x = inputs[0]
    a = _axis(_ints(inputs[1])[0], x.dim())
    if attrs.get("reverse", 0):
        x = x.flip(a)
    y = torch.cumsum(x, a, dtype=x.dtype)  # torch widens int32 to int64 by default; ONNX keeps the type
    if attrs.get("exclusive", 0):
        zero = torch.zeros_like(y.narrow(a, 0, 1))
        y = torch.cat([zero, y.narrow(a, 0, y.shape[a] - 1)], a) if y.shape[a] else y
    return [y.flip(a) if attrs.get("reverse", 0) else y]


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
