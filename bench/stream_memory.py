"""Memory of the reconstruction streams (issue 11): peak RSS, time and accuracy with float16 vs float32
streams, and with 1024 calibration inputs held within --max-memory vs held all in RAM.

Calibration: ../shared/data/imagenet-sample/calib (256 images; 1024 inputs = each image plus 3
random-resized-crop views, --augment 3); evaluation: its 244 labelled val images. Each row is its own
`onnxflex quantize` process, so its time and peak RSS (from its report) are its own; "same bytes"
says whether a row wrote exactly the model of the row it is compared with.

    python bench/stream_memory.py [--model efficientnet_lite0] [--rows rtn-256-f16,...]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import fmt, machine, run_quantize, save_results  # noqa: E402
from bench.flexround_imagenet import imagenet_baseline, pp_flags  # noqa: E402
from models.build import IMAGE_MODELS, IMAGENET_SAMPLE  # noqa: E402
from onnxflex import QuantConfig  # noqa: E402
from onnxflex.runtime.cpu import describe_cpu  # noqa: E402
from onnxflex.runtime.evaluate import evaluate  # noqa: E402

# name -> (method, weight bits, calibration inputs, extra flags, the row whose output bytes it should equal)
ROWS = {
    "rtn-256-f32": ("rtn", 8, 256, ["--stream-precision", "float32"], None),
    "rtn-256-f16": ("rtn", 8, 256, [], None),
    "flexround-256-f32": ("flexround", 4, 256, ["--stream-precision", "float32"], None),
    "flexround-256-f16": ("flexround", 4, 256, [], None),
    "flexround-256-f32-seed1": ("flexround", 4, 256, ["--stream-precision", "float32", "--seed", "1"], None),
    "flexround-256-f16-seed1": ("flexround", 4, 256, ["--seed", "1"], None),
    "flexround-1024-f16-ram": ("flexround", 4, 1024, ["--max-memory", "64"], None),
    "flexround-1024-f16": ("flexround", 4, 1024, [], "flexround-1024-f16-ram"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0", choices=list(IMAGE_MODELS))
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench"))
    ap.add_argument("--tag", default="", help="suffix for the results file")
    args = ap.parse_args()
    fp32, val, pp, base = imagenet_baseline(args.model, args.work)
    work = Path(args.work)
    rows, digests = [], {}
    for name in args.rows.split(","):
        method, wb, inputs, extra, same_as = ROWS[name]
        out = work / f"{args.model}_mem_{name}.onnx"
        cmd = [fp32, "--calib", IMAGENET_SAMPLE / "calib", "-o", out, "--method", method, "--weight-bits", wb,
               "--act-bits", 8, "--preset", "fast", "--calib-size", 256, "--augment", inputs // 256 - 1,
               *pp_flags(args.model), *extra]
        ran = run_quantize(cmd, out.with_suffix(".report.json"), name)
        if ran is None:
            continue
        summary, wall = ran
        digests[name] = hashlib.sha256(out.read_bytes()).hexdigest()
        ev = evaluate(str(out), val, ref=str(fp32), preprocess=pp)
        passes = summary.get("pass_peak_rss_mb", {})
        rows.append(dict(row=name, method=method, bits=f"W{wb}A8", inputs=inputs, flags=" ".join(map(str, extra)),
                         top1=ev.top1 * 100, agree=ev.agreement * 100, sqnr=summary.get("calib_output_sqnr_db"),
                         seconds=wall, peak_mb=summary.get("peak_rss_mb"), calibrate_mb=passes.get("calibrate"),
                         same=None if same_as not in digests else digests[same_as] == digests[name],
                         sha=digests[name][:12]))
        print(rows[-1], flush=True)
    import onnxruntime

    head = (f"# Reconstruction stream memory: {args.model}, fast preset, 244 val images\n\n"
            f"FP32 top-1 {base.top1 * 100:.2f} %. onnxruntime {onnxruntime.__version__}, {machine()} "
            f"({describe_cpu()}). Peak RSS = the quantize process's max RSS (MiB, from its "
            "report); 1024 inputs = 256 images + 3 random-resized-crop views each (--augment 3); default "
            f"--max-memory {QuantConfig().max_memory:g} GiB.\n\n"
            f"    python bench/stream_memory.py --model {args.model} --rows {args.rows}"
            f"{' --tag ' + args.tag if args.tag else ''}\n\n")
    table = ["| row | method | bits | inputs | flags | top-1 % | agree % | SQNR dB | time s | peak RSS MiB "
             "| calibrate pass MiB | same bytes as the RAM row | sha256 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['row']} | {r['method']} | {r['bits']} | {r['inputs']} | {r['flags'] or '-'} "
                     f"| {r['top1']:.2f} | {r['agree']:.2f} | {fmt(r['sqnr'], '.2f')} | {r['seconds']:.0f} "
                     f"| {fmt(r['peak_mb'], '.0f')} | {fmt(r['calibrate_mb'], '.0f')} "
                     f"| {'-' if r['same'] is None else ('yes' if r['same'] else 'NO')} | {r['sha']} |")
    save_results(f"stream_memory_{args.model}{args.tag}", head, table, args, rows)


if __name__ == "__main__":
    main()
