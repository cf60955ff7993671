"""The registry, conversions and shared helpers of the ONNX op -> torch liftings (one module per op family).

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

from typing import Callable, Optional

import numpy as np
import onnx
import torch
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
