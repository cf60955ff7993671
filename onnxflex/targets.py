"""Deployment targets: where activation Q/DQ go, their integer type, and the rules the output obeys.

Q/DQ placement is a property of the runtime that executes the model, not of the rounding method
(DESIGN §3), and learned rounding must be trained with the Q/DQ it is deployed with. So a
:class:`Target` owns the placement and the activation grid, and the calibrate, reconstruct and qdq
passes read them from ``ctx.target``:

* ``tensorrt``: symmetric int8 (zero point 0) on the inputs of weighted ops and of residual Adds;
  TensorRT propagates and fuses the rest.
* ``ort-cpu``: onnxruntime's CPU provider (1.31, measured: bench/ort_cpu_probe.py and
  bench/results/deploy_*.md) runs a Conv, Add or pool as an integer kernel (QLinearConv, QLinearAdd,
  QLinearGlobalAveragePool) only for DQ -> op -> Q, so their outputs are quantized too, after the
  Conv's ReLU/Clip, which it folds into the Q when the Q's range lies inside the clamp's; a MatMul or
  Gemm with a constant weight needs only DQ on its inputs (MatMulIntegerToFloat, QGemm with float
  output), and a Q on its output costs accuracy for no speed. Activations are asymmetric uint8:
  int8 ones are converted to uint8 only where a tensor has one reader, and real s8s8 kernels are
  2-5x slower than FP32 on x86.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .context import ActPoint
from .errors import OnnxflexError
from .graph import Graph
from .traits import ModelTraits

# ops ORT-CPU runs as integer kernels when every input comes from a DQ and the output goes to a Q
# (QLinearAdd, QLinearMul, QLinearGlobalAveragePool, QLinearAveragePool, QLinearConcat, QLinearSigmoid)
ORT_INT8_OPS = ("Add", "Mul", "GlobalAveragePool", "AveragePool", "Concat", "Sigmoid")
# element-wise clamps that onnxruntime removes when the Q after them saturates inside their range
FOLDED_INTO_Q = ("Relu", "Clip")
# ops that move int8 values without changing them: onnxruntime drops DQ -> op -> Q around them when
# both Q/DQ share scale and zero point, so the op runs on the integer tensor
PASS_THROUGH = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "MaxPool")


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


def _clip_max(graph: Graph, node) -> float:
    """The upper bound of a Clip (attribute before opset 11, constant input from 11); inf for ReLU."""
    if node.op_type != "Clip":
        return float("inf")
    hi = graph.clip_bounds(node)[1]
    return float("inf") if hi is None else hi


def _after_clamps(graph: Graph, tensor: str) -> tuple[str, float]:
    """Follow a chain of single-reader ReLU/Clip nodes: the tensor a Q should read so onnxruntime
    can drop the clamps and fuse the op with the Q, and the clamps' upper bound (the Q's range must
    not reach past it, or onnxruntime keeps the clamp and runs the op in float)."""
    limit = float("inf")
    while True:
        readers = graph.consumers.get(tensor, [])
        if len(readers) != 1 or readers[0].op_type not in FOLDED_INTO_Q or tensor in graph.output_names:
            return tensor, limit
        limit = min(limit, _clip_max(graph, readers[0]))
        tensor = readers[0].output[0]


def ort_cpu_points(graph: Graph, traits: ModelTraits, quantize: set, opts: PlacementOptions) -> dict:
    """TensorRT's points plus the outputs of quantized Convs and of the integer ops fed only by
    quantized tensors, so each of them reads DQ and writes Q. MatMul/Gemm outputs and graph outputs
    stay float."""
    points = tensorrt_points(graph, traits, quantize, opts)
    add = _adder(graph, points)

    def quantize_output(node):
        tensor, limit = _after_clamps(graph, node.output[0])
        if tensor in graph.output_names or tensor not in traits.activations:
            return
        for reader in graph.consumers.get(tensor, []):  # every reader reads the DQ: the op's only reader is the Q
            add(tensor, reader)
        points[tensor].high_limit = min(points[tensor].high_limit, limit)

    for n in graph.nodes:
        if n.name in quantize and n.op_type == "Conv" and graph.weight_spec(n) is not None:
            quantize_output(n)
        elif n.op_type in ORT_INT8_OPS:
            ins = [i for i in n.input if i]
            if ins and all(i in points for i in ins):  # a float constant input keeps the op in float
                for i in ins:
                    add(i, n)
                quantize_output(n)
    for n in graph.nodes:  # a Reshape/MaxPool between two points: one set of qparams, so it runs on int8
        if n.op_type in PASS_THROUGH and n.input[0] in points and n.output[0] in points:
            src = points[n.input[0]]
            points[n.output[0]].same_as = src.same_as or src.tensor
            add(n.input[0], n)
    return points


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    placement: Callable[[Graph, ModelTraits, set, PlacementOptions], dict]
    act_symmetric: bool  # zero point 0 (TensorRT) or one per tensor (onnxruntime CPU)
    act_signed: bool  # int8 (True) or uint8 activations at 8 bits
    int32_bias: bool = False  # Gemm bias as int32 behind a DQ (scale = input scale x weight scale)
    int8_tables: bool = False  # embedding tables read by Gather as int8 behind a DQ (weight-only, per row)
    signed_weight_scales: bool = False  # DequantizeLinear scales may be negative (onnxruntime; not TensorRT)
    weight_zero_points: bool = False  # weights may be unsigned with zero points (--asymmetric)

    def weight_grid(self, act_bits: int, bits: int, asymmetric: bool = False) -> str:
        """The integer grid of ``bits``-bit weights (quantizers.grid.WEIGHT_GRIDS). Int8 weights use the
        narrow symmetric grid (int8 [-127, 127]: TensorRT's convention, and the extra level is 1/255 of
        the range). Weight-only int4 and below are stored as INT4, whose extra level -8 is a 7/8 step:
        the full grid [-8, 7], with per-channel (per-block) signed scales where the runtime takes them,
        so every row gets the finer step (SmolLM2 W4 b128: +39.5 % perplexity vs +53.8 % on [-7, 7]).
        ``asymmetric`` (weight-only, onnxruntime) gives every width a zero point per channel or block.
        Beside int8 activations, 3 bits and below take the full grid too (Lite0 W3A8: 84.43 % and
        5.76 dB against 81.56 % and 5.07 dB), but 4 bits stay narrow: there the full grid raised the
        output SQNR yet lowered top-1 on Lite0, Lite1 and the demo (README, "The whole int4 grid")."""
        if asymmetric:
            return "asymmetric"
        if bits > 4 or (act_bits and bits == 4):
            return "narrow"
        return "signed" if self.signed_weight_scales else "full"

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
        """The target's static rule check on a written QDQ model (errors and warnings), opset and IR
        bounds included (onnx_facts)."""
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
                      act_signed=False, int32_bias=True, int8_tables=True, signed_weight_scales=True,
                      weight_zero_points=True),  # QGemm needs the int32 bias
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise OnnxflexError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}") from None
