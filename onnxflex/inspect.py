"""``onnxflex inspect``: what would be quantized, and how the graph splits into regions.

It runs the same passes as ``quantize`` up to the partition, so the regions shown are the regions a
run with the same --regions, --method and --device would reconstruct.
"""
from __future__ import annotations

from .config import QuantConfig


def inspect_model(model, regions: str = "auto", method: str = "flexround", device: str = "auto") -> str:
    from .api import resolve_device
    from .context import Context
    from .graph import Graph
    from .methods import get_method
    from .passes.analyze import AnalyzePass
    from .passes.base import Sequential
    from .passes.partition import PartitionPass
    from .passes.prepare import PreparePass, load_model
    from .passes.select import SelectPass
    from .targets import get_target

    cfg = QuantConfig(regions=regions, method=method, device=device).resolved()
    ctx = Context(cfg, get_target(cfg.target), get_method(cfg.method), device=resolve_device(cfg.device))
    graph = Sequential(PreparePass(), AnalyzePass(), SelectPass(), PartitionPass()).run(Graph(load_model(model)), ctx)
    specs = graph.weighted_nodes()
    lines = [f"{len(specs)} quantizable ops (opset {graph.opset})",
             f"{'node':<48} {'op':<7} {'weight shape':<20} out_axis"]
    for s in specs:
        lines.append(f"{s.node[:48]:<48} {s.op_type:<7} {str(list(graph.initializers[s.weight].dims)):<20} {s.out_axis}")
    lines.append("")
    lines.append(f"{len(ctx.regions)} regions ({regions} -> {ctx.region_mode}, method {method}, device {ctx.device})")
    for r in ctx.regions:
        lines.append("  " + r.describe() + (f"  (FP32: no torch lifting for {', '.join(r.unsupported)})" if r.unsupported else ""))
    return "\n".join(lines)
