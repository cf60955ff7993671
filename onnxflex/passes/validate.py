"""Load the written QDQ model in ONNX Runtime, run it on calibration data, and measure it against FP32.

A model that does not load or run here is an onnxflex bug, never the user's: nothing is written.
"""
from __future__ import annotations

import numpy as np

from ..errors import InternalError, OnnxflexError
from ..graph import Graph
from .base import Pass

VALIDATION_SAMPLES = 64


class ValidatePass(Pass):
    name = "validate"

    def run(self, graph: Graph, ctx) -> Graph:
        from ..runtime.metrics import sqnr_db
        from ..runtime.session import make_session

        try:
            sess = make_session(ctx.qdq_model, optimization="disable")
        except OnnxflexError as e:
            raise InternalError(f"internal error: the written QDQ model does not load in ONNX Runtime: {e}") from None
        # the first float output is the one measured (a text model may echo its integer ids first)
        outs = [o.name for o in sess.get_outputs() if o.type == "tensor(float)"] or [sess.get_outputs()[0].name]
        fp_sess = make_session(ctx.fp_model)
        qdq_vals, fp_vals, seen = [], [], 0
        want = min(ctx.calibration.num_samples, VALIDATION_SAMPLES)
        for feed in ctx.calibration.batches(ctx.batching.batch(32) if ctx.batching else 32):
            if seen >= want:
                break
            qdq_vals.append(sess.run(outs[:1], feed)[0])
            fp_vals.append(fp_sess.run(outs[:1], feed)[0])
            seen += ctx.calibration.feed_size(feed)
        if any(q.shape != f.shape for q, f in zip(qdq_vals, fp_vals)):
            # a data-dependent output (a decoded sequence that stops elsewhere): no element-wise error
            ctx.summary["calib_output_sqnr_db"] = "n/a: output length changed"
            return graph
        layout = ctx.batching.layout(outs[0]) if ctx.batching else None
        join = layout.join if layout is not None and not layout.stacked else (lambda v: np.concatenate([x.reshape(-1) for x in v]))
        qdq, fp = join(qdq_vals), join(fp_vals)
        ctx.summary["calib_output_sqnr_db"] = round(float(sqnr_db(fp, qdq)), 2)
        if outs[0] in ctx.final_outputs and layout is not None:
            sim = ctx.final_outputs[outs[0]][1]
            sim = np.concatenate([x.reshape(-1) for x in sim[: seen // layout.unit]]) if layout.stacked else layout.slice(sim, 0, seen)
            if sim.shape == qdq.shape:
                ctx.summary["torch_vs_ort_sqnr_db"] = round(float(sqnr_db(qdq, sim)), 2)
        return graph
