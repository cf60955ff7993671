"""ONNX op -> torch function registry, one module per op family (see core.py for the conventions).

Importing the package registers every lifting; ``OPS`` maps op type to function.
"""
from . import elementwise, linalg, normalization, reduction, resize, shape  # noqa: F401 - they register ops
from .core import NUM_OUTPUTS, OPS, is_supported, node_attrs, numpy_to_torch, onnx_to_torch_dtype, register

__all__ = ["NUM_OUTPUTS", "OPS", "is_supported", "node_attrs", "numpy_to_torch", "onnx_to_torch_dtype", "register"]
