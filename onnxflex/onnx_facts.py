"""One home for the ONNX / onnxruntime facts the passes rely on (opsets, IR versions, size limits).

Each number here was once defined in several modules with different values; keeping them in one
place means a new onnxruntime or TensorRT release is one edit.
"""
from __future__ import annotations

import onnx

from .errors import OnnxflexError

#: per-channel DequantizeLinear (`axis`) needs opset 13
MIN_QDQ_OPSET = 13
#: INT4 weights, INT16 activations and blocked DequantizeLinear need opset 21
INT4_OPSET = 21
#: highest default-domain opset TensorRT 10 and onnxruntime 1.31 both parse for QDQ models
MAX_QDQ_OPSET = 21
#: onnx >= 1.20 writes IR version 14, which onnxruntime 1.31 refuses; 10 covers opsets up to 22
MAX_IR_VERSION = 10
#: protobuf cannot serialise a message of 2 GiB or more; larger models use external data
PROTO_LIMIT = (1 << 31) - (1 << 24)


def default_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports (0 when it declares none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    """False when the model cannot be serialised in one protobuf message."""
    try:
        return model.ByteSize() < PROTO_LIMIT
    except Exception:  # noqa: BLE001 - protobuf raises on messages over 2 GB
        return False


def upgrade_opset(model: onnx.ModelProto, target: int, why: str) -> onnx.ModelProto:
    """Convert ``model`` to opset ``target`` with onnx's version converter (no-op when already there).

    ``why`` completes "cannot convert ... which <why>" in the one-line error a user sees.
    """
    old = default_opset(model)
    if old >= target:
        return model
    if not fits_in_protobuf(model):
        raise OnnxflexError(f"model is opset {old} and over 2 GB, too large to convert to opset {target} "
                            f"({why}); re-export it with opset_version>={target}")
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:  # noqa: BLE001 - the converter raises assorted C++ errors
        msg = " ".join(str(exc).split())[:200]
        raise OnnxflexError(f"cannot convert the model from opset {old} to {target}, which {why} ({msg}); "
                            f"re-export it with opset_version>={target}") from None
    if default_opset(converted) < target:
        raise OnnxflexError(f"opset conversion from {old} to {target} did not take ({why}); "
                            f"re-export the model with opset_version>={target}")
    converted.ir_version = min(converted.ir_version, MAX_IR_VERSION)
    return converted


def cap_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lower the IR version (in place) to what onnxruntime and TensorRT accept; returns the model."""
    if not model.ir_version or model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return model
