"""Activation ranges: for every Q point the target placed, a scale (and zero point) from ONNX
Runtime's FP32 activations on the calibration set (minmax, percentile or MSE; DESIGN §3).

Where the Q points go is the deployment target's decision (onnxflex/targets.py); this pass only
asks the target for them and measures their ranges.
"""
from __future__ import annotations

from functools import partial

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
CALIB_RUN_BYTES = 128 << 20  # outputs of one calibration run (see CalibratePass)
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


def _feed_size(feed: dict) -> int:
    return next((v.shape[0] for v in feed.values() if v.ndim), 1)  # text feeds are [batch, seq]


def _sample_values(v: np.ndarray, mask, b: int, start: int, k: int, key: tuple) -> list:
    """About ``k`` values of each sample of a run's output ``v`` (its real tokens only, for text), drawn
    by a generator seeded with the sample's index: the ranges do not depend on how the samples were
    batched (the calibrate pass sizes its runs by memory)."""
    if not (v.ndim and v.shape[0] == b):  # a tensor without a per-sample axis 0 (a locked graph's): the run
        parts, first = [v.reshape(-1)], [1, start]
    else:
        parts = [v[i][mask[i]] if mask is not None and v.shape[:2] == mask.shape else v[i] for i in range(b)]
        parts, first = [x.reshape(-1) for x in parts], None
    out = []
    for i, x in enumerate(parts):
        if x.size <= k:
            out.append(x.astype(np.float32))
            continue
        rng = np.random.default_rng(list(key) + (first or [0, start + i]))
        out.append(x[rng.integers(0, x.size, k)].astype(np.float32))
    return out


def calibrate_points(model: onnx.ModelProto, points: dict[str, ActPoint], batches, method: str = "mse",
                     percentile: float = 99.99, seed: int = 0, symmetric: bool = True, session_factory=None,
                     token_mask: np.ndarray | None = None, candidates: bool = False, num_samples: int | None = None) -> None:
    """Fill each point's scale and zero point by running the FP32 model in ONNX Runtime with the
    points as outputs (each point's ``dtype`` gives its grid).

    token_mask: [samples, seq] for text; values at padded positions of [batch, seq, ...] tensors
    are left out of the ranges (they are never looked at downstream). ``num_samples``: how many samples
    ``batches`` holds (then it is read lazily, one feed at a time)."""
    if not points:
        return
    from ..runtime.session import make_session

    sess = (session_factory or partial(make_session, arena=False))(with_float_outputs(model, points))
    names = list(points)
    samples = {t: [] for t in names}
    if num_samples is None:
        batches = list(batches)
        num_samples = sum(_feed_size(feed) for feed in batches)
    per_sample = max(16, SAMPLE_PER_TENSOR // max(1, num_samples))
    sampling = method != "minmax" or candidates
    start = 0
    for feed in batches:
        b = _feed_size(feed)
        outs = sess.run(names, feed)
        m = None if token_mask is None else token_mask[start:start + b] > 0
        for ti, (t, v) in enumerate(zip(names, outs)):
            p = points[t]
            if v.size:
                p.low, p.high = min(p.low, float(v.min())), max(p.high, float(v.max()))
            if sampling:
                samples[t].extend(_sample_values(v, m, b, start, per_sample, (int(seed) & 0xFFFFFFFF, ti)))
        start += b
        del outs
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
        # runs sized by the bytes of the outputs they return (onnxruntime keeps every requested output of a
        # run: 32 images of a 224-px CNN's 59 points are 0.8 GB, and the Python copies as much again)
        per_sample = 4 * sum(ctx.tensor_sizes.get(t, 0) for t in ctx.act_points)
        batch = max(1, min(cfg.batch_size, CALIB_RUN_BYTES // max(per_sample, 1)))
        calibrate_points(graph.model, ctx.act_points, ctx.calibration.batches(ctx.batching.batch(batch)),
                         resolve_calib_method(cfg.calib_method, attention), cfg.percentile, cfg.seed,
                         symmetric=ctx.target.act_symmetric, token_mask=ctx.calibration.token_mask,
                         candidates=cfg.calib_method == "auto" and attention, num_samples=ctx.calibration.num_samples)
        return graph
