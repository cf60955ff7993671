"""Is a rewritten FP32 model still the same function? The prepare steps that rescale weights (--cle,
--awq) promise it; this measures it on calibration samples before the rewrite replaces the reference."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx

MIN_SQNR_DB = 60.0  # rewritten vs original outputs: below this the change is more than float rounding


def calibration_feeds(calibration, samples: int, batch: int):
    """Feed dicts of the first ``samples`` calibration samples (whole batches of a fixed-batch model)."""
    fixed = calibration.static_batch
    n = min(len(calibration.samples), samples if not fixed else max(fixed, samples // fixed * fixed))
    return dataclasses.replace(calibration, samples=calibration.samples[:n]).batches(fixed or batch)


def model_outputs(model: onnx.ModelProto, calibration, samples: int, batch: int = 8) -> list:
    """Every output of ``model`` on the first calibration samples (onnxruntime, no optimisation); the
    session is gone when this returns, so a large model is held once more only while it runs."""
    from ..runtime.session import make_session

    sess = make_session(model, optimization="disable", arena=False)
    outs = []
    for feed in calibration_feeds(calibration, samples, batch):
        outs += sess.run(None, feed)
    return outs


def outputs_change_db(ref: list, got: list) -> float:
    """Output SQNR (dB) of ``got`` against ``ref`` (lists of arrays) over every float output; -inf when an
    integer output or the set of non-finite values differs."""
    from ..runtime.metrics import sqnr_db

    want, have = [], []
    for r, g in zip(ref, got):
        if r.dtype.kind != "f":
            if not np.array_equal(r, g):
                return float("-inf")
            continue
        fin = np.isfinite(r)
        if not np.array_equal(fin, np.isfinite(g)):  # a NaN/inf the original does not have, or loses
            return float("-inf")
        want.append(r[fin].ravel())
        have.append(g[fin].ravel())
    return sqnr_db(np.concatenate(want), np.concatenate(have)) if want else float("inf")


def function_change_db(before: onnx.ModelProto, after: onnx.ModelProto, calibration, samples: int,
                       batch: int = 8) -> float:
    """Output SQNR (dB) of ``after`` against ``before`` on the first calibration samples."""
    return outputs_change_db(model_outputs(before, calibration, samples, batch),
                             model_outputs(after, calibration, samples, batch))


def with_initializers(model: onnx.ModelProto, arrays: dict) -> onnx.ModelProto:
    """A copy of ``model`` with these initializers replaced ({name: numpy array}, same dtype as before)."""
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for name, arr in arrays.items():
        dtype = helper.tensor_dtype_to_np_dtype(inits[name].data_type)
        inits[name].CopyFrom(numpy_helper.from_array(np.asarray(arr).astype(dtype), name))
    return out
