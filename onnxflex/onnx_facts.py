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


def fits_in_protobuf(model: onnx.ModelProto, limit: int = PROTO_LIMIT) -> bool:
    """False when the model cannot be serialised in one protobuf message (or is ``limit`` bytes or more)."""
    try:
        return model.ByteSize() < limit
    except Exception:  # noqa: BLE001 - protobuf raises on messages over 2 GB
        return False


#: initializers at least this big are left out of weightless copies
WEIGHT_MIN_BYTES = 1 << 16
#: the external-data location weightless copies give the initializers they leave out
WEIGHTLESS_LOCATION = "onnxflex-weightless"


def _copy_field(msg, fd, value) -> None:
    if fd.is_repeated:
        getattr(msg, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(msg, fd.name).CopyFrom(value)
    else:
        setattr(msg, fd.name, value)


def weightless_copy(model: onnx.ModelProto, min_bytes: int | None = None,
                    types: frozenset | None = None) -> tuple[onnx.ModelProto, dict]:
    """A copy of ``model`` whose main-graph initializers of ``min_bytes`` or more (and of a data type in
    ``types``, when given) are stubs marked as external data (name, type and dims kept, no bytes), and
    {name: the original TensorProto} for them.

    Graph rewrites that never read weight values (onnx's version converter, sessions fed the weights
    through onnxruntime's ``add_external_initializers``) run on the copy: a few MB to serialise instead
    of the whole model, whatever its size (a 2.5 GB decoder cannot be serialised at all)."""
    min_bytes = WEIGHT_MIN_BYTES if min_bytes is None else min_bytes
    light = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(light, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(light.graph, fd, value)
    weights = {}
    for t in model.graph.initializer:
        if (t.data_location == onnx.TensorProto.EXTERNAL or t.ByteSize() < min_bytes
                or (types is not None and t.data_type not in types)):
            light.graph.initializer.append(t)
            continue
        weights[t.name] = t
        stub = light.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                           data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value=WEIGHTLESS_LOCATION)
    return light, weights


def upgrade_opset(model: onnx.ModelProto, target: int, why: str) -> onnx.ModelProto:
    """Convert ``model`` to opset ``target`` with onnx's version converter (no-op when already there).

    The converter runs on a :func:`weightless_copy` (it rewrites nodes, never weight values) and the
    weights are put back by name: one more copy of them instead of three, and no 2 GB limit.
    ``why`` completes "cannot convert ... which <why>" in the one-line error a user sees.
    """
    old = default_opset(model)
    if old >= target:
        return model
    from onnx import version_converter

    light, weights = weightless_copy(model)
    try:
        converted = version_converter.convert_version(light, target)
    except Exception as exc:  # noqa: BLE001 - the converter raises assorted C++ errors
        msg = " ".join(str(exc).split())[:200]
        raise OnnxflexError(f"cannot convert the model from opset {old} to {target}, which {why} ({msg}); "
                            f"re-export it with opset_version>={target}") from None
    if default_opset(converted) < target:
        raise OnnxflexError(f"opset conversion from {old} to {target} did not take ({why}); "
                            f"re-export the model with opset_version>={target}")
    for t in converted.graph.initializer:
        if t.name in weights:
            t.CopyFrom(weights[t.name])
    converted.ir_version = min(converted.ir_version, MAX_IR_VERSION)
    return converted


def cap_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lower the IR version (in place) to what onnxruntime and TensorRT accept; returns the model."""
    if not model.ir_version or model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return model
