"""Activation quantization points (TensorRT placement) and their calibrated ranges.

Points: the activation input of every quantized weighted op and both inputs of a residual Add,
never a graph output and never a Conv output that only feeds a ReLU/Clip (DESIGN §3).
Ranges: minmax, percentile or MSE, from ONNX Runtime's FP32 activations on the calibration set.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..graph import Graph, with_float_outputs
from ..passes.partition import _weight_dependent

SAMPLE_PER_TENSOR = 1 << 18  # values kept per tensor for percentile / MSE search


@dataclass
class ActPoint:
    tensor: str
    consumers: set = field(default_factory=set)  # nodes that read the quantized tensor
    scale: float = 0.0
    absmax: float = 0.0


def act_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def find_act_points(graph: Graph, quantize: set, quantize_act_matmul: bool = False) -> dict[str, ActPoint]:
    """Where activation Q/DQ pairs go. One pair per tensor, shared by all its quantized readers."""
    points: dict[str, ActPoint] = {}

    def add(tensor, node):
        if tensor and not graph.is_constant(tensor):
            points.setdefault(tensor, ActPoint(tensor)).consumers.add(node.name)

    dep = _weight_dependent(graph)
    for n in graph.nodes:
        spec = graph.weight_spec(n)
        if spec is not None:
            if n.name in quantize:
                add(spec.data_input, n)
        elif n.op_type == "Add" and len(n.input) == 2:
            a, b = n.input
            if not graph.is_constant(a) and not graph.is_constant(b) and a in dep and b in dep:
                add(a, n)
                add(b, n)
        elif quantize_act_matmul and n.op_type == "MatMul":
            if not graph.is_constant(n.input[0]) and not graph.is_constant(n.input[1]):
                add(n.input[0], n)
                add(n.input[1], n)
    return points


def scale_from_samples(samples: np.ndarray, absmax: float, bits: int, method: str, percentile: float = 99.99) -> float:
    """Per-tensor symmetric scale for an activation, from a sample of its values."""
    qmax = act_qmax(bits)
    absmax = float(absmax)
    if absmax <= 0 or not np.isfinite(absmax):
        return 1.0 / qmax if absmax <= 0 else float(np.finfo(np.float32).max) / qmax
    if method == "minmax" or samples.size == 0:
        return absmax / qmax
    if method == "percentile":
        clip = float(np.percentile(np.abs(samples), percentile))
        return max(clip, 1e-12) / qmax
    # mse: the clipping value minimising the quantization MSE on the sample
    x = samples.astype(np.float32)

    def err(ratio):
        s = ratio * absmax / qmax
        return float(np.mean((np.clip(np.round(x / s), -qmax - 1, qmax) * s - x) ** 2))

    # coarse grid, then a fine one around the best coarse ratio
    coarse = np.linspace(0.05, 1.0, 20)
    r0 = coarse[int(np.argmin([err(r) for r in coarse]))]
    fine = np.clip(np.linspace(r0 - 0.05, r0 + 0.05, 21), 0.01, 1.0)
    return float(fine[int(np.argmin([err(r) for r in fine]))]) * absmax / qmax


def calibrate_points(model: onnx.ModelProto, points: dict[str, ActPoint], batches, bits: int,
                     method: str = "mse", percentile: float = 99.99, seed: int = 0, session_factory=None) -> None:
    """Fill ``points[*].scale`` by running the FP32 model in ONNX Runtime with the points as outputs."""
    if not points:
        return
    from ..runtime.session import make_session

    sess = (session_factory or make_session)(with_float_outputs(model, points))
    names = list(points)
    rng = np.random.default_rng(seed)
    samples = {t: [] for t in names}
    batches = list(batches)
    per_batch = max(4096, SAMPLE_PER_TENSOR // max(1, len(batches)))
    for feed in batches:
        outs = sess.run(names, feed)
        for t, v in zip(names, outs):
            v = v.reshape(-1)
            points[t].absmax = max(points[t].absmax, float(np.max(np.abs(v))) if v.size else 0.0)
            if method != "minmax":
                take = v if v.size <= per_batch else v[rng.integers(0, v.size, per_batch)]
                samples[t].append(take.astype(np.float32))
    for t in names:
        s = np.concatenate(samples[t]) if samples[t] else np.zeros(0, np.float32)
        points[t].scale = scale_from_samples(s, points[t].absmax, bits, method, percentile)


class CalibratePass:
    """Find activation Q points and calibrate their scales (no-op for weight-only runs)."""

    def run(self, graph: Graph, ctx) -> Graph:
        cfg = ctx.config
        if cfg.act_bits == 0:
            ctx.act_points = {}
            return graph
        ctx.act_points = find_act_points(graph, ctx.quantize_nodes, cfg.quantize_act_matmul)
        calibrate_points(graph.model, ctx.act_points, ctx.calibration.batches(cfg.batch_size), cfg.act_bits,
                         cfg.calib_method, cfg.percentile, cfg.seed)
        return graph
