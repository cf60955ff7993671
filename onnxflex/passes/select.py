"""Choose the weighted ops to quantize: every Conv/Gemm/MatMul with a constant weight, minus --exclude.
What stays FP32 for a reason the user cannot see in the region table (recurrent ops, weights inside
If/Loop/Scan bodies) is said once, in the report's notes."""
from __future__ import annotations

import logging

import onnx

from ..errors import OnnxflexError
from ..graph import WEIGHTED_OPS, Graph, all_nodes, subgraphs
from .base import Pass

log = logging.getLogger("onnxflex")
RECURRENT_OPS = ("LSTM", "GRU", "RNN")

# ops of a model that was quantized already (onnxruntime's dynamic/static quantizers, QOperator format)
QUANTIZED_OPS = ("ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "MatMulNBits", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


class SelectPass(Pass):
    name = "select"

    def run(self, graph: Graph, ctx) -> Graph:
        cfg = ctx.config
        weighted = {s.node for s in graph.weighted_nodes()}
        hidden = control_flow_weights(graph.model.graph)
        for n in graph.nodes:
            if n.op_type in RECURRENT_OPS:
                ctx.notes.append(f"{n.op_type} {n.name!r} kept in FP32: onnxflex does not quantize recurrent ops")
        for owner, ops in hidden.items():
            ctx.notes.append(f"{owner} holds {sum(ops.values())} weighted op(s) ({', '.join(f'{c} {o}' for o, c in ops.items())}) "
                             "in its subgraphs, kept in FP32: onnxflex does not quantize inside control flow")
        for note in ctx.notes:
            log.warning("%s", note)
        if not weighted and hidden:
            raise OnnxflexError(f"every weighted op of the model sits inside control flow ({', '.join(hidden)}), which "
                                "onnxflex does not quantize; export the model without If/Loop (e.g. trace one branch) "
                                "and quantize that")
        if not weighted:
            quantized = sorted({n.op_type for n in graph.nodes if n.op_type in QUANTIZED_OPS}
                               | {n.op_type for n in graph.nodes if n.op_type == "DequantizeLinear"
                                  and graph.is_constant(n.input[0])})
            if quantized:
                raise OnnxflexError(f"the model is already quantized (it has {', '.join(quantized)}); "
                                    "give onnxflex the FP32 model it came from")
            raise OnnxflexError("the model has no Conv, Gemm or MatMul with constant weights; nothing to quantize")
        unknown = set(cfg.exclude) - {n.name for n in graph.nodes}
        if unknown:
            raise OnnxflexError(f"--exclude names nodes not in the model: {', '.join(sorted(unknown))}; "
                                "see `onnxflex inspect` for node names")
        ctx.quantize_nodes = weighted - set(cfg.exclude)
        return graph


def control_flow_weights(g: onnx.GraphProto) -> dict:
    """'<op> <name>' of each If/Loop/Scan node -> {op_type: count} of the Conv/Gemm/MatMul/recurrent
    ops in its subgraphs (nested ones counted for the outermost node)."""
    found = {}
    for n in g.node:
        counts: dict = {}
        for inner in (i for sg in subgraphs(n) for i in all_nodes(sg)):
            if inner.op_type in WEIGHTED_OPS + RECURRENT_OPS:
                counts[inner.op_type] = counts.get(inner.op_type, 0) + 1
        if counts:
            found[f"{n.op_type} {n.name!r}"] = counts
    return found
