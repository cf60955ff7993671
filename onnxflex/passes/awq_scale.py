"""Activation-aware weight scaling (`--awq`; Lin et al. 2024, "AWQ"): before low-bit weight-only
quantization, move per-input-channel scales from the weights of MatMuls into what produces their input,
so the channels that carry large activations get a finer share of the weight grid.

For a tensor X read only by MatMuls with constant weights W_i [K, N], X W_i = (X diag(1/s)) (diag(s) W_i)
for any s > 0. The pass multiplies the rows of every W_i by s and folds 1/s into X's producer where
that is exact and costs nothing at run time:

- gain: X = Mul(x, g), g a constant [K] vector (the gain of an RMSNorm / LayerNorm as exporters write it);
  g /= s.
- product: X = Mul(a, b), b = MatMul(., W_b) read by nothing else (a gated MLP's up projection feeding
  the down projection); W_b's columns /= s.

s = m^alpha / sqrt(max * min) with m the mean |x| per channel on calibration data, and alpha per group
from 0, 0.05, .., 1 by the group's weight-rounding error on its outputs, measured exactly through the
Gram matrix G = X^T X: sum_i tr(D_i^T G D_i), D_i = W_i - diag(1/s) Q(diag(s) W_i), Q the run's RTN
grid (bits, block size, symmetry) with unclipped scales. alpha = 0 (s = 1, nothing changes) is on that grid, so no group is
scaled to a larger error than it had. The learned rounding then starts from the scaled weights.

The rewritten model is checked against the original on calibration samples (function_check); a
difference beyond float rounding keeps the original.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from onnx import numpy_helper

from ..graph import Graph, float_outputs_exposed
from ..traits import SHAPE_OPS
from .base import Pass
from .function_check import MIN_SQNR_DB, calibration_feeds, model_outputs, outputs_change_db

log = logging.getLogger("onnxflex")

ALPHAS = tuple(np.round(np.linspace(0.0, 1.0, 21), 2))
MEAN_FLOOR = 1e-4  # a channel's mean |x| is floored at this fraction of the largest (dead channels)
STATS_BYTES = 1 << 30  # Gram matrices (float64) gathered per onnxruntime pass over the calibration windows


@dataclass
class ScaleGroup:
    """MatMuls that read one tensor, and where its per-channel 1/s goes."""

    tensor: str  # X, the MatMuls' data input
    kind: str  # "gain" | "product"
    source: str  # initializer that takes 1/s: the gain vector, or the producing MatMul's weight (columns)
    node: str  # the Mul that makes the tensor (a shared gain gets a copy of its own there)
    weights: list  # the readers' weight initializers ([K, N]; rows take s)
    readers: list  # the readers' node names
    channels: int
    alpha: float = 0.0
    error_ratio: float = 1.0  # group rounding error after / before on the calibration Gram
    scales: Optional[np.ndarray] = field(default=None, repr=False)


def _value_readers(graph: Graph, tensor: str) -> list:
    """Readers of tensor's values (Shape and Size read only its shape, which scaling keeps)."""
    return [r for r in graph.consumers.get(tensor, []) if r.op_type not in SHAPE_OPS]


def _matmul_weight(graph: Graph, node, tensor: str) -> Optional[str]:
    """The [K, N] constant weight of a MatMul that reads tensor as its data input, if it owns it."""
    if node.op_type != "MatMul" or node.input[0] != tensor or node.input[1] == tensor:
        return None
    w = node.input[1]
    if not graph.is_private_constant(w) or len(graph.initializers[w].dims) != 2:
        return None
    return w


def find_groups(graph: Graph) -> list:
    """Every Mul output read only by MatMuls with their own [K, N] weights, whose producer can take 1/s."""
    groups = []
    for node in graph.nodes:
        if node.op_type != "Mul" or len(node.input) != 2 or node.input[0] == node.input[1]:
            continue
        x = node.output[0]
        readers = _value_readers(graph, x)
        if not readers or x in graph.output_names:
            continue
        weights = [_matmul_weight(graph, r, x) for r in readers]
        if any(w is None for w in weights):
            continue
        k = {int(graph.initializers[w].dims[0]) for w in weights}
        if len(k) != 1:
            continue
        k = k.pop()
        consts = [i for i in node.input if graph.is_constant(i)]
        group = None
        if len(consts) == 1:
            g = consts[0]
            dims = list(graph.initializers[g].dims)
            if dims and dims[-1] == k and int(np.prod(dims)) == k:
                group = ScaleGroup(x, "gain", g, node.name, weights, [r.name for r in readers], k)
        elif not consts:
            for i in node.input[::-1]:
                p = graph.producer.get(i)
                if p is None or len(_value_readers(graph, i)) != 1 or i in graph.output_names:
                    continue
                w = _matmul_weight(graph, p, p.input[0]) if p.op_type == "MatMul" else None
                if w is not None and int(graph.initializers[w].dims[1]) == k:
                    group = ScaleGroup(x, "product", w, node.name, weights, [r.name for r in readers], k)
                    break
        if group is not None:
            groups.append(group)
    return groups


def group_statistics(graph: Graph, groups: list, calibration, samples: int) -> dict:
    """{tensor: (G = X^T X float64 [K, K], mean |x| [K])} over the first calibration samples, from onnxruntime."""
    from ..runtime.session import make_session

    names = [g.tensor for g in groups]
    with float_outputs_exposed(graph.model, names) as model:  # a copy would hold every weight twice
        sess = make_session(model, optimization="disable", arena=False)
    gram = {n: torch.zeros(g.channels, g.channels, dtype=torch.float64) for n, g in zip(names, groups)}
    total = {n: torch.zeros(g.channels, dtype=torch.float64) for n, g in zip(names, groups)}
    rows = 0
    for feed in calibration_feeds(calibration, samples, 1):
        outs = sess.run(names, feed)
        for name, y in zip(names, outs):
            x = torch.from_numpy(np.ascontiguousarray(y)).reshape(-1, y.shape[-1]).to(torch.float64)
            gram[name].addmm_(x.T, x)
            total[name] += x.abs().sum(0)
        rows += int(np.prod(outs[0].shape[:-1]))
    return {n: (gram[n], total[n] / max(rows, 1)) for n in names}


def rounding_error(weights: list, gram: torch.Tensor, scales: torch.Tensor) -> float:
    """sum_i tr(D_i^T G D_i), D_i = W_i - diag(1/s) Q_i(diag(s) W_i): the group's output error on the Gram
    (float32 products, summed in float64; only the ordering of the alphas matters). weights: [(W_i [K, N], Q_i)]."""
    err = 0.0
    for w, quantize in weights:
        d = (w - quantize(w * scales[:, None]) / scales[:, None])
        err += float(((gram @ d) * d).sum(dtype=torch.float64))
    return err


def choose_scales(weights: list, gram: torch.Tensor, mean_abs: torch.Tensor) -> tuple:
    """(alpha, s, error after / error before) minimising :func:`rounding_error` over ALPHAS.
    weights: [(W_i [K, N], Q_i)], Q_i the RTN grid W_i is deployed on."""
    top = float(mean_abs.max())
    m = mean_abs.clamp_min(top * MEAN_FLOOR if top > 0 else 1.0)
    ws = [(torch.tensor(np.asarray(w, np.float32)), q) for w, q in weights]
    gram = gram.to(torch.float32)
    m = m.to(torch.float32)
    ones = torch.ones_like(m)
    base = rounding_error(ws, gram, ones)
    best = (0.0, ones, base)
    for a in ALPHAS[1:]:
        s = m ** a
        s = s / torch.sqrt(s.max() * s.min())
        e = rounding_error(ws, gram, s)
        if e < best[2]:
            best = (float(a), s, e)
    return best[0], best[1], (best[2] / base if base > 0 else 1.0)


def rtn_quantizer(bits: int, block_size: int, grid: str) -> Callable:
    """The run's RTN grid for a MatMul weight [K, N] (out axis 1, in axis 0), returning the dequantized
    weight. Its scale is the unclipped max (AWQ's search does the same): the clipping search of the
    reconstruction's RTN start costs 20x as much, and would be repeated for every alpha."""
    from ..quantizers.rtn import RTNQuantizer

    def quantize(w: torch.Tensor) -> torch.Tensor:
        return RTNQuantizer(w, bits, 1, 0, scale_method="minmax", block_size=block_size, grid=grid)().detach()

    return quantize


def rescale_in_place(graph: Graph, groups: list) -> Callable:
    """Apply the chosen scales to graph.model's initializers in place (a large model is not copied);
    returns a function that puts the original ones back. A gain read by other nodes too (exporters share
    equal initializers) gets a scaled copy of its own for its Mul."""
    rows: dict = {}  # initializer -> factor along axis 0 (a gain: per element)
    cols: dict = {}  # initializer -> factor along axis 1
    private = []  # (Mul node, input index, shared gain, its scaled copy)
    nodes = {n.name: n for n in graph.model.graph.node}

    def scale(d, name, v):
        d[name] = d[name] * v if name in d else v

    for g in groups:
        if g.scales is None or g.alpha == 0.0:
            continue
        s = g.scales
        if g.kind == "gain" and graph.is_private_constant(g.source):
            scale(rows, g.source, 1.0 / s)
        elif g.kind == "gain":
            src = graph.array(g.source)
            node = nodes[g.node]
            copy = numpy_helper.from_array((src / s.reshape(src.shape)).astype(src.dtype),
                                           f"{g.source}__awq_{len(private)}")
            private.append((node, list(node.input).index(g.source), g.source, copy))
        else:
            scale(cols, g.source, 1.0 / s)
        for w in g.weights:
            scale(rows, w, s)
    originals = {}
    for name in rows.keys() | cols.keys():
        old = graph.array(name)
        new = old.astype(np.float64)
        if name in rows:
            r = rows[name]
            new *= r.reshape(new.shape) if r.size == new.size else r.reshape(-1, *([1] * (new.ndim - 1)))
        if name in cols:
            new *= cols[name][None, :]
        originals[name] = old
        graph.initializers[name].CopyFrom(numpy_helper.from_array(new.astype(old.dtype), name))
    for node, idx, _, copy in private:
        graph.model.graph.initializer.append(copy)
        node.input[idx] = copy.name

    def restore() -> None:
        for name, old in originals.items():
            graph.initializers[name].CopyFrom(numpy_helper.from_array(old, name))
        for node, idx, shared, copy in private:
            node.input[idx] = shared
            inits = graph.model.graph.initializer
            del inits[next(i for i, t in enumerate(inits) if t.name == copy.name)]

    return restore if (originals or private) else None


class ActivationScalePass(Pass):
    """AWQ scaling of the prepared model when ``cfg.awq``; a no-op otherwise.

    Replaces ``ctx.fp_model`` (the reference) with the rescaled model, which computes the same function
    (checked on calibration samples; otherwise the original is kept), and records per group what it
    chose in ``ctx.summary['awq']``."""

    name = "awq_scale"

    def __init__(self, samples: int = 32, check_samples: int = 2):
        self.samples, self.check_samples = samples, check_samples

    def run(self, graph: Graph, ctx) -> Graph:
        cfg = ctx.config
        if not cfg.awq:
            return graph
        groups = find_groups(graph)
        if not groups:
            ctx.summary["awq"] = dict(groups=0)
            ctx.notes.append("--awq: no MatMul input with a gain or an up projection to take the scales; "
                             "the model is unchanged")
            return graph
        wide = graph.first_last_nodes(ctx.traits.decoder) if cfg.first_last_bits else set()
        grids = {}
        for bits in {cfg.weight_bits, max(cfg.first_last_bits or 0, cfg.weight_bits)}:
            grids[bits] = rtn_quantizer(bits, cfg.block_size, ctx.target.weight_grid(cfg.act_bits, bits, cfg.asymmetric))

        def grid_of(reader: str):
            return grids[max(cfg.first_last_bits, cfg.weight_bits) if reader in wide else cfg.weight_bits]

        chunk: list = []
        for i, g in enumerate(groups):
            chunk.append(g)
            size = sum(8 * c.channels ** 2 for c in chunk)
            if size >= STATS_BYTES or i == len(groups) - 1:
                stats = group_statistics(graph, chunk, ctx.calibration, self.samples)
                for c in chunk:
                    gram, mean_abs = stats.pop(c.tensor)
                    weights = [(graph.array(w), grid_of(r)) for w, r in zip(c.weights, c.readers)]
                    c.alpha, s, c.error_ratio = choose_scales(weights, gram, mean_abs)
                    c.scales = s.double().numpy()
                chunk = []
        scaled = [g for g in groups if g.alpha > 0]
        info = dict(groups=len(groups), scaled=len(scaled), samples=min(self.samples, len(ctx.calibration.samples)),
                    mean_error_ratio=round(float(np.mean([g.error_ratio for g in groups])), 4),
                    per_group=[dict(tensor=g.tensor, kind=g.kind, readers=g.readers, alpha=g.alpha,
                                    error_ratio=round(g.error_ratio, 4)) for g in groups])
        ctx.summary["awq"] = info
        if not scaled:
            ctx.notes.append(f"--awq: {len(groups)} MatMul inputs searched; none rounds better scaled, the model is "
                             "unchanged")
            return graph
        before = model_outputs(graph.model, ctx.calibration, self.check_samples, batch=1)
        restore = rescale_in_place(graph, groups)
        sqnr = outputs_change_db(before, model_outputs(graph.model, ctx.calibration, self.check_samples, batch=1))
        del before
        info["fp32_change_sqnr_db"] = round(sqnr, 1) if np.isfinite(sqnr) else None
        if sqnr < MIN_SQNR_DB:
            restore()
            info["kept_original"] = True
            ctx.notes.append(f"--awq: the rescaled model differs from the original (output SQNR {sqnr:.1f} dB on "
                             f"{self.check_samples} calibration samples); the original is kept")
            return graph
        msg = (f"--awq: {len(scaled)} of {len(groups)} MatMul inputs rescaled (activation-aware, alpha per group); "
               f"RTN rounding error on the calibration Gram x{info['mean_error_ratio']:.2f} on average")
        ctx.notes.append(msg)
        log.info(msg)
        ctx.fp_model = graph.model
        return Graph(graph.model)
