"""The pass contract: every step of a run is a :class:`Pass` with ``run(graph, ctx) -> graph``.

:class:`Sequential` composes them (onnx-ir's passes are the model) and names the pass that failed:
a user's mistake (OnnxflexError) goes through unchanged, anything else is an internal error that
says which pass broke and where to report it, never a bare traceback.
"""
from __future__ import annotations

import logging
import time

from ..errors import InternalError, OnnxflexError
from ..graph import Graph
from ..runtime.memory import peak_rss_mb

log = logging.getLogger("onnxflex")
REPORT_URL = "the onnxflex issue tracker"


class Pass:
    """One step of the pipeline: reads and writes the shared Context, returns the (new) graph."""

    name = "pass"

    def run(self, graph: Graph, ctx) -> Graph:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Sequential(Pass):
    """Run passes in order; record each pass's wall time in ``ctx.pass_seconds`` and the run's peak RSS
    when it ended in ``ctx.pass_peak_rss_mb`` (the first pass that reaches the final peak set it)."""

    name = "sequential"

    def __init__(self, *passes: Pass):
        self.passes = list(passes)

    def run(self, graph: Graph, ctx) -> Graph:
        for p in self.passes:
            t0 = time.perf_counter()
            try:
                graph = p.run(graph, ctx)
            except (OnnxflexError, KeyboardInterrupt, InternalError):
                raise
            except MemoryError:
                raise OnnxflexError(f"out of memory in the {p.name} pass; lower --calib-size or --batch-size, "
                                    "or set --max-memory to spill calibration tensors to disk") from None
            except Exception as e:  # noqa: BLE001 - a bug: name the pass, keep the cause chained
                log.debug("pass %s failed", p.name, exc_info=True)
                raise InternalError(f"internal error in the {p.name} pass: {type(e).__name__}: {e} "
                                    f"(please report it on {REPORT_URL} with the model's op list "
                                    "from `onnxflex inspect`)") from e
            ctx.pass_seconds[p.name] = round(time.perf_counter() - t0, 3)
            ctx.pass_peak_rss_mb[p.name] = peak_rss_mb()
        return graph
