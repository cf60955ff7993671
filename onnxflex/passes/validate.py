"""Load the written QDQ model in ONNX Runtime, run it on calibration data, and measure it against FP32.

A model that does not load or run here is an onnxflex bug, never the user's: nothing is written.
"""
from __future__ import annotations

import numpy as np

from ..errors import InternalError, OnnxflexError
from ..graph import Graph
from ..reconstruction.streams import samples_within
from .base import Pass

VALIDATION_SAMPLES = 64
BATCH_BYTES = 256 << 20  # output bytes per validation batch


class _Energy:
    """Running sums for an SQNR over many batches: sum(ref^2) and sum((ref - test)^2)."""

    def __init__(self):
        self.signal = self.noise = 0.0

    def add(self, ref: np.ndarray, test: np.ndarray) -> None:
        r = np.asarray(ref, np.float64)
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum((r - np.asarray(test, np.float64)) ** 2))

    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return float("inf")
        return round(10.0 * float(np.log10(self.signal / self.noise)) if self.signal else float("-inf"), 2)


def _stream_piece(sim, layout, start: int, stop: int):
    """Samples [start, stop) of the simulated (torch) output stream, flattened like a stacked join; None
    when the stream does not hold them."""
    if sim is None or layout is None:
        return None
    if layout.stacked:
        units = sim[start // layout.unit: stop // layout.unit]
        return np.concatenate([np.asarray(x).reshape(-1) for x in units]) if len(units) else None
    if layout.count(sim) < stop:
        return None
    return layout.slice(sim, start, stop)


class ValidatePass(Pass):
    name = "validate"

    def run(self, graph: Graph, ctx) -> Graph:
        from ..runtime.session import make_session

        try:
            sess = make_session(ctx.qdq_model, optimization="disable", arena=False)
        except OnnxflexError as e:
            raise InternalError(f"internal error: the written QDQ model does not load in ONNX Runtime: {e}") from None
        # the first float output is the one measured (a text model may echo its integer ids first)
        outs = [o.name for o in sess.get_outputs() if o.type == "tensor(float)"] or [sess.get_outputs()[0].name]
        fp_sess = None  # only when the reconstruction's FP32 stream (ORT's own outputs) does not hold a batch
        unit = (ctx.batching.locked_unit if ctx.batching else None) or 1
        # the same cap the reconstruction used for outputs nothing else reads (a decoder's logits), fed a
        # few samples at a time: the errors are sums, so no batch of outputs is kept
        want = samples_within(graph, ctx.tensor_sizes, outs[:1], min(ctx.calibration.num_samples, VALIDATION_SAMPLES), unit)
        batch = min(32, want, samples_within(graph, ctx.tensor_sizes, outs[:1], want, unit, BATCH_BYTES))
        while want % batch:  # whole batches, so the comparison with the torch stream ends where it does
            batch -= 1
        layout = ctx.batching.layout(outs[0]) if ctx.batching else None
        ref, sim = ctx.final_outputs.get(outs[0], (None, None)) if layout is not None else (None, None)
        quant, torch_err, seen = _Energy(), _Energy(), 0
        for feed in ctx.calibration.batches(ctx.batching.batch(batch) if ctx.batching else batch):
            if seen >= want:
                break
            size = ctx.calibration.feed_size(feed)
            qdq = sess.run(outs[:1], feed)[0]
            fp = _stream_piece(ref, layout, seen, seen + size)
            if fp is not None and fp.size == qdq.size:
                fp = np.asarray(fp).reshape(qdq.shape)
            else:  # a second copy of the weights in a session: only when the stream lacks the batch
                fp_sess = fp_sess or make_session(ctx.fp_model, arena=False)
                fp = fp_sess.run(outs[:1], feed)[0]
            if qdq.shape != fp.shape:
                # a data-dependent output (a decoded sequence that stops elsewhere): no element-wise error
                ctx.summary["calib_output_sqnr_db"] = "n/a: output length changed"
                return graph
            quant.add(fp, qdq)
            piece = _stream_piece(sim, layout, seen, seen + size)
            if piece is not None and piece.size == qdq.size:
                torch_err.add(qdq.reshape(-1), piece.reshape(-1))
            else:
                sim = None
            seen += size
        ctx.summary["calib_output_sqnr_db"] = quant.sqnr_db()
        if sim is not None and torch_err.signal:
            ctx.summary["torch_vs_ort_sqnr_db"] = torch_err.sqnr_db()
        return graph
