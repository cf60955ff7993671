"""Cross-layer equalization (`--cle`, Nagel et al. 2019, "Data-Free Quantization"): an optional
prepare step that rescales Conv -> (Relu | ReLU6 | LeakyRelu | none) -> Conv chains so both convs'
per-channel weight ranges are equal.

For a channel c between two convs, scaling the first conv's output row (and bias) by 1/s_c and the
second conv's input column by s_c leaves the function unchanged through any positively homogeneous
activation (f(x/s) = f(x)/s for s > 0). With s_c = sqrt(r1_c / r2_c) (r = the channel's max |w|) both
ranges become sqrt(r1_c r2_c); chains that share a conv (expand -> depthwise -> project) are swept until
the scales settle. This matters most for per-tensor weight grids, where one wide channel of a depthwise
conv sets the step for all of them.

ReLU6 (Clip(0, m)) is not homogeneous: as in the DFQ paper (MobileNetV2), the chain's Clip becomes a
Relu, which changes the FP32 model wherever an activation exceeded m. The pass says how many it
replaced and measures the change on calibration samples (output SQNR of the equalized model against
the original), because the equalized model is the reference the rest of the run reproduces.
High-bias absorption is not done (it needs the pre-activation statistics BN folding removed).
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import Graph
from ..lift.ops import node_attrs
from .base import Pass

log = logging.getLogger("onnxflex")

HOMOGENEOUS = {"Relu", "LeakyRelu"}  # f(x / s) = f(x) / s for s > 0
SWEEPS = 20  # DFQ's alternating sweeps; EfficientNet-Lite's chains settle in well under 20
SCALE_LIMITS = (1e-3, 1e3)  # a dead or exploding channel is not rescaled further than this


def _const(graph: Graph, name: str):
    return graph.array(name) if name and graph.is_constant(name) else None


def _relu6_bounds(graph: Graph, node: onnx.NodeProto):
    """(low, high) of a Clip whose bounds are constants, else None."""
    if node.op_type != "Clip":
        return None
    a = node_attrs(node)
    if len(node.input) > 1 or "min" not in a:  # opset >= 11: bounds are inputs
        lo = _const(graph, node.input[1]) if len(node.input) > 1 and node.input[1] else np.float32(-np.inf)
        hi = _const(graph, node.input[2]) if len(node.input) > 2 and node.input[2] else np.float32(np.inf)
        if lo is None or hi is None:
            return None
        return float(lo), float(hi)
    return float(a.get("min", -np.inf)), float(a.get("max", np.inf))


def _only_reader(graph: Graph, tensor: str):
    readers = graph.consumers.get(tensor, [])
    if len(readers) != 1 or tensor in graph.output_names:
        return None
    return readers[0]


def _own_weight(graph: Graph, node: onnx.NodeProto, idx: int) -> bool:
    """The node's constant input idx exists and no other node reads it (a shared weight is left alone)."""
    if len(node.input) <= idx or not graph.is_constant(node.input[idx]):
        return False
    return len(graph.consumers.get(node.input[idx], [])) == 1


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
    b = _relu6_bounds(graph, node)
    return b is not None and b[0] == 0.0 and 0.0 < b[1] < np.inf


def equalize(graph: Graph, chains: list, sweeps: int = SWEEPS, tol: float = 1e-4) -> dict:
    """Rescale the chains' weights in place (as numpy arrays); returns {initializer: new array}."""
    arrays: dict = {}

    def get(name):
        if name not in arrays:
            arrays[name] = graph.array(name).astype(np.float32, copy=True)
        return arrays[name]

    for _ in range(sweeps):
        moved = 0.0
        for c1, _act, c2 in chains:
            w1, w2 = get(c1.input[1]), get(c2.input[1])
            depthwise = int(node_attrs(c2).get("group", 1)) > 1
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
            col = w2.reshape(w2.shape[0], -1) if depthwise else np.moveaxis(w2, 1, 0).reshape(w2.shape[1], -1)
            r2 = np.abs(col).max(axis=1)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            s = np.clip(s, *SCALE_LIMITS).astype(np.float32)
            w1 /= s.reshape(-1, 1, 1, 1)
            if len(c1.input) > 2 and c1.input[2]:
                b1 = get(c1.input[2])
                b1 /= s
            w2 *= s.reshape(-1, 1, 1, 1) if depthwise else s.reshape(1, -1, 1, 1)
            moved = max(moved, float(np.abs(np.log(s)).max()))
        if moved < tol:
            break
    return arrays


def equalized_model(graph: Graph, chains: Optional[list] = None) -> tuple:
    """(the equalized copy of graph.model, names of the Clips that became Relu). graph is not modified."""
    chains = find_chains(graph) if chains is None else chains
    arrays = equalize(graph, chains)
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    inits = {t.name: t for t in model.graph.initializer}
    for name, arr in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(arr.astype(graph.array(name).dtype), name))
    clips = {act.name for _c1, act, _c2 in chains if act is not None and act.op_type == "Clip"}
    bounds = {i for n in graph.nodes if n.name in clips for i in n.input[1:] if i}
    for node in model.graph.node:
        if node.name in clips:  # ReLU6 -> Relu (see the module docstring)
            del node.input[1:]
            del node.attribute[:]
            node.op_type = "Relu"
    used = {i for n in model.graph.node for i in n.input}
    for t in [t for t in model.graph.initializer if t.name in bounds and t.name not in used]:
        model.graph.initializer.remove(t)  # the replaced Clips' bounds, now read by nothing
    return model, clips


class EqualizePass(Pass):
    """Cross-layer equalization of the prepared model when ``cfg.cle``; a no-op otherwise.

    Replaces ``ctx.fp_model`` (the reference) with the equalized model and records what it did in
    ``ctx.summary['cle']``."""

    name = "equalize"

    def __init__(self, check_samples: int = 16):
        self.check_samples = check_samples

    def run(self, graph: Graph, ctx) -> Graph:
        if not getattr(ctx.config, "cle", False):
            return graph
        chains = find_chains(graph)
        if not chains:
            ctx.summary["cle"] = dict(pairs=0, relu6_replaced=0)
            ctx.notes.append("--cle: no Conv -> Relu/ReLU6 -> Conv chain to equalize; the model is unchanged")
            return graph
        model, clips = equalized_model(graph, chains)
        sqnr = self.change_db(graph.model, model, ctx) if clips else None
        ctx.summary["cle"] = dict(pairs=len(chains), relu6_replaced=len(clips), fp32_change_sqnr_db=sqnr)
        msg = f"--cle: {len(chains)} conv pairs equalized"
        if clips:
            msg += (f"; {len(clips)} ReLU6 replaced by Relu, which changes the FP32 model: output SQNR "
                    f"{sqnr:.1f} dB against the original on {min(self.check_samples, ctx.calibration.num_samples)} "
                    "calibration samples (the equalized model is the reference from here on)")
        ctx.notes.append(msg)
        log.info(msg)
        ctx.fp_model = model
        return Graph(model)

    def change_db(self, before: onnx.ModelProto, after: onnx.ModelProto, ctx) -> float:
        """Output SQNR (dB) of the equalized model against the original on the first calibration samples."""
        from ..runtime.session import make_session

        samples = ctx.calibration.samples[: self.check_samples]
        feed = ctx.calibration.joined(samples)
        ref = make_session(before, optimization="disable").run(None, feed)
        got = make_session(after, optimization="disable").run(None, feed)
        sig = sum(float(np.sum(np.square(r.astype(np.float64)))) for r in ref if r.dtype.kind == "f")
        err = sum(float(np.sum(np.square(r.astype(np.float64) - g))) for r, g in zip(ref, got) if r.dtype.kind == "f")
        return float("inf") if err == 0 else 10 * np.log10(sig / err)
