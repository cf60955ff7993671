"""Partition the graph into reconstruction regions by live sets (DESIGN §4).

A region is a contiguous run of nodes in topological order. Cutting where only one activation
tensor is live (plus small side inputs such as an attention mask) yields residual blocks and
transformer layers with no per-architecture rules.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

from ..context import Region
from ..calib.dataset import batch_axes
from ..graph import Graph, model_input_specs, reads
from ..layout import Batching, probe, probe_calibration, sizes_per_sample
from ..lift.ops import is_supported
from ..traits import SHAPE_OPS, data_dependent
from .base import Pass

SIDE_RATIO = 0.01  # a live tensor this much smaller than the largest one is a side input (a scalar)
MAX_PERIOD = 4  # longest repeating unit of spans looked for (attention + MLP = 2)


def live_sets(graph: Graph, outputs: bool = True) -> list[set]:
    """live[i] = non-constant tensors produced at or before node i and read after it.

    ``outputs=False`` leaves out graph outputs that no later node reads: a decoder's ``present.*`` KV
    tensors are finished once written, so they must not stop the cuts between its layers."""
    pos_last = {}
    n_nodes = len(graph.nodes)
    for i, n in enumerate(graph.nodes):
        for t in reads(n):
            if t and not graph.is_constant(t):
                pos_last[t] = i
    for t in graph.output_names if outputs else ():
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


def _main_tensors(live: set, sizes: Optional[dict], int_tensors: set, dep: set) -> set:
    """Drop side inputs: integer tensors, tensors computed from the inputs alone while an activation
    is live (an attention mask and what is derived from it), and tensors much smaller than the
    largest live one (shapes, scalars)."""
    main = {t for t in live if t not in int_tensors}
    if any(t in dep for t in main):
        main = {t for t in main if t in dep}
    if sizes and main:
        biggest = max(sizes.get(t, 1) for t in main)
        main = {t for t in main if sizes.get(t, 1) > SIDE_RATIO * biggest}
    return main


def _region(graph: Graph, index: int, nodes: list, quantize: set, after: set) -> Region:
    produced = {o for n in nodes for o in n.output if o}
    inputs, seen = [], set()
    for n in nodes:
        for t in reads(n):
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


def _signature(graph: Graph, span: list, quantize: set) -> tuple:
    """What a span computes with weights: its weighted ops and their weight shapes."""
    out = []
    for n in span:
        spec = graph.weight_spec(n)
        if spec is not None and n.name in quantize:
            out.append((n.op_type, tuple(graph.initializers[spec.weight].dims)))
    return tuple(out)


def _fold_weightless(spans: list, sigs: list) -> list:
    """Join spans without quantized weights to the span before them (leading ones to the first
    weighted span), so a layer ends after its closing LayerNorm rather than before it."""
    out, lead = [], []
    for s, sig in zip(spans, sigs):
        if sig:
            out.append(lead + s)
            lead = []
        elif out:
            out[-1] = out[-1] + s
        else:
            lead = lead + s
    return out or [lead]


def _group_repeats(spans: list, sigs: list) -> list:
    """Merge spans into the model's repeating unit. A transformer layer is cut twice at a single
    live tensor (after attention, after the MLP), so its spans alternate A, M, A, M...: the period
    is 2 and each unit A+M is one layer. A CNN whose blocks repeat one at a time keeps period 1."""
    def matches(p):
        return [i for i in range(len(sigs) - p) if sigs[i] and sigs[i] == sigs[i + p]]

    best_p, best = 1, len(matches(1))
    for p in range(2, MAX_PERIOD + 1):
        m = matches(p)
        if len(m) > best and len(m) >= p:
            best_p, best = p, len(m)
    if best_p == 1:
        return spans
    start = matches(best_p)[0]
    unit = sigs[start:start + best_p]
    out, i = list(spans[:start]), start
    while i + best_p <= len(spans) and sigs[i:i + best_p] == unit:
        out.append([n for s in spans[i:i + best_p] for n in s])
        i += best_p
    return out + list(spans[i:])


def _shape_only(graph: Graph) -> set:
    """Tensors computed from tensor shapes and constants alone (batch size, sequence length, the
    targets of Reshape). They describe one batch, not one sample, so they never cross regions."""
    out = set()
    for n in graph.nodes:
        if n.op_type in SHAPE_OPS or (n.op_type != "Constant" and all(
                not i or graph.is_constant(i) or i in out for i in n.input) and any(i in out for i in n.input)):
            out.update(o for o in n.output if o)
    return out


def _isolate_unsupported(graph: Graph, spans: list) -> list:
    """An op without a torch lifting (If, LSTM, a custom op) gets a region of its own, kept in FP32,
    so the weighted ops around it are still quantized (shape arithmetic stays where it is read)."""
    shape_only = _shape_only(graph)
    out = []
    for span in spans:
        cur = []
        for n in span:
            if is_supported(n.op_type) or all(o in shape_only for o in n.output if o):
                cur.append(n)
                continue
            out += [cur, [n]] if cur else [[n]]
            cur = []
        if cur:
            out.append(cur)
    return out


def _recompute_shapes(graph: Graph, spans: list) -> list:
    """Give each region its own copy of the shape computations it reads from earlier regions
    (from the Shape node on), instead of passing batch-sized shape tensors between regions."""
    shape_only = _shape_only(graph)
    if not shape_only:
        return spans
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    out = []
    for span in spans:
        made = {o for n in span for o in n.output}
        extra, seen = [], set()
        todo = [t for n in span for t in n.input if t in shape_only and t not in made]
        while todo:
            t = todo.pop()
            p = graph.producer.get(t)
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            extra.append(p)
            if p.op_type not in SHAPE_OPS:
                todo.extend(i for i in p.input if i in shape_only and i not in made)
        out.append(sorted(extra, key=lambda n: order[id(n)]) + list(span) if extra else span)
    return out


def partition(graph: Graph, mode: str = "auto", quantize: Optional[set] = None,
              sizes: Optional[dict] = None, max_ops: Optional[int] = None) -> list[Region]:
    """Split the graph into regions.

    mode: layer = one weighted op (with what follows it up to the next weighted op) per region, and
    the ops before the first weighted op in a region of their own;
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
    live = live_sets(graph, outputs=False)

    if mode == "layer":
        # a cut before every weighted op, the first one too: what precedes it (an embedding, a decoder's
        # mask and rotary tables, an input normalisation) is a weightless region of its own, so the first
        # op reads its input from the streams and gets the Gram form (SmolLM2's first q_proj took 78 s
        # of real passes with them inside its region, the other q_projs 6 s)
        cuts = [i - 1 for i in range(1, len(nodes)) if is_w[i]]
    else:
        dep = data_dependent(graph)
        cuts = [i for i in range(len(nodes) - 1) if len(_main_tensors(live[i], sizes, int_tensors, dep)) <= 1]
    spans, start = [], 0
    for c in cuts:
        spans.append(nodes[start:c + 1])
        start = c + 1
    spans.append(nodes[start:])
    spans = [s for s in spans if s]

    if mode != "layer":
        spans = _fold_weightless(spans, [_signature(graph, s, quantize) for s in spans])
        spans = _group_repeats(spans, [_signature(graph, s, quantize) for s in spans])
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

    spans = _recompute_shapes(graph, _isolate_unsupported(graph, spans))
    # every tensor read after a region ends (and not computed there) is "after" for that region
    regions = []
    readers_after = [set() for _ in spans]
    later = set(graph.output_names)
    for k in range(len(spans) - 1, -1, -1):
        readers_after[k] = set(later)
        made = {o for n in spans[k] for o in n.output}
        later.update(t for n in spans[k] for t in reads(n) if t and t not in made)
    for k, s in enumerate(spans):
        regions.append(_region(graph, k, s, quantize, readers_after[k]))
    return regions


def auto_mode(device: str, attention: bool = False, method_mode: Optional[str] = None, decoder: bool = False) -> str:
    """auto: what the method needs (GPTQ solves one op at a time: layer); else blocks where
    forward/backward passes are affordable (a GPU) or needed (attention: query and key weights act
    together through the softmax, so each layer is fitted as a whole); else single-op regions, whose
    exact Gram-form loss makes an iteration independent of the activation size (a CNN on the CPU).
    A decoder LM on the CPU gets single-op regions too: one pass of a whole SmolLM2 layer over 32 windows
    of 512 tokens costs seconds, so a block's hundreds of iterations per layer do not fit on a CPU."""
    if method_mode:
        return method_mode
    if decoder and device != "cuda":
        return "layer"
    return "block" if device == "cuda" or attention else "layer"


def random_feed(specs: dict) -> Optional[dict]:
    """One sample per input when every non-batch dimension is static (``inspect`` has no data)."""
    axes = batch_axes(specs)
    feed = {}
    for name, (dims, dtype) in specs.items():
        if dims is None:
            return None
        shape = [1 if k == axes[name] else (d if isinstance(d, int) else None) for k, d in enumerate(dims)]
        if any(d is None for d in shape):
            return None
        feed[name] = (np.zeros(shape, dtype) if np.issubdtype(dtype, np.integer)
                      else np.random.default_rng(0).standard_normal(shape).astype(dtype))
    return feed


class PartitionPass(Pass):
    """Graph -> regions (ctx.regions), in the mode the config, method, device and model call for."""

    name = "partition"

    def run(self, graph: Graph, ctx) -> Graph:
        cfg = ctx.config
        if ctx.calibration is not None:
            ctx.batching = probe_calibration(graph.model, ctx.calibration)
        else:
            specs = model_input_specs(graph.model)
            feed = random_feed(specs)
            ctx.batching = probe(graph.model, feed, None, batch_axes(specs)) if feed else Batching()
        ctx.tensor_sizes = sizes_per_sample(ctx.batching)
        mode = cfg.regions if cfg.regions != "auto" else auto_mode(ctx.device, ctx.traits.attention,
                                                                    ctx.method.region_mode, ctx.traits.decoder)
        ctx.region_mode = mode
        ctx.regions = partition(graph, mode, quantize=ctx.quantize_nodes, sizes=ctx.tensor_sizes or None)
        for r in ctx.regions:  # an FP32 region reads no quantized activations either
            if r.unsupported:
                ctx.quantize_nodes = ctx.quantize_nodes - {n.name for n in r.nodes}
        ctx.batching.settle({t for r in ctx.regions for t in r.inputs + r.outputs} | set(graph.output_names)
                            | {graph.node_by_name[w.node].output[0] for r in ctx.regions for w in r.weights})
        return graph
