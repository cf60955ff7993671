"""Write back: integer weights behind DequantizeLinear, activation Q/DQ pairs where the target placed them.

The learned integers are stored as the DequantizeLinear input (INT8, or INT4 at opset 21): never a
float weight behind a QuantizeLinear, which ORT and TensorRT would re-round, undoing the learning.
"""
from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph import Graph
from .base import Pass
from ..onnx_facts import INT4_OPSET, MIN_QDQ_OPSET, cap_ir_version, upgrade_opset

log = logging.getLogger("onnxflex")


def _needed_opset(weight_results, act_bits: int) -> int:
    if act_bits == 16 or any(r.bits < 8 for r in weight_results.values()):
        return INT4_OPSET
    return MIN_QDQ_OPSET


def _weight_tensor(name: str, q: np.ndarray, bits: int) -> TensorProto:
    if bits <= 4:
        return numpy_helper.from_array(q.astype(ml_dtypes.int4), name)
    return numpy_helper.from_array(q.astype(np.int8), name)


def write_qdq(model: onnx.ModelProto, weight_results: dict, act_points: dict, act_bits: int) -> onnx.ModelProto:
    """Return a QDQ copy of the prepared FP32 model."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out = upgrade_opset(out, _needed_opset(weight_results, act_bits),
                        "INT4 weights / INT16 activations need (or use --weight-bits 8 --act-bits 8)")
    g = out.graph
    graph = Graph(out)  # its node objects are the proto's own, so rewiring them edits `out`
    nodes_by_name = graph.node_by_name
    new_inits, dq_nodes = [], []
    replaced = set()
    for node_name, r in weight_results.items():
        spec = r.spec
        node = nodes_by_name[node_name]
        base = spec.weight if len(graph.consumers.get(spec.weight, [])) == 1 else f"{spec.weight}_{node_name}"
        q_name, s_name, z_name, dq_out = (f"{base}_quantized", f"{base}_scale", f"{base}_zero_point",
                                          f"{base}_dequantized")
        scale = np.asarray(r.scale, np.float32)
        zp = np.zeros(scale.shape, np.int8)
        new_inits += [_weight_tensor(q_name, r.integers, r.bits), numpy_helper.from_array(scale, s_name),
                      _weight_tensor(z_name, zp, r.bits)]
        attrs = {"axis": spec.out_axis} if scale.ndim == 1 else {}
        dq_nodes.append((node, helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_out],
                                                name=f"{node_name}_weight_DequantizeLinear", **attrs)))
        node.input[1] = dq_out
        replaced.add(spec.weight)

    act_nodes = []
    for t, p in (act_points or {}).items():
        if not p.consumers:
            continue
        safe = t.replace("/", "_").replace(":", "_")
        s_name, z_name = f"{safe}_act_scale", f"{safe}_act_zero_point"
        new_inits += [numpy_helper.from_array(np.array(p.scale, np.float32), s_name),
                      numpy_helper.from_array(np.array(p.zero_point, np.dtype(p.dtype)), z_name)]
        q = helper.make_node("QuantizeLinear", [t, s_name, z_name], [f"{safe}_quantized"], name=f"{safe}_QuantizeLinear")
        dq = helper.make_node("DequantizeLinear", [f"{safe}_quantized", s_name, z_name], [f"{safe}_dequantized"],
                              name=f"{safe}_DequantizeLinear")
        for c in p.consumers:
            node = nodes_by_name[c]
            for k, i in enumerate(node.input):
                if i == t:
                    node.input[k] = f"{safe}_dequantized"
        act_nodes.append((t, q, dq))

    # keep a topological order: weight DQ right before its op; activation Q/DQ right after the producer
    producer = {o: n.name for o, n in graph.producer.items()}
    weight_dq = {id(n): dq for n, dq in dq_nodes}
    after = {}
    for t, q, dq in act_nodes:
        after.setdefault(producer.get(t), []).extend([q, dq])
    ordered = list(after.get(None, []))
    for n in g.node:
        if id(n) in weight_dq:
            ordered.append(weight_dq[id(n)])
        ordered.append(n)
        ordered.extend(after.get(n.name, []))
    del g.node[:]
    g.node.extend(ordered)

    still_used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name not in replaced or t.name in still_used]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    return cap_ir_version(out)


class QDQPass(Pass):
    """Prepared FP32 graph + learned integers/scales -> standard QDQ model (ctx.qdq_model)."""

    name = "qdq"

    def run(self, graph: Graph, ctx) -> Graph:
        ctx.qdq_model = write_qdq(graph.model, ctx.weight_results, ctx.act_points, ctx.config.act_bits)
        return Graph(ctx.qdq_model)
