"""Choose the weighted ops to quantize: every Conv/Gemm/MatMul with a constant weight, minus --exclude."""
from __future__ import annotations

from ..errors import OnnxflexError
from ..graph import Graph
from .base import Pass

# ops of a model that was quantized already (onnxruntime's dynamic/static quantizers, QOperator format)
QUANTIZED_OPS = ("ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "MatMulNBits", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


class SelectPass(Pass):
    name = "select"

    def run(self, graph: Graph, ctx) -> Graph:
        cfg = ctx.config
        weighted = {s.node for s in graph.weighted_nodes()}
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
