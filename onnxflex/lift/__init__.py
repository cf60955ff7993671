"""Lifting ONNX graph regions to torch so their weights can be optimised against ORT's outputs."""
from .ops import NUM_OUTPUTS, OPS, is_supported, node_attrs, numpy_to_torch, onnx_to_torch_dtype, register
from .region import RegionModule, unsupported_ops

__all__ = [
    "NUM_OUTPUTS",
    "OPS",
    "RegionModule",
    "is_supported",
    "node_attrs",
    "numpy_to_torch",
    "onnx_to_torch_dtype",
    "register",
    "unsupported_ops",
]
