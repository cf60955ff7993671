"""Activation ranges: for every Q point the target placed, a scale (and zero point) from ONNX
Runtime's FP32 activations on the calibration set (minmax, percentile or MSE; DESIGN §3).

Where the Q points go is the deployment target's decision (onnxflex/targets.py); this pass only
asks the target for them and measures their ranges.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..context import ActPoint
from ..graph import Graph, with_float_outputs
from ..targets import PlacementOptions
from .base import Pass

# with minmax and mse, the ranges auto chooses from: percentiles of |x|, and fractions of max |x|
CANDIDATE_PERCENTILES = (99.9, 99.99, 99.999)
CANDIDATE_RATIOS = (0.8, 0.6, 0.45)
SAMPLE_PER_TENSOR = 1 << 18  # values kept per tensor for percentile / MSE search
QRANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "uint16": (0, 65535)}


def qparams(low: float, high: float, dtype: str, symmetric: bool) -> tuple[float, int]:
    """(scale, zero point) that represent [low, high] on the dtype's grid, zero exactly representable.

    Symmetric: zero point 0 and scale = max(|low|, |high|) / qmax (TensorRT). Asymmetric: the grid
    spans [min(low, 0), max(high, 0)] (onnxruntime's CPU kernels; one-sided ReLU outputs use the
    whole grid)."""
    qmin, qmax = QRANGES[dtype]
    if symmetric:
        absmax = max(abs(float(low)), abs(float(high)))
        if not np.isfinite(absmax):
            return float(np.finfo(np.float32).max) / qmax, 0
        return (absmax if absmax > 0 else 1.0) / qmax, 0
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if not (np.isfinite(low) and np.isfinite(high)):
        return float(np.finfo(np.float32).max) / (qmax - qmin), 0
    if high - low <= 0:
        return 1.0 / (qmax - qmin), int(np.clip(0, qmin, qmax))
    scale = (high - low) / (qmax - qmin)
    zp = int(np.clip(round(qmin - low / scale), qmin, qmax))
    return scale, zp


def range_from_samples(samples: np.ndarray, low: float, high: float, method: str, percentile: float,
                       dtype: str, symmetric: bool) -> tuple[float, float]:
    """The [low, high] to quantize, from the observed extremes and a sample of the values."""
    if method == "minmax" or samples.size == 0 or not (np.isfinite(low) and np.isfinite(high)):
        return low, high
    if method == "percentile":
        if symmetric:
            clip = max(float(np.percentile(np.abs(samples), percentile)), 1e-12)
            return -clip, clip
        return (float(np.percentile(samples, 100.0 - percentile)) if low < 0 else low,
                max(float(np.percentile(samples, percentile)), 1e-12))
    # mse: the fraction of the full range that minimises the quantization MSE on the sample
    x = samples.astype(np.float32)
    qmin, qmax = QRANGES[dtype]

    def err(ratio):
        s, zp = qparams(ratio * low, ratio * high, dtype, symmetric)
        return float(np.mean(((np.clip(np.round(x / s) + zp, qmin, qmax) - zp) * s - x) ** 2))

    coarse = np.linspace(0.05, 1.0, 20)  # coarse grid, then a fine one around the best coarse ratio
    r0 = coarse[int(np.argmin([err(r) for r in coarse]))]
    fine = np.clip(np.linspace(r0 - 0.05, r0 + 0.05, 21), 0.01, 1.0)
    r = float(fine[int(np.argmin([err(r) for r in fine]))])
    return r * low, r * high


def calibrate_points(model: onnx.ModelProto, points: dict[str, ActPoint], batches, method: str = "mse",
                     percentile: float = 99.99, seed: int = 0, symmetric: bool = True, session_factory=None,
                     token_mask: np.ndarray | None = None, candidates: bool = False) -> None:
    """Fill each point's scale and zero point by running the FP32 model in ONNX Runtime with the
    points as outputs (each point's ``dtype`` gives its grid).

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
        b = next((v.shape[0] for v in feed.values() if v.ndim), 1)  # text feeds are [batch, seq]
        m = None if token_mask is None else token_mask[start:start + b] > 0
        start += b
        for t, v in zip(names, outs):
            v = v[m] if m is not None and v.shape[:2] == m.shape else v
            v = v.reshape(-1)
            p = points[t]
            if v.size:
                p.low, p.high = min(p.low, float(v.min())), max(p.high, float(v.max()))
            if method != "minmax" or candidates:
                take = v if v.size <= per_batch else v[rng.integers(0, v.size, per_batch)]
                samples[t].append(take.astype(np.float32))
    for t in names:
        p = points[t]
        s = np.concatenate(samples[t]) if samples[t] else np.zeros(0, np.float32)

        high = min(p.high, p.high_limit)

        def fit(m, q=percentile):
            return qparams(*range_from_samples(s, p.low, high, m, q, p.dtype, symmetric), p.dtype, symmetric)

        if candidates:
            p.candidates = {"minmax": fit("minmax"), "mse": fit("mse")}
            p.candidates.update({f"p{q}": fit("percentile", q) for q in CANDIDATE_PERCENTILES})
            p.candidates.update({f"max*{r}": qparams(r * p.low, r * high, p.dtype, symmetric)
                                 for r in CANDIDATE_RATIOS})
        p.scale, p.zero_point = fit(method)
    for p in points.values():  # shared qparams are the source's (its range covers the same values)
        if p.same_as:
            src = points[p.same_as]
            p.scale, p.zero_point, p.candidates = src.scale, src.zero_point, {}


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


class CalibratePass(Pass):
    """Ask the target where activation Q/DQ go and calibrate them (no-op for weight-only runs)."""

    name = "calibrate"

    def run(self, graph: Graph, ctx) -> Graph:
        cfg = ctx.config
        if cfg.act_bits == 0:
            ctx.act_points = {}
            return graph
        attention = ctx.traits.attention
        residual = cfg.quantize_residual if cfg.quantize_residual is not None else not attention
        opts = PlacementOptions(quantize_act_matmul=cfg.quantize_act_matmul, quantize_residual=residual)
        ctx.act_points = ctx.target.act_points(graph, ctx.traits, ctx.quantize_nodes, opts, cfg.act_bits)
        calibrate_points(graph.model, ctx.act_points, ctx.calibration.batches(ctx.batching.batch(cfg.batch_size)),
                         resolve_calib_method(cfg.calib_method, attention), cfg.percentile, cfg.seed,
                         symmetric=ctx.target.act_symmetric, token_mask=ctx.calibration.token_mask,
                         candidates=cfg.calib_method == "auto" and attention)
        return graph
