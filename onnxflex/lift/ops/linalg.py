"""Convolution and linear algebra: Conv, ConvTranspose, Gemm, MatMul, Einsum."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import _by_rank, _opt, _spatial_pads, _torch_pad, register


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
