"""Write back: integer weights behind DequantizeLinear, activation Q/DQ pairs where the target placed them.

The learned integers are stored as the DequantizeLinear input (INT8, or INT4 at opset 21): never a
float weight behind a QuantizeLinear, which ORT and TensorRT would re-round, undoing the learning.
The edits are made with onnx-graphsurgeon: insert nodes, rewire readers, then let its cleanup drop
the float weights nothing reads any more and its toposort restore a valid order.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..context import WeightResult
from ..graph import Graph, WeightSpec
from ..traits import EMBEDDING_MIN_ELEMENTS
from ..onnx_facts import INT4_OPSET, MIN_QDQ_OPSET, cap_ir_version, upgrade_opset
from .base import Pass


def _needed_opset(weight_results, act_bits: int) -> int:
    if act_bits == 16 or any(r.bits < 8 or r.block_size for r in weight_results.values()):
        return INT4_OPSET
    return MIN_QDQ_OPSET


def _const(name: str, values: np.ndarray) -> gs.Constant:
    """A constant written exactly as this numpy array (graphsurgeon cannot export INT4 from numpy itself)."""
    return gs.Constant(name, LazyValues(numpy_helper.from_array(values, name)))


def _weight_ints(q: np.ndarray, bits: int, unsigned: bool = False) -> np.ndarray:
    if unsigned:
        return q.astype(ml_dtypes.uint4 if bits <= 4 else np.uint8)
    return q.astype(ml_dtypes.int4 if bits <= 4 else np.int8)


def _dequantize(graph: gs.Graph, name: str, base: str, q: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                axis: int, shape, block_size: int = 0) -> gs.Variable:
    """Append DequantizeLinear(base_quantized, base_scale, base_zero_point) for a constant; per-axis
    when the scale is a vector, blocked along ``axis`` when ``block_size`` is set. Returns its output."""
    out = gs.Variable(f"{base}_dequantized", dtype=np.float32, shape=shape)
    attrs = {"axis": axis} if scale.ndim else {}
    if block_size:
        attrs["block_size"] = block_size
    graph.nodes.append(gs.Node(
        "DequantizeLinear", name, attrs=attrs,
        inputs=[_const(f"{base}_quantized", q), _const(f"{base}_scale", scale), _const(f"{base}_zero_point", zero)],
        outputs=[out]))
    return out


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")


def write_qdq(model: onnx.ModelProto, weight_results: dict, act_points: dict, act_bits: int,
              int32_bias: bool = False) -> onnx.ModelProto:
    """Return a QDQ copy of the prepared FP32 model (the input model is not modified).

    int32_bias: a Gemm whose input is quantized gets its bias as int32 behind a DQ with scale
    input scale x weight scale (onnxruntime's CPU provider fuses such a Gemm into QGemm only then)."""
    copy = upgrade_opset(model, _needed_opset(weight_results, act_bits),
                         "INT4 weights / INT16 activations need (or use --weight-bits 8 --act-bits 8)")
    if copy is model:  # already at that opset: upgrade_opset made no copy
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
    graph = gs.import_onnx(copy)
    tensors = graph.tensors()
    nodes = {n.name: n for n in graph.nodes}
    for node_name, r in weight_results.items():
        spec, node = r.spec, nodes[node_name]
        weight = tensors[spec.weight]
        base = spec.weight if len(weight.outputs) == 1 else f"{spec.weight}_{node_name}"
        scale = np.asarray(r.scale, np.float32)
        unsigned = r.zero_point is not None
        zero = r.zero_point if unsigned else np.zeros(scale.shape, np.int8)
        node.inputs[spec.weight_input] = _dequantize(
            graph, f"{node_name}_weight_DequantizeLinear", base, _weight_ints(r.integers, r.bits, unsigned), scale,
            _weight_ints(zero, r.bits, unsigned), spec.in_axis if r.block_size else spec.out_axis,
            weight.shape, r.block_size)
        if r.bias is not None:  # a corrected bias; the model's stays for any other reader
            old = node.inputs[2]
            values = np.asarray(r.bias, np.float32).reshape(old.shape)
            if len(old.outputs) == 1:
                old.values = values
            else:
                node.inputs[2] = gs.Constant(f"{spec.bias}_{node_name}", values)
        point = act_points.get(spec.data_input)
        if (int32_bias and not r.block_size and not unsigned and spec.op_type == "Gemm" and spec.bias and point is not None
                and node_name in point.consumers):
            bias = node.inputs[2]
            b_scale = (np.float32(point.scale) * scale).astype(np.float32)
            b_q = np.round(np.asarray(bias.values, np.float32) / b_scale).astype(np.int32)
            node.inputs[2] = _dequantize(graph, f"{node_name}_bias_DequantizeLinear", f"{base}_bias", b_q, b_scale,
                                         np.zeros(b_scale.shape, np.int32), 0, bias.shape)

    for t, p in act_points.items():
        if not p.consumers:
            continue
        x, safe = tensors[t], _safe(t)
        scale, zero = _const(f"{safe}_act_scale", np.array(p.scale, np.float32)), \
            _const(f"{safe}_act_zero_point", np.array(p.zero_point, np.dtype(p.dtype)))
        q = gs.Variable(f"{safe}_quantized", dtype=np.dtype(p.dtype), shape=x.shape)
        deq = gs.Variable(f"{safe}_dequantized", dtype=np.float32, shape=x.shape)
        graph.nodes += [gs.Node("QuantizeLinear", f"{safe}_QuantizeLinear", inputs=[x, scale, zero], outputs=[q]),
                        gs.Node("DequantizeLinear", f"{safe}_DequantizeLinear", inputs=[q, scale, zero], outputs=[deq])]
        for c in p.consumers:
            reader = nodes[c]
            for k, i in enumerate(reader.inputs):
                if i is x:
                    reader.inputs[k] = deq

    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    for field in ("producer_name", "producer_version", "doc_string", "model_version"):
        setattr(out, field, getattr(copy, field))
    out.metadata_props.extend(copy.metadata_props)
    return cap_ir_version(out)


def table_results(graph: Graph) -> dict:
    """Weight-only int8 for the embedding tables read by Gather: per row, round to nearest. A lookup
    has no activation to quantize and nothing to reconstruct, but the tables hold most of a small
    transformer's bytes (MiniLM: 47 of 86 MB)."""
    out = {}
    for n in graph.nodes:
        if n.op_type != "Gather" or not graph.is_constant(n.input[0]) or graph.is_constant(n.input[1]):
            continue
        t = graph.initializers[n.input[0]]
        if (t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2 or int(np.prod(t.dims)) < EMBEDDING_MIN_ELEMENTS
                or any(a.name == "axis" and a.i != 0 for a in n.attribute)):
            continue
        w = graph.array(n.input[0])
        scale = np.abs(w).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int32)
        out[n.name] = WeightResult(WeightSpec(n.name, "Gather", n.input[0], None, n.input[1], 0, 1, weight_input=0),
                                   q, scale, 8)
    return out


class QDQPass(Pass):
    """Prepared FP32 graph + learned integers/scales -> standard QDQ model (ctx.qdq_model)."""

    name = "qdq"

    def run(self, graph: Graph, ctx) -> Graph:
        weights = dict(ctx.weight_results)
        if ctx.target.int8_tables:
            tables = table_results(graph)
            weights.update(tables)
            ctx.summary["int8_tables"] = len(tables)
        ctx.qdq_model = write_qdq(graph.model, weights, ctx.act_points, ctx.config.act_bits,
                                  int32_bias=ctx.target.int32_bias)
        return Graph(ctx.qdq_model)
