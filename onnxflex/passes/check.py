"""The deployment target's static rule check on the written QDQ model (TensorRT / ORT-CPU rules)."""
from __future__ import annotations

import logging

from ..graph import Graph
from .base import Pass

log = logging.getLogger("onnxflex")


class CheckPass(Pass):
    name = "check"

    def run(self, graph: Graph, ctx) -> Graph:
        ctx.violations = ctx.target.check(ctx.qdq_model)
        for v in ctx.violations:
            log.warning("%s rule %s at %s: %s", ctx.target.name, v.rule, v.node, v.message)
        ctx.summary["rule_violations"] = sum(v.severity == "error" for v in ctx.violations)
        ctx.summary["rule_warnings"] = sum(v.severity != "error" for v in ctx.violations)
        return graph
