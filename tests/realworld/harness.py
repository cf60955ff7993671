"""Run ``onnxflex quantize`` on one corpus model as a user would (a subprocess on .npz calibration files)
and say what happened: quantized (with output SQNR and cosine vs FP32 on held-out inputs), refused
cleanly (exit 2, one ``error:`` line), an internal error (exit 1, one line), a traceback, a crash or a
timeout. Issue 10: every real ONNX file is quantized or refused in one line, never a traceback.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxflex.runtime.cpu import int8_kernels_saturate

from .corpus import fetch
from .feeds import make_feeds

CALIB_SAMPLES, HELD_SAMPLES = 8, 4
TIMEOUT = 900


@dataclass
class Result:
    id: str
    outcome: str                    # quantized | refused | internal error | traceback | crash | timeout | broken output
    message: str = ""               # the error line, or the last lines of a traceback
    seconds: float = 0.0
    sqnr_db: float | None = None    # worst float output, held-out inputs
    cosine: float | None = None     # worst float output
    per_output: dict = field(default_factory=dict)   # name -> (sqnr dB, cosine)
    summary: dict = field(default_factory=dict)      # the run report's summary (regions, weights quantized...)
    fp32_regions: int = 0           # regions the report kept in FP32
    stderr: str = ""


class RecipeError(RuntimeError):
    """The FP32 model does not run on the recipe's feeds: a corpus bug, not an onnxflex one."""


def session(path, quantized: bool = False):
    """Default optimisation level (what a user gets), except for a quantized model on a CPU whose int8
    kernels saturate: there the floors are checked on the QDQ arithmetic (optimisations off)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if quantized and int8_kernels_saturate():  # ppocr-mobile-cls 21.7 dB as QDQ, 11.4 dB fused (AVX2 EPYC)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_outputs(path, feeds: list[dict], quantized: bool = False) -> dict[str, list[np.ndarray]]:
    """Float outputs of ``path``, one array per feed (a Loop's output length may differ between feeds)."""
    s = session(path, quantized)
    names = [o.name for o in s.get_outputs() if o.type in ("tensor(float)", "tensor(float16)", "tensor(double)")]
    runs = [s.run(names, f) for f in feeds]
    return {n: [np.asarray(r[i], np.float64) for r in runs] for i, n in enumerate(names)}


def fidelity(ref: dict, got: dict) -> dict[str, tuple[float, float]]:
    """name -> (SQNR dB, cosine) of each float output vs FP32 over all held-out feeds; NaN when a shape
    differs (e.g. a decoder loop stopped at another step) or a value is not finite."""
    out = {}
    for name, rs in ref.items():
        gs = got[name]
        if any(r.shape != g.shape for r, g in zip(rs, gs)) or not all(np.all(np.isfinite(g)) for g in gs):
            out[name] = (float("nan"), float("nan"))
            continue
        r, g = np.concatenate([x.ravel() for x in rs]), np.concatenate([x.ravel() for x in gs])
        noise, sig = float(np.sum((r - g) ** 2)), float(np.sum(r ** 2))
        sqnr = math.inf if noise == 0 else (10 * math.log10(sig / noise) if sig > 0 else -math.inf)
        den = float(np.linalg.norm(r) * np.linalg.norm(g))
        out[name] = (sqnr, float(r @ g / den) if den > 0 else float(noise == 0))
    return out


def write_feeds(feeds: list[dict], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, f in enumerate(feeds):
        paths.append(folder / f"{i:03d}.npz")
        np.savez(paths[-1], **f)
    return paths


def prepare(entry, workdir: Path):
    """(model path, calibration .npz paths, held-out feeds, FP32 held-out outputs)."""
    model = fetch(entry)
    calib = make_feeds(entry, model, "calib", CALIB_SAMPLES)
    held = make_feeds(entry, model, "held", HELD_SAMPLES)
    try:
        ref = run_outputs(model, held)
    except Exception as e:
        raise RecipeError(f"{entry.id}: the FP32 model does not run on the recipe's inputs: {e}") from e
    return model, write_feeds(calib, Path(workdir) / "calib"), held, ref


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def traceback_tail(text: str, frames: int = 2, first: bool = False) -> str:
    """The last ``frames`` 'File ..., line N' lines and the exception line of the last (or first) traceback."""
    blocks = text.split("Traceback (most recent call last):")[1:]
    if not blocks:
        return last_line(text)
    lines = (blocks[0] if first else blocks[-1]).splitlines()
    files = [i for i, ln in enumerate(lines) if ln.lstrip().startswith("File ")]
    exc = next((ln.strip() for ln in lines[files[-1] + 1:] if ln.strip() and not ln.startswith(" ")), "") if files else ""
    where = [re.sub(r'File "[^"]*?/((onnxflex|onnxruntime|onnx|torch)/[^"]*)"', r'File "\1"', lines[i].strip()) for i in files[-frames:]]
    return " | ".join(where + [exc or last_line(text)])


def one_line(e: BaseException) -> str:
    """An exception as one short line, without onnxruntime's status prefix and file path."""
    msg = re.sub(r"Load model from \S+ failed:", "", " ".join(str(e).split()))
    msg = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", msg).strip()
    return f"{type(e).__name__}: {msg}"[:240]


def internal_line(text: str) -> str:
    """The one line an InternalError prints (its message may run over a few lines; they are joined)."""
    at = text.find("internal error")
    return " ".join(text[at:].split()) if at >= 0 else ""


def classify(rc: int | None, stderr: str, out_exists: bool) -> str:
    if rc is None:
        return "timeout"
    if rc == 0 and out_exists:
        return "quantized"
    if "Traceback" in stderr:
        return "traceback"
    if rc == 2 and last_line(stderr).startswith("error:"):
        return "refused"
    if rc == 1 and internal_line(stderr):
        return "internal error"
    return "crash"


def quantize_cmd(model, calib: list[Path], out: Path, method: str, extra_args=(), verbose=False) -> list[str]:
    cmd = [sys.executable, "-m", "onnxflex.cli", *(["-v"] if verbose else []), "quantize", str(model)]
    for p in calib:
        cmd += ["--calib", str(p)]
    return cmd + ["-o", str(out), "--method", method, "--weight-bits", "8", "--act-bits", "8",
                  "--calib-size", str(len(calib)), "-q", *map(str, extra_args)]


def run_one(entry, workdir, method: str = "rtn", extra_args=(), timeout: float = TIMEOUT) -> Result:
    """Quantize one corpus entry in a subprocess and classify the outcome (see the module docstring)."""
    workdir = Path(workdir)
    model, calib, held, ref = prepare(entry, workdir)
    out = workdir / f"{entry.id}.{method}.onnx"
    cmd = quantize_cmd(model, calib, out, method, extra_args)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    try:  # cwd: not the repo root, so the onnxflex that runs is the installed one (or PYTHONPATH's)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=workdir, env=env)
        rc, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        err = e.stderr or ""
        rc, stderr = None, err.decode(errors="replace") if isinstance(err, bytes) else err
    res = Result(entry.id, classify(rc, stderr, out.exists()), seconds=round(time.perf_counter() - t0, 1), stderr=stderr)
    if res.outcome == "quantized":
        try:
            res.per_output = fidelity(ref, run_outputs(out, held, quantized=True))
        except Exception as e:  # noqa: BLE001 - onnxflex validated the file, yet it does not run on other inputs
            res.outcome, res.message = "broken output", one_line(e)
            return res
        res.sqnr_db = min(v[0] for v in res.per_output.values()) if res.per_output else None
        res.cosine = min(v[1] for v in res.per_output.values()) if res.per_output else None
        report = out.with_suffix(".report.json")
        if report.exists():
            data = json.loads(report.read_text())
            res.summary = data.get("summary", {})
            res.fp32_regions = sum(str(r.get("status", "")).startswith("fp32") for r in data.get("regions", []))
    elif res.outcome == "traceback":
        res.message = traceback_tail(stderr)
    elif res.outcome == "internal error":  # the one line hides the cause: rerun with -v for the traceback
        res.message = internal_line(stderr)
        try:
            v = subprocess.run(quantize_cmd(model, calib, out, method, extra_args, verbose=True), capture_output=True,
                               text=True, timeout=timeout, cwd=workdir, env=env)
            if "Traceback" in v.stderr:
                res.message += "  <- " + traceback_tail(v.stderr, 3, first=True)
        except subprocess.TimeoutExpired:
            pass
    else:
        res.message = last_line(stderr) or (f"exit {rc}" if rc is not None else f"no result in {timeout:.0f} s")
    return res


class _Calibration:
    """The few CalibrationSet methods bench.common.ort_quantize_static reads."""

    def __init__(self, feeds):
        self.feeds = feeds

    def batches(self, n):
        assert n == 1
        return iter(self.feeds)


def ort_quantize_static(entry, workdir, act: str = "S8S8"):
    """onnxruntime.quantization.quantize_static (QDQ, per-channel int8 weights, S8S8 or U8S8) on the same
    calibration feeds, via bench/common.py's helper -> worst-output SQNR (dB) on the held-out inputs, or
    the one-line message of whatever ORT raised."""
    from onnxruntime.quantization import QuantType

    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench.common import ort_quantize_static as ort_qs

    workdir = Path(workdir)
    model, calib, held, ref = prepare(entry, workdir)
    feeds = [dict(np.load(p)) for p in calib]
    out = workdir / f"{entry.id}.ort_{act}.onnx"
    try:
        ort_qs(str(model), str(out), _Calibration(feeds), weight_type=QuantType.QInt8,
               activation_type=QuantType.QUInt8 if act == "U8S8" else QuantType.QInt8)
        fid = fidelity(ref, run_outputs(out, held, quantized=True))
    except Exception as e:  # noqa: BLE001 - report ORT's own failure as one line
        return one_line(e)
    return min(v[0] for v in fid.values()) if fid else None
