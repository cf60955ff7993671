"""Cross-layer equalization (`--cle`, Nagel et al. 2019, "Data-Free Quantization"): an optional
prepare step that rescales Conv -> (Relu | LeakyRelu | ReLU6 | none) -> Conv chains so both convs'
per-channel weight ranges are equal, without changing what the model computes.

For a channel c between two convs, scaling the first conv's output row (and bias) by 1/s_c and the
second conv's input column by s_c leaves the function unchanged through any positively homogeneous
activation (f(x/s) = f(x)/s for s > 0). With s_c = sqrt(r1_c / r2_c) (r = the channel's max |w|) both
ranges become sqrt(r1_c r2_c); chains that share a conv (expand -> depthwise -> project) are swept until
the scales settle. This matters most for per-tensor weight grids, where one wide channel of a depthwise
conv sets the step for all of them.

ReLU6 (Clip(0, m)) is not homogeneous. The DFQ paper replaces it by Relu in MobileNetV2; on
EfficientNet-Lite0 that replacement left an FP32 output SQNR of 0.1 dB against the original (most
channels do reach 6), so it is not done here. Instead a Clip chain's channel is rescaled only where
the Clip stays exact on the calibration data: a channel whose pre-activation reaches m/MARGIN keeps
s = 1, any other only shrinks while its largest pre-activation, times MARGIN, stays below m. The pass
then measures the equalized model against the original on calibration samples and keeps the original
when they differ by more than float rounding (MIN_SQNR_DB). High-bias absorption is not done.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import onnx

from ..graph import Graph
from ..lift.ops import node_attrs
from .base import Pass
from .function_check import MIN_SQNR_DB, calibration_feeds, function_change_db, with_initializers

log = logging.getLogger("onnxflex")

HOMOGENEOUS = {"Relu", "LeakyRelu"}  # f(x / s) = f(x) / s for s > 0
SWEEPS = 20  # DFQ's alternating sweeps; EfficientNet-Lite's chains settle in well under 20
SCALE_LIMITS = (1e-3, 1e3)  # a dead or exploding channel is not rescaled further than this
MARGIN = 1.25  # a ReLU6 channel's largest calibration pre-activation x this must stay inside the clip


def _only_reader(graph: Graph, tensor: str):
    readers = graph.consumers.get(tensor, [])
    if len(readers) != 1 or tensor in graph.output_names:
        return None
    return readers[0]


def _own_weight(graph: Graph, node: onnx.NodeProto, idx: int) -> bool:
    """The node's constant input idx exists and no other node reads it (a shared weight is left alone)."""
    return len(node.input) > idx and graph.is_private_constant(node.input[idx])


def find_chains(graph: Graph, relu6: bool = True) -> list:
    """(conv1, activation node or None, conv2) for every equalizable chain, in graph order.

    conv1: any 2-D Conv with its own weight; conv2: a regular (group 1) or depthwise (group = channels,
    one filter each) Conv reading the chain's tensor as its data input; the tensor between them has no
    other reader and is not a graph output."""
    chains = []
    for c1 in graph.nodes:
        if c1.op_type != "Conv" or not _own_weight(graph, c1, 1) or graph.array(c1.input[1]).ndim != 4:
            continue
        if len(c1.input) > 2 and c1.input[2] and not _own_weight(graph, c1, 2):
            continue
        nxt = _only_reader(graph, c1.output[0])
        act = None
        if nxt is not None and (nxt.op_type in HOMOGENEOUS or (relu6 and _is_relu6(graph, nxt))):
            act = nxt
            nxt = _only_reader(graph, act.output[0])
        if nxt is None or nxt.op_type != "Conv" or nxt.input[0] != (act or c1).output[0] or not _own_weight(graph, nxt, 1):
            continue
        w1, w2 = graph.array(c1.input[1]), graph.array(nxt.input[1])
        g2 = int(node_attrs(nxt).get("group", 1))
        channels = w1.shape[0]
        depthwise = g2 == channels and w2.shape[0] == channels and w2.shape[1] == 1
        if w2.ndim != 4 or not (depthwise or (g2 == 1 and w2.shape[1] == channels)):
            continue
        chains.append((c1, act, nxt))
    return chains


def _is_relu6(graph: Graph, node: onnx.NodeProto) -> bool:
    if node.op_type != "Clip":
        return False
    lo, hi = graph.clip_bounds(node)
    return lo == 0.0 and hi is not None and 0.0 < hi < np.inf


def equalize(graph: Graph, chains: list, maxima: Optional[dict] = None, sweeps: int = SWEEPS,
             tol: float = 1e-4) -> dict:
    """Rescale the chains' weights (numpy copies); returns {initializer: new array}.

    maxima: {Clip node name: per-channel max of its input on calibration data}. A Clip chain without
    them is left alone (data-free, nothing is known about where the clip bites)."""
    arrays: dict = {}
    total = {}  # Clip chain -> cumulative per-channel scale applied so far

    def get(name):
        if name not in arrays:
            arrays[name] = graph.array(name).astype(np.float32, copy=True)
        return arrays[name]

    for _ in range(sweeps):
        moved = 0.0
        for c1, act, c2 in chains:
            w1, w2 = get(c1.input[1]), get(c2.input[1])
            depthwise = int(node_attrs(c2).get("group", 1)) > 1
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
            col = w2.reshape(w2.shape[0], -1) if depthwise else np.moveaxis(w2, 1, 0).reshape(w2.shape[1], -1)
            r2 = np.abs(col).max(axis=1)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            s = np.clip(s, *SCALE_LIMITS).astype(np.float32)
            if act is not None and act.op_type == "Clip":
                s = _clip_safe(s, act, graph, maxima, total)
            w1 /= s.reshape(-1, 1, 1, 1)
            if len(c1.input) > 2 and c1.input[2]:
                b1 = get(c1.input[2])
                b1 /= s
            w2 *= s.reshape(-1, 1, 1, 1) if depthwise else s.reshape(1, -1, 1, 1)
            moved = max(moved, float(np.abs(np.log(s)).max()))
        if moved < tol:
            break
    return arrays


def _clip_safe(s: np.ndarray, clip: onnx.NodeProto, graph: Graph, maxima: Optional[dict], total: dict) -> np.ndarray:
    """The part of the step s that keeps Clip(0, m) exact on the calibration data: with the cumulative
    scale S (pre-activation y becomes y / S), clip(y / S, 0, m) = clip(y, 0, m) / S holds for S = 1, or
    for a channel whose max y (times MARGIN) is at most m and S >= max y * MARGIN / m."""
    m = maxima.get(clip.name) if maxima else None
    if m is None:
        return np.ones_like(s)
    hi = graph.clip_bounds(clip)[1]
    S = total.get(clip.name, np.ones_like(s))
    peak = np.asarray(m, np.float32) * MARGIN
    free = peak <= hi
    want = np.where(free, np.maximum(S * s, np.maximum(peak, 0) / hi), 1.0)
    want = np.maximum(want, SCALE_LIMITS[0])
    step = (want / S).astype(np.float32)
    total[clip.name] = want.astype(np.float32)
    return step


def clip_input_maxima(graph: Graph, chains: list, calibration, samples: int = 64, batch: int = 8) -> dict:
    """{Clip node: per-channel max of its input} over the first calibration samples, from onnxruntime."""
    from ..graph import with_float_outputs
    from ..runtime.session import make_session

    clips = {act.input[0]: act.name for _c1, act, _c2 in chains if act is not None and act.op_type == "Clip"}
    if not clips:
        return {}
    names = list(clips)
    sess = make_session(with_float_outputs(graph.model, names), optimization="disable")
    maxima: dict = {}
    for feed in calibration_feeds(calibration, samples, batch):
        outs = sess.run(names, feed)
        for name, y in zip(names, outs):
            m = y.reshape(y.shape[0], y.shape[1], -1).max(axis=(0, 2))
            maxima[clips[name]] = m if clips[name] not in maxima else np.maximum(maxima[clips[name]], m)
    return maxima


def equalized_model(graph: Graph, chains: Optional[list] = None, maxima: Optional[dict] = None) -> onnx.ModelProto:
    """The equalized copy of graph.model (graph is not modified)."""
    chains = find_chains(graph) if chains is None else chains
    arrays = equalize(graph, chains, maxima)
    return with_initializers(graph.model, arrays)


def weight_spread(graph: Graph, chains: list, arrays: Optional[dict] = None) -> float:
    """Mean over the chains' convs of log10(max / median) per-channel weight range: what a per-tensor
    grid suffers, for the report."""
    vals = []
    for name in {n.input[1] for c in chains for n in (c[0], c[2])}:
        w = arrays[name] if arrays and name in arrays else graph.array(name)
        r = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
        r = r[r > 0]
        if r.size:
            vals.append(np.log10(r.max() / np.median(r)))
    return float(np.mean(vals)) if vals else 0.0


class EqualizePass(Pass):
    """Cross-layer equalization of the prepared model when ``cfg.cle``; a no-op otherwise.

    Replaces ``ctx.fp_model`` (the reference) with the equalized model, which computes the same
    function (checked on calibration samples; otherwise the original is kept), and records what it
    did in ``ctx.summary['cle']``."""

    name = "equalize"

    def __init__(self, samples: int = 64, check_samples: int = 16):
        self.samples, self.check_samples = samples, check_samples

    def run(self, graph: Graph, ctx) -> Graph:
        if not getattr(ctx.config, "cle", False):
            return graph
        chains = find_chains(graph)
        clips = sum(1 for c in chains if c[1] is not None and c[1].op_type == "Clip")
        if not chains:
            ctx.summary["cle"] = dict(pairs=0, clip_pairs=0)
            ctx.notes.append("--cle: no Conv -> Relu/ReLU6 -> Conv chain to equalize; the model is unchanged")
            return graph
        maxima = clip_input_maxima(graph, chains, ctx.calibration, self.samples)
        model = equalized_model(graph, chains, maxima)
        after = Graph(model)
        sqnr = function_change_db(graph.model, model, ctx.calibration, self.check_samples)
        info = dict(pairs=len(chains), clip_pairs=clips, fp32_change_sqnr_db=round(sqnr, 1) if np.isfinite(sqnr) else None,
                    spread_before=round(weight_spread(graph, chains), 3), spread_after=round(weight_spread(after, chains), 3))
        if sqnr < MIN_SQNR_DB:
            info["kept_original"] = True
            ctx.summary["cle"] = info
            ctx.notes.append(f"--cle: the equalized model differs from the original (output SQNR {sqnr:.1f} dB on "
                             f"{self.check_samples} calibration samples); the original is kept")
            return graph
        ctx.summary["cle"] = info
        msg = (f"--cle: {len(chains)} conv pairs equalized ({clips} through ReLU6, only where the clip stays exact on "
               f"the calibration data); per-channel weight spread log10(max/median) {info['spread_before']:.2f} -> "
               f"{info['spread_after']:.2f}")
        ctx.notes.append(msg)
        log.info(msg)
        ctx.fp_model = model
        return after
