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
from ..passes.partition import _data_dependent, _weight_dependent, has_attention

# with minmax and mse, the ranges auto chooses from: percentiles of |x|, and fractions of max |x|
CANDIDATE_PERCENTILES = (99.9, 99.99, 99.999)
CANDIDATE_RATIOS = (0.8, 0.6, 0.45)
SAMPLE_PER_TENSOR = 1 << 18  # values kept per tensor for percentile / MSE search


@dataclass
class ActPoint:
    tensor: str
    consumers: set = field(default_factory=set)  # nodes that read the quantized tensor
    scale: float = 0.0
    absmax: float = 0.0
    candidates: dict = field(default_factory=dict)  # method -> scale, for the choice by region error


def act_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def find_act_points(graph: Graph, quantize: set, quantize_act_matmul: bool = False,
                    quantize_residual: bool = True) -> dict[str, ActPoint]:
    """Where activation Q/DQ pairs go. One pair per tensor, shared by all its quantized readers.

    quantize_residual: Q/DQ on both inputs of residual Adds (TensorRT fuses them into a conv).
    Transformers are run without: their residual stream carries outlier channels two orders of
    magnitude above the rest, which one per-tensor int8 scale cannot hold (measured on MiniLM:
    W8A8 embedding cosine 0.86 with, 0.98 without)."""
    points: dict[str, ActPoint] = {}

    def add(tensor, node):
        if tensor and not graph.is_constant(tensor):
            points.setdefault(tensor, ActPoint(tensor)).consumers.add(node.name)

    dep, data = _weight_dependent(graph), _data_dependent(graph)
    for n in graph.nodes:
        spec = graph.weight_spec(n)
        if spec is not None:
            if n.name in quantize:
                add(spec.data_input, n)
        elif quantize_residual and n.op_type == "Add" and len(n.input) == 2:
            a, b = n.input
            # a residual Add: both inputs are activations and at least one comes from a weighted op
            # (not a mask Add, not the sum of embedding lookups)
            if a in data and b in data and (a in dep or b in dep):
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
                     method: str = "mse", percentile: float = 99.99, seed: int = 0, session_factory=None,
                     token_mask: np.ndarray | None = None, candidates: bool = False) -> None:
    """Fill ``points[*].scale`` by running the FP32 model in ONNX Runtime with the points as outputs.

    token_mask: [samples, seq] for text; values at padded positions of [batch, seq, ...] tensors
    are left out of the ranges (they are never looked at downstream)."""
    if not points:
        return
    from ..runtime.session import make_session

    sess = (session_factory or make_session)(with_float_outputs(model, points))
    names = list(points)
    rng = np.random.default_rng(seed)
    samples = {t: [] for t in names}
    batches = list(batches)
    per_batch = max(4096, SAMPLE_PER_TENSOR // max(1, len(batches)))
    start = 0
    for feed in batches:
        outs = sess.run(names, feed)
        b = len(next(iter(feed.values())))
        m = None if token_mask is None else token_mask[start:start + b] > 0
        start += b
        for t, v in zip(names, outs):
            v = v[m] if m is not None and v.shape[:2] == m.shape else v
            v = v.reshape(-1)
            points[t].absmax = max(points[t].absmax, float(np.max(np.abs(v))) if v.size else 0.0)
            if method != "minmax" or candidates:
                take = v if v.size <= per_batch else v[rng.integers(0, v.size, per_batch)]
                samples[t].append(take.astype(np.float32))
    for t in names:
        s = np.concatenate(samples[t]) if samples[t] else np.zeros(0, np.float32)
        if candidates:
            points[t].candidates = {"minmax": scale_from_samples(s, points[t].absmax, bits, "minmax"),
                                    "mse": scale_from_samples(s, points[t].absmax, bits, "mse")}
            for q in CANDIDATE_PERCENTILES:
                points[t].candidates[f"p{q}"] = scale_from_samples(s, points[t].absmax, bits, "percentile", q)
            for r in CANDIDATE_RATIOS:
                points[t].candidates[f"max*{r}"] = r * points[t].candidates["minmax"]
        points[t].scale = scale_from_samples(s, points[t].absmax, bits, method, percentile)


def resolve_calib_method(method: str, attention: bool) -> str:
    """What auto means. In attention models: start from the full range, then the reconstruct pass
    keeps, per point, whichever candidate range (minmax, mse, percentiles, fractions of the max)
    gives the least region output error; one method for all points is not enough there (MiniLM
    W8A8 RTN embedding cosine on 64 Lee documents: minmax 0.984, mse 0.980, percentile 0.916, chosen
    per point 0.989). Elsewhere the 99.99th percentile (EfficientNet-Lite0: bench/rtn_vs_ort.py;
    the per-point choice is not measured on CNNs yet)."""
    if method != "auto":
        return method
    return "minmax" if attention else "percentile"


class CalibratePass:
    """Find activation Q points and calibrate their scales (no-op for weight-only runs)."""

    def run(self, graph: Graph, ctx) -> Graph:
        cfg = ctx.config
        if cfg.act_bits == 0:
            ctx.act_points = {}
            return graph
        attention = has_attention(graph)
        residual = cfg.quantize_residual if cfg.quantize_residual is not None else not attention
        ctx.act_points = find_act_points(graph, ctx.quantize_nodes, cfg.quantize_act_matmul, residual)
        calibrate_points(graph.model, ctx.act_points, ctx.calibration.batches(cfg.batch_size), cfg.act_bits,
                         resolve_calib_method(cfg.calib_method, attention), cfg.percentile, cfg.seed,
                         token_mask=ctx.calibration.token_mask, candidates=cfg.calib_method == "auto" and attention)
        return graph
