"""Partition the graph into reconstruction regions by live sets (DESIGN §4).

A region is a contiguous run of nodes in topological order. Cutting where only one activation
tensor is live (plus small side inputs such as an attention mask) yields residual blocks and
transformer layers with no per-architecture rules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx

from ..graph import Graph, WeightSpec
from ..lift.ops import is_supported

SIDE_RATIO = 0.25  # a live tensor this much smaller than the largest one is a side input (mask, shape)


@dataclass
class Region:
    index: int
    kind: str  # layer | block | fp
    nodes: list
    inputs: list  # non-constant tensors read here and produced before the region
    outputs: list  # tensors produced here and read after it (or graph outputs)
    weights: list  # WeightSpec of the ops quantized in this region
    unsupported: list = field(default_factory=list)  # op types with no torch lifting

    @property
    def name(self) -> str:
        first = self.nodes[0].name if self.nodes else "?"
        return f"r{self.index:03d}:{first}"

    def describe(self) -> str:
        ops = ",".join(w.op_type for w in self.weights) or "-"
        return f"{self.name} [{self.kind}] {len(self.nodes)} nodes, weights: {ops}"


def _weight_dependent(graph: Graph) -> set:
    """Tensors downstream of a weighted op (used to tell residual Adds from mask Adds)."""
    dep = set()
    for n in graph.nodes:
        if graph.weight_spec(n) is not None or any(i in dep for i in n.input):
            dep.update(o for o in n.output if o)
    return dep


def live_sets(graph: Graph) -> list[set]:
    """live[i] = non-constant tensors produced at or before node i and read after it."""
    pos_last = {}
    n_nodes = len(graph.nodes)
    for i, n in enumerate(graph.nodes):
        for t in n.input:
            if t and not graph.is_constant(t):
                pos_last[t] = i
    for t in graph.output_names:
        pos_last[t] = n_nodes
    produced_at = {t: -1 for t in graph.input_names}
    for i, n in enumerate(graph.nodes):
        for o in n.output:
            if o:
                produced_at[o] = i
    live = []
    current = set()
    for i, n in enumerate(graph.nodes):
        for o in n.output:
            if o and pos_last.get(o, -1) > i:
                current.add(o)
        if i == 0:
            current.update(t for t in graph.input_names if pos_last.get(t, -1) > 0)
        current = {t for t in current if pos_last.get(t, -1) > i}
        live.append(set(current))
    return live


def _main_tensors(live: set, sizes: Optional[dict], int_tensors: set) -> set:
    """Drop side inputs (integer tensors, tensors much smaller than the largest live one)."""
    main = {t for t in live if t not in int_tensors}
    if sizes and main:
        biggest = max(sizes.get(t, 1) for t in main)
        main = {t for t in main if sizes.get(t, 1) > SIDE_RATIO * biggest}
    return main


def _region(graph: Graph, index: int, nodes: list, quantize: set, after: set) -> Region:
    produced = {o for n in nodes for o in n.output if o}
    inputs, seen = [], set()
    for n in nodes:
        for t in n.input:
            if t and t not in produced and not graph.is_constant(t) and t not in seen:
                seen.add(t)
                inputs.append(t)
    outputs = [o for n in nodes for o in n.output if o and (o in after or o in graph.output_names)]
    unsupported = sorted({n.op_type for n in nodes if not is_supported(n.op_type)})
    specs = [graph.weight_spec(n) for n in nodes]
    weights = [s for s in specs if s is not None and s.node in quantize]
    if unsupported:
        kind = "fp"
    elif not weights:
        kind = "fp"
    else:
        kind = "layer" if len(weights) == 1 else "block"
    return Region(index, kind, nodes, inputs, outputs, [] if unsupported else weights, unsupported)


def partition(graph: Graph, mode: str = "auto", quantize: Optional[set] = None,
              sizes: Optional[dict] = None, max_ops: Optional[int] = None) -> list[Region]:
    """Split the graph into regions.

    mode: layer = one weighted op (with what follows it up to the next weighted op) per region;
    block/auto = spans between single-live-tensor cuts, merged up to ``max_ops`` weighted ops
    (default: the largest unsplittable span, at least 3).
    quantize: names of the weighted nodes to quantize (default: all with a constant weight).
    sizes: per-sample element count per tensor, to recognise small side inputs.
    """
    nodes = graph.nodes
    if quantize is None:
        quantize = {s.node for s in graph.weighted_nodes()}
    is_w = [graph.weight_spec(n) is not None and n.name in quantize for n in nodes]
    int_tensors = {t for t, et in graph.elem_types.items()
                   if et not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                                 onnx.TensorProto.DOUBLE)}
    live = live_sets(graph)

    if mode == "layer":
        cuts = [i - 1 for i in range(1, len(nodes)) if is_w[i] and any(is_w[:i])]
    else:
        cuts = [i for i in range(len(nodes) - 1) if len(_main_tensors(live[i], sizes, int_tensors)) <= 1]
    spans, start = [], 0
    for c in cuts:
        spans.append(nodes[start:c + 1])
        start = c + 1
    spans.append(nodes[start:])
    spans = [s for s in spans if s]

    if mode != "layer":
        counts = [sum(1 for n in s if n.name in quantize and graph.weight_spec(n) is not None) for s in spans]
        cap = max_ops or max(3, max(counts) if counts else 1)
        merged, cur, cur_ops = [], [], 0
        for s, c in zip(spans, counts):
            if cur and cur_ops > 0 and cur_ops + c > cap:
                merged.append(cur)
                cur, cur_ops = [], 0
            cur = cur + s
            cur_ops += c
        if cur:
            if merged and cur_ops == 0:
                merged[-1] = merged[-1] + cur  # trailing ops with no weights join the last region
            else:
                merged.append(cur)
        spans = merged

    # every tensor read after a region ends is "after" for that region
    regions = []
    readers_after = [set() for _ in spans]
    later = set(graph.output_names)
    for k in range(len(spans) - 1, -1, -1):
        readers_after[k] = set(later)
        for n in spans[k]:
            later.update(t for t in n.input if t)
    for k, s in enumerate(spans):
        regions.append(_region(graph, k, s, quantize, readers_after[k]))
    return regions


def tensor_sizes(shapes: dict) -> dict:
    """Per-sample element counts from captured shapes (batch dimension dropped)."""
    return {t: int(np.prod(s[1:])) if len(s) > 1 else 1 for t, s in shapes.items()}


def auto_mode(device: str) -> str:
    """auto: blocks where forward/backward passes are affordable (a GPU), else single-op regions,
    whose exact Gram-form loss makes an iteration independent of the activation size (CPU)."""
    return "block" if device == "cuda" else "layer"


class PartitionPass:
    """Graph -> regions, stored on the context for the reconstruct pass."""

    def run(self, graph: Graph, ctx) -> Graph:
        mode = ctx.config.regions if ctx.config.regions != "auto" else auto_mode(ctx.device)
        ctx.regions = partition(graph, mode, quantize=ctx.quantize_nodes, sizes=ctx.tensor_sizes)
        return graph
