"""``onnxflex inspect``: what would be quantized, and how the graph splits into regions."""
from __future__ import annotations

import numpy as np

from .graph import Graph


def _random_feed(specs: dict) -> dict | None:
    """One sample per input when every non-batch dimension is static (needed to size live sets)."""
    feed = {}
    for name, (dims, dtype) in specs.items():
        shape = [1] + [d if isinstance(d, int) else None for d in dims[1:]]
        if any(d is None for d in shape):
            return None
        feed[name] = (np.zeros(shape, dtype) if np.issubdtype(dtype, np.integer)
                      else np.random.default_rng(0).standard_normal(shape).astype(dtype))
    return feed


def inspect_model(model, regions: str = "auto") -> str:
    from .api import capture_shapes, model_input_specs
    from .passes.partition import partition, tensor_sizes
    from .passes.prepare import PreparePass, load_model

    fp = PreparePass().run(load_model(model))
    graph = Graph(fp)
    specs = graph.weighted_nodes()
    lines = [f"{len(specs)} quantizable ops (opset {graph.opset})", f"{'node':<48} {'op':<7} {'weight shape':<20} out_axis"]
    for s in specs:
        lines.append(f"{s.node[:48]:<48} {s.op_type:<7} {str(list(graph.initializers[s.weight].dims)):<20} {s.out_axis}")
    feed = _random_feed(model_input_specs(fp))
    sizes = tensor_sizes(capture_shapes(fp, feed)) if feed else None
    regs = partition(graph, "block" if regions == "auto" else regions, sizes=sizes)
    lines.append("")
    lines.append(f"{len(regs)} regions ({regions})")
    for r in regs:
        lines.append("  " + r.describe() + (f"  (FP32: no torch lifting for {', '.join(r.unsupported)})" if r.unsupported else ""))
    return "\n".join(lines)
