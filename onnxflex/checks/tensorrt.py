"""Static check of a QDQ model against TensorRT (or ONNX Runtime CPU) placement rules.

A QDQ model that onnxruntime runs can still build a slow or wrong TensorRT engine: uint8
or asymmetric Q/DQ are rejected, a per-channel scale on the wrong axis quantizes the wrong
channels, a residual Add with Q/DQ on one input only blocks the fusion, redundant pairs
break fusions. This module finds those statically, naming the node, so `onnxflex check`
can print them before anyone builds an engine.

Rules: ``RULES`` maps name → one-line description; those in ``WARNINGS`` are reported with
severity "warning" (worth fixing, not fatal), the rest as "error".
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxflex.errors import OnnxflexError
from onnxflex.onnx_facts import MAX_IR_VERSION, MAX_QDQ_OPSET, MIN_QDQ_OPSET, default_opset

__all__ = ["Violation", "check_qdq_model", "format_violations", "RULES", "WARNINGS", "TARGETS"]

TARGETS = ("tensorrt", "ort-cpu")

RULES: dict[str, str] = {
    "opset": "default-domain opset must be within 13..21",
    "ir-version": "ir_version must be <= 10 (onnxruntime refuses newer)",
    "qdq-domain": "Q/DQ must be standard ONNX ops (domain ''), not com.microsoft",
    "qdq-dtype": "Q/DQ integer type must be int8 or int4 (TensorRT); uint8 is not allowed",
    "zero-point": "zero points must be 0 (symmetric), except onnxruntime's activations and unsigned weights",
    "scale": "scales must be constant and finite, > 0 for TensorRT, non-zero for onnxruntime",
    "weight-range": "INT8 weights must lie in [-127, 127], INT4 weights in [-8, 7]",
    "weight-axis": "per-channel weight scales on the consumer's output-channel axis; blocks on "
                   "its input-channel axis; scale shape must match",
    "int4-activation": "INT4 is weight-only; an activation must not be quantized to 4 bits",
    "qdq-on-output": "no QuantizeLinear/DequantizeLinear may produce a graph output",
    "residual-add": "both inputs of a residual Add need Q/DQ so TensorRT can fuse it",
    "qdq-mismatch": "a QuantizeLinear feeding a DequantizeLinear must use the same "
                    "scale, zero point and axis",
    "redundant-qdq": "Q(DQ(x)) with the same parameters is a no-op pair that breaks fusions",
    "duplicate-quantize": "one tensor quantized twice with identical parameters; share one Q",
    "unquantized-weight": "weighted op with a float weight but a quantized activation "
                          "(mixed precision)",
    "quantize-on-weight": "float weight behind a QuantizeLinear: the runtime re-rounds it; "
                          "store integer weights in the DequantizeLinear",
    "quantized-preactivation": "Conv/Gemm/MatMul output quantized before ReLU/Clip: after BN "
                               "folding a per-tensor scale there crushes most channels",
}
WARNINGS = frozenset({"unquantized-weight", "quantize-on-weight", "quantized-preactivation"})
_ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid"})

_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")
_INT4 = (TensorProto.INT4, TensorProto.UINT4)
_WEIGHT_RANGE = {TensorProto.INT8: (-127, 127), TensorProto.INT4: (-8, 7)}
# onnxruntime: unsigned weight-only weights carry a zero point (--asymmetric; MatMulNBits takes uint4)
_UNSIGNED_WEIGHTS = (TensorProto.UINT4, TensorProto.UINT8)
_ALLOWED = {
    "tensorrt": {TensorProto.INT8, TensorProto.INT4},
    "ort-cpu": {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
                TensorProto.INT4, TensorProto.UINT4},
}


@dataclass
class Violation:
    """One broken rule at one node (``node`` is ``<model>`` for model-level rules)."""

    rule: str
    node: str
    message: str
    severity: str = "error"


def _dtype_name(dt: int | None) -> str:
    return TensorProto.DataType.Name(dt).lower() if dt else "unknown"


class _Graph:
    """Producer/consumer/constant lookups over the main graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.nodes = list(g.node)
        self.init = {t.name: t for t in g.initializer}
        self.const: dict[str, onnx.TensorProto] = dict(self.init)
        for n in self.nodes:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.const[n.output[0]] = a.t
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for n in self.nodes:
            for i, name in enumerate(n.input):
                if name:
                    self.consumers[name].append((n, i))
        self.types: dict[str, int] = {}
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.HasField("tensor_type"):
                self.types[vi.name] = vi.type.tensor_type.elem_type
        self.shapes = {t.name: list(t.dims) for t in self.const.values()}
        self._arrays: dict[str, np.ndarray] = {}
        self.outputs = {o.name for o in g.output}

    def array(self, name: str) -> np.ndarray | None:
        if name not in self.const:
            return None
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.const[name])
        return self._arrays[name]

    def is_const(self, name: str) -> bool:
        """Constant, or DequantizeLinear of a constant (a quantized weight/bias)."""
        if not name or name in self.const:
            return True
        p = self.producer.get(name)
        return bool(p is not None and p.op_type == _DQ and p.input[0] in self.const)

    def dq_activation(self, name: str) -> bool:
        """Produced by a DequantizeLinear of a non-constant tensor."""
        p = self.producer.get(name)
        return bool(p is not None and p.op_type == _DQ and p.input[0] not in self.const)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _label(node: onnx.NodeProto, idx: int) -> str:
    return node.name or f"<{node.op_type}#{idx}:{node.output[0] if node.output else ''}>"


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _qdq_dtype(gr: _Graph, node: onnx.NodeProto) -> int | None:
    """Integer type of a Q output / DQ input (zero point type, else attr, else default)."""
    zp = _input(node, 2)
    if zp:
        if zp in gr.const:
            return gr.const[zp].data_type
        return gr.types.get(zp)
    if node.op_type == _Q:
        out_dt = _attr(node, "output_dtype", 0)
        return out_dt or TensorProto.UINT8  # ONNX default without zero point
    x = node.input[0]
    if x in gr.const:
        return gr.const[x].data_type
    p = gr.producer.get(x)
    if p is not None and p.op_type == _Q:
        return _qdq_dtype(gr, p)
    return gr.types.get(x)


def _params(gr: _Graph, node: onnx.NodeProto):
    """Comparable (scale, zero point, dtype, axis, block) of a Q/DQ; None if not constant."""
    s = gr.array(_input(node, 1))
    if s is None:
        return None
    zp_name = _input(node, 2)
    zp = gr.array(zp_name) if zp_name else None
    if zp_name and zp is None:
        return None
    zp_key = None if zp is None or not np.any(zp.astype(np.int64)) else \
        tuple(zp.astype(np.int64).ravel())
    axis = _attr(node, "axis", 1) if s.size > 1 else None
    return (tuple(np.asarray(s, np.float64).ravel()), tuple(s.shape) if s.size > 1 else (),
            zp_key, _qdq_dtype(gr, node), axis, _attr(node, "block_size", 0))


def _weight_axes(consumer: onnx.NodeProto, idx: int, rank: int):
    """(output-channel axis, input-channel axis) of a weight input, or None if unknown."""
    op = consumer.op_type
    if consumer.domain not in ("", "ai.onnx"):
        return None
    if op == "Conv" and idx == 1:
        return 0, 1
    if op == "ConvTranspose" and idx == 1 and _attr(consumer, "group", 1) == 1:
        return 1, 0
    if op == "MatMul" and idx == 1 and rank >= 2:
        return rank - 1, rank - 2
    if op == "Gemm" and idx == 1:
        return (0, 1) if _attr(consumer, "transB", 0) else (1, 0)
    return None


def check_qdq_model(model: onnx.ModelProto | str | os.PathLike,
                    target: str = "tensorrt") -> list[Violation]:
    """Check a QDQ model against `target` ("tensorrt" or "ort-cpu"); return violations.

    Static only: reads the graph and constants, runs nothing. ``ort-cpu`` drops the
    TensorRT-only rules: uint8/int16 types, non-zero activation zero points, residual Add.
    """
    if target not in TARGETS:
        raise OnnxflexError(f"unknown check target '{target}'; use one of {', '.join(TARGETS)}")
    if not isinstance(model, onnx.ModelProto):
        from onnxflex.passes.prepare import load_model

        model = load_model(model, check=False)
    trt = target == "tensorrt"
    gr = _Graph(model)
    out: list[Violation] = []

    def add(rule: str, node: str, message: str) -> None:
        out.append(Violation(rule, node, message, "warning" if rule in WARNINGS else "error"))

    # ---- model level
    opset = default_opset(model)
    lo, hi = MIN_QDQ_OPSET, MAX_QDQ_OPSET
    if not lo <= opset <= hi:
        add("opset", "<model>", f"default opset is {opset}; use {lo}..{hi} (TensorRT 10 parses "
            f"up to ~20, INT4 DequantizeLinear needs 21)")
    if model.ir_version > MAX_IR_VERSION:
        add("ir-version", "<model>", f"ir_version is {model.ir_version}; set it to {MAX_IR_VERSION} "
            f"or lower (onnxruntime refuses newer)")

    labels = {id(n): _label(n, i) for i, n in enumerate(gr.nodes)}
    qdq = [n for n in gr.nodes if n.op_type in (_Q, _DQ) and n.domain in _QDQ_DOMAINS]

    # ---- per Q/DQ node
    for n in qdq:
        name = labels[id(n)]
        x = n.input[0]
        is_weight = x in gr.const
        if n.domain == "com.microsoft" and trt:
            add("qdq-domain", name, f"{n.op_type} is in domain com.microsoft; TensorRT parses "
                f"only standard ONNX Q/DQ (opset 21 has int4/int16)")
        dt = _qdq_dtype(gr, n)
        allowed = _ALLOWED[target] | ({TensorProto.INT32} if not trt and is_weight else set())
        if dt is not None and dt not in allowed:
            extra = ""
            if n.op_type == _Q and not _input(n, 2):
                extra = " (QuantizeLinear without a zero point outputs uint8; add an int8 " \
                        "zero point of 0)"
            elif dt == TensorProto.INT32 and is_weight:
                extra = " (int32 bias DequantizeLinear: TensorRT takes float biases, keep it float)"
            add("qdq-dtype", name, f"{n.op_type} uses {_dtype_name(dt)}; {target} needs one of "
                f"{', '.join(sorted(_dtype_name(d) for d in _ALLOWED[target]))}{extra}")

        # scale
        s_name = _input(n, 1)
        scale = gr.array(s_name)
        if scale is None:
            add("scale", name, f"scale '{s_name}' is not a constant; store it as an initializer")
        else:
            bad = ~np.isfinite(scale) | ((scale <= 0) if trt else (scale == 0))
            if np.any(bad):
                want = "finite and > 0" if trt else "finite and non-zero"
                add("scale", name, f"scale '{s_name}' has {int(bad.sum())} value(s) that are "
                    f"not {want} (e.g. {scale.ravel()[np.argmax(bad.ravel())]})")

        # zero point: must be 0 except activations on ort-cpu
        zp_name = _input(n, 2)
        if zp_name:
            zp = gr.array(zp_name)
            if zp is None:
                add("zero-point", name, f"zero point '{zp_name}' is not a constant initializer")
            elif np.any(zp.astype(np.int64) != 0) and (trt or (is_weight and dt not in _UNSIGNED_WEIGHTS)):
                what = "weight" if is_weight else "activation"
                add("zero-point", name, f"{what} zero point '{zp_name}' is non-zero "
                    f"({zp.ravel()[0]}…); {target} needs symmetric quantization (zero point 0)")

        # INT4 only on weights
        if dt in _INT4 and not is_weight:
            add("int4-activation", name, f"{n.op_type} quantizes activation '{x}' to "
                f"{_dtype_name(dt)}; INT4 is weight-only, use int8 for activations")

        # no Q/DQ producing a graph output
        if any(o in gr.outputs for o in n.output):
            add("qdq-on-output", name, f"{n.op_type} produces graph output '{n.output[0]}'; "
                f"remove Q/DQ from graph outputs")

        if n.op_type == _Q and not is_weight:
            p = gr.producer.get(x)
            if p is not None and p.op_type in ("Conv", "Gemm", "MatMul") and any(
                    c.op_type in _ACTIVATIONS
                    for q_out in n.output for dq, _ in gr.consumers.get(q_out, [])
                    if dq.op_type == _DQ for c, _ in gr.consumers.get(dq.output[0], [])):
                add("quantized-preactivation", name, f"{n.op_type} quantizes the output of "
                    f"{p.op_type} {p.name or x} right before an activation; per-tensor int8 "
                    f"on a pre-activation loses accuracy, quantize after the activation")

        if n.op_type == _Q and is_weight:
            add("quantize-on-weight", name, f"float weight '{x}' goes through a QuantizeLinear;"
                f" store the integer weight as the DequantizeLinear input instead")

        if n.op_type == _DQ and is_weight:
            _check_weight_dq(gr, n, name, scale, dt, add)

    # ---- pairs
    for n in qdq:
        name = labels[id(n)]
        if n.op_type == _Q:
            p = gr.producer.get(n.input[0])
            if p is not None and p.op_type == _DQ:
                pp, pn = _params(gr, p), _params(gr, n)
                if pp is not None and pp == pn:
                    add("redundant-qdq", name, f"{name} re-quantizes the output of "
                        f"{labels[id(p)]} with the same scale/zero point; drop the DQ→Q pair")
        else:
            p = gr.producer.get(n.input[0])
            if p is not None and p.op_type == _Q:
                pp, pn = _params(gr, p), _params(gr, n)
                if pp is not None and pn is not None and pp != pn:
                    add("qdq-mismatch", name, f"{name} dequantizes {labels[id(p)]}'s output with "
                        f"a different scale/zero point/axis; use the Q's parameters")

    by_input: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in qdq:
        if n.op_type == _Q:
            by_input[n.input[0]].append(n)
    for x, qs in by_input.items():
        seen: dict[object, onnx.NodeProto] = {}
        for q in qs:
            key = _params(gr, q)
            if key is None:
                continue
            if key in seen:
                add("duplicate-quantize", labels[id(q)], f"tensor '{x}' is quantized by "
                    f"{labels[id(seen[key])]} and {labels[id(q)]} with identical parameters; "
                    f"share one QuantizeLinear")
            else:
                seen[key] = q

    # ---- consumers
    for i, n in enumerate(gr.nodes):
        name = labels[id(n)]
        if n.domain not in ("", "ai.onnx"):
            continue
        if trt and n.op_type == "Add" and len(n.input) == 2:
            a, b = n.input
            if not gr.is_const(a) and not gr.is_const(b):
                qa, qb = gr.dq_activation(a), gr.dq_activation(b)
                if qa != qb:
                    plain = b if qa else a
                    add("residual-add", name, f"both inputs of a residual Add need Q/DQ so "
                        f"TensorRT can fuse it; input '{plain}' has none")
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) >= 2:
            act, w = n.input[0], n.input[1]
            if n.op_type == "MatMul" and act in gr.const and w not in gr.const:
                act, w = w, act
            if w in gr.const and gr.dq_activation(act):
                add("unquantized-weight", name, f"mixed precision weighted op: activation "
                    f"'{act}' is quantized but weight '{w}' is float; add a weight "
                    f"DequantizeLinear or exclude the activation Q/DQ")
    return out


def _check_weight_dq(gr: _Graph, n, name, scale, dt, add) -> None:
    """Range, per-channel axis and block layout of a DequantizeLinear on a constant weight."""
    x = n.input[0]
    w = gr.array(x)
    shape = gr.shapes.get(x, [])
    rank = len(shape)
    if w is not None and dt in _WEIGHT_RANGE:
        lo, hi = _WEIGHT_RANGE[dt]
        wi = w.astype(np.int64)
        if wi.size and (wi.min() < lo or wi.max() > hi):
            add("weight-range", name, f"{_dtype_name(dt)} weight '{x}' spans "
                f"[{wi.min()}, {wi.max()}]; clamp to [{lo}, {hi}] (symmetric range)")
    if scale is None or rank == 0:
        return
    block = int(_attr(n, "block_size", 0) or 0)
    axis = int(_attr(n, "axis", 1))
    axis = axis + rank if axis < 0 else axis
    for consumer, idx in gr.consumers.get(n.output[0], []):
        axes = _weight_axes(consumer, idx, rank)
        if axes is None:
            continue
        oc, ic = axes
        cname = consumer.name or consumer.op_type
        if block > 0:
            if axis != ic:
                add("weight-axis", name, f"blocked DequantizeLinear of '{x}' blocks axis {axis}"
                    f"; {consumer.op_type} {cname} needs blocks on its input-channel axis {ic}")
            else:
                want = [(-(-d // block) if k == ic else d) for k, d in enumerate(shape)]
                if list(scale.shape) != want:
                    add("weight-axis", name, f"blocked scale shape {list(scale.shape)} for "
                        f"weight {shape} with block_size {block} should be {want}")
        elif scale.size > 1:  # per-channel
            if axis != oc:
                add("weight-axis", name, f"per-channel DequantizeLinear of '{x}' uses axis "
                    f"{axis}; {consumer.op_type} {cname} needs its output-channel axis {oc}")
            elif scale.ndim != 1 or scale.size != shape[oc]:
                add("weight-axis", name, f"per-channel scale has shape {list(scale.shape)}; "
                    f"weight '{x}' {shape} needs [{shape[oc]}] on axis {oc}")
        break


def format_violations(violations: list[Violation]) -> str:
    """Plain-text table (severity, rule, node, message) for `onnxflex check`."""
    if not violations:
        return "no violations"
    header = ("severity", "rule", "node", "message")
    rows = [(v.severity, v.rule, v.node, v.message) for v in violations]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header[:3], widths)) + "  " + header[3]]
    lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(header[3]))
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    n_err = sum(v.severity == "error" for v in violations)
    lines.append(f"{n_err} error(s), {len(violations) - n_err} warning(s)")
    return "\n".join(lines)
