"""Deployment targets: where activation Q/DQ go, their integer type, and the rules the output obeys.

Q/DQ placement is a property of the runtime that executes the model, not of the rounding method
(DESIGN §3), and learned rounding must be trained with the Q/DQ it is deployed with. So a
:class:`Target` owns the placement and the activation grid, and the calibrate, reconstruct and qdq
passes read them from ``ctx.target``:

* ``tensorrt``: symmetric int8 (zero point 0) on the inputs of weighted ops and of residual Adds;
  TensorRT propagates and fuses the rest.
* ``ort-cpu``: onnxruntime's CPU provider reaches its integer kernels (QLinearConv, QLinearMatMul,
  QGemm, QLinearAdd, QLinearGlobalAveragePool) only for DQ -> op -> Q, so op outputs are quantized
  too, after the op's ReLU/Clip (which onnxruntime then folds into the Q), with asymmetric uint8
  activations (a zero point per tensor), the layout of onnxruntime's own ``quantize_static`` U8S8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .context import ActPoint
from .errors import OnnxflexError
from .graph import Graph
from .onnx_facts import MAX_QDQ_OPSET, MIN_QDQ_OPSET
from .traits import ModelTraits

# ops whose output ORT-CPU computes in int8 when all their activation inputs come from DQ
# (QLinearAdd, QLinearGlobalAveragePool, QLinearAveragePool, QLinearConcat, and int8 MaxPool)
ORT_INT8_OPS = ("Add", "GlobalAveragePool", "AveragePool", "MaxPool", "Concat")
# element-wise clamps that onnxruntime removes when the Q after them saturates inside their range
FOLDED_INTO_Q = ("Relu", "Clip")


@dataclass(frozen=True)
class PlacementOptions:
    """What the config says about placement (independent of the target)."""

    quantize_act_matmul: bool = False  # activation x activation MatMuls (attention)
    quantize_residual: bool = True  # residual Adds (off in attention models: outlier channels)


def _adder(graph: Graph, points: dict):
    def add(tensor, node):
        if tensor and not graph.is_constant(tensor):
            points.setdefault(tensor, ActPoint(tensor)).consumers.add(node.name)
    return add


def tensorrt_points(graph: Graph, traits: ModelTraits, quantize: set, opts: PlacementOptions) -> dict:
    """Inputs of quantized weighted ops and both inputs of residual Adds; one pair per tensor.

    Transformers are run without the residual pairs (opts.quantize_residual False): their residual
    stream carries outlier channels two orders of magnitude above the rest, which one per-tensor
    int8 scale cannot hold (measured on MiniLM: W8A8 embedding cosine 0.86 with, 0.98 without)."""
    points: dict[str, ActPoint] = {}
    add = _adder(graph, points)
    for n in graph.nodes:
        spec = graph.weight_spec(n)
        if spec is not None:
            if n.name in quantize:
                add(spec.data_input, n)
        elif opts.quantize_residual and n.op_type == "Add" and len(n.input) == 2:
            a, b = n.input
            # a residual Add: both inputs are activations and at least one comes from a weighted op
            # (not a mask Add, not the sum of embedding lookups)
            if a in traits.activations and b in traits.activations and (
                    a in traits.after_weights or b in traits.after_weights):
                add(a, n)
                add(b, n)
        elif opts.quantize_act_matmul and n.op_type == "MatMul":
            if not graph.is_constant(n.input[0]) and not graph.is_constant(n.input[1]):
                add(n.input[0], n)
                add(n.input[1], n)
    return points


def _after_clamps(graph: Graph, tensor: str) -> str:
    """Follow a chain of single-reader ReLU/Clip nodes: the tensor a Q should read so onnxruntime
    can drop the clamps and fuse the op with the Q."""
    while True:
        readers = graph.consumers.get(tensor, [])
        if len(readers) != 1 or readers[0].op_type not in FOLDED_INTO_Q or tensor in graph.output_names:
            return tensor
        tensor = readers[0].output[0]


def ort_cpu_points(graph: Graph, traits: ModelTraits, quantize: set, opts: PlacementOptions) -> dict:
    """TensorRT's points plus the outputs of quantized ops, so every quantized op reads DQ and writes Q.

    Graph outputs stay float (a Q there buys no speed and costs output precision)."""
    points = tensorrt_points(graph, traits, quantize, opts)
    add = _adder(graph, points)

    def quantize_output(tensor):
        if tensor in graph.output_names or tensor not in traits.activations:
            return
        for reader in graph.consumers.get(tensor, []):
            add(tensor, reader)

    for n in graph.nodes:
        if n.name in quantize and graph.weight_spec(n) is not None:
            quantize_output(_after_clamps(graph, n.output[0]))
        elif n.op_type in ORT_INT8_OPS:
            acts = [i for i in n.input if i and not graph.is_constant(i)]
            if acts and all(i in points for i in acts):
                for i in acts:  # every reader of a quantized tensor reads its DQ
                    add(i, n)
                quantize_output(_after_clamps(graph, n.output[0]))
    return points


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    placement: Callable[[Graph, ModelTraits, set, PlacementOptions], dict]
    act_symmetric: bool  # zero point 0 (TensorRT) or one per tensor (onnxruntime CPU)
    act_signed: bool  # int8 (True) or uint8 activations at 8 bits
    min_opset: int = MIN_QDQ_OPSET
    max_opset: int = MAX_QDQ_OPSET

    def act_dtype(self, bits: int) -> str:
        if bits == 16:
            return "int16" if self.act_signed else "uint16"
        return "int8" if self.act_signed else "uint8"

    def act_points(self, graph: Graph, traits: ModelTraits, quantize: set, opts: PlacementOptions,
                   bits: int) -> dict:
        points = self.placement(graph, traits, quantize, opts)
        for p in points.values():
            p.dtype = self.act_dtype(bits)
        return points

    def check(self, model) -> list:
        """The target's static rule check on a written QDQ model (errors and warnings)."""
        from .checks.tensorrt import check_qdq_model

        return check_qdq_model(model, self.name)


TARGETS = {
    "tensorrt": Target("tensorrt", "TensorRT: symmetric int8 Q/DQ on weighted-op and residual-Add inputs",
                       tensorrt_points, act_symmetric=True, act_signed=True),
    # uint8 activations: with int8 ones onnxruntime 1.31's CPU provider leaves depthwise convs (and
    # the Adds) as DQ + float op + Q (measured on EfficientNet-Lite0: 35 of 49 convs fused, no faster
    # than FP32); with uint8 all 49 convs, 9 Adds, the pool and the FC run as integer kernels
    "ort-cpu": Target("ort-cpu", "onnxruntime CPU: DQ -> op -> Q around every quantized op (its int8 kernels), "
                      "asymmetric uint8 activations, int8 weights (U8S8)", ort_cpu_points, act_symmetric=False,
                      act_signed=False),
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise OnnxflexError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}") from None
