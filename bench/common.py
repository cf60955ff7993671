"""What the benchmark scripts share: row specs, one `onnxflex quantize` process per row, and the
results files (a markdown table that says what was measured and how, plus the raw rows as JSON)."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def parse_row(row: str):
    """"flexround:w4a8" -> ("flexround", 4, 8)."""
    method, bits = row.strip().split(":")
    w, a = bits.lower().lstrip("w").split("a")
    return method, int(w), int(a)


def run_quantize(args: list, report: Path, label: str):
    """Run `onnxflex quantize ARGS --report REPORT -q` as its own process, so its wall time and peak
    memory are its own. Returns (summary from the report, wall seconds), or None when it failed."""
    cmd = [sys.executable, "-m", "onnxflex.cli", "quantize", *map(str, args), "--report", str(report), "-q"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"{label}: FAILED\n{proc.stderr[-3000:]}", flush=True)
        return None
    return json.loads(report.read_text())["summary"], wall


def machine() -> str:
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"{platform.machine()}, {cores} cores"


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def save_results(name: str, head: str, table: list, args, rows: list) -> None:
    """Print the table and write bench/results/NAME.md (+ NAME.json with the rows)."""
    text = head + "\n".join(table) + "\n"
    print("\n" + text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=2))


def ort_quantize_static(fp32: str, out: str, calibration, **options) -> float:
    """onnxruntime.quantization.quantize_static (QDQ, per-channel) on a CalibrationSet, one sample
    per reader step; ``options`` go to quantize_static. Returns the seconds it took."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calibration.batches(1))

        def get_next(self):
            return next(self.it, None)

    t0 = time.perf_counter()
    quantize_static(fp32, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, **options)
    return time.perf_counter() - t0


def imagenet_model(model: str, work: str) -> tuple[Path, str]:
    """(the FP32 ONNX file of MODEL under WORK, built on first use; the ImageNet val folder). Exits with a
    clear message when the ImageNet sample (../shared beside the repo) is missing."""
    from models.build import IMAGENET_SAMPLE, MODELS

    if not (IMAGENET_SAMPLE / "val" / "labels.csv").exists():
        sys.exit(f"needs the ImageNet sample at {IMAGENET_SAMPLE} (../shared beside the repo)")
    Path(work).mkdir(parents=True, exist_ok=True)
    fp32 = Path(work) / f"{model}.onnx"
    if not fp32.exists():
        MODELS[model][0](str(fp32))
    return fp32, str(IMAGENET_SAMPLE / "val")
