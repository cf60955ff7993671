"""Read the model's traits once (attention, activations vs side inputs, KV cache, static batch)."""
from __future__ import annotations

from ..graph import Graph
from ..traits import ModelTraits
from .base import Pass


class AnalyzePass(Pass):
    name = "analyze"

    def run(self, graph: Graph, ctx) -> Graph:
        ctx.traits = ModelTraits.of(graph)
        return graph
