"""FlexRound vs AdaRound vs round-to-nearest on a real ImageNet CNN, through the `onnxflex` CLI.

Calibration: ../shared/data/imagenet-sample/calib (256 images); evaluation: .../val (244 labelled
images). Each quantization runs as its own `onnxflex quantize` process so wall time and peak memory
(the process's max RSS, from its report) belong to that row alone.

    python bench/flexround_imagenet.py --model efficientnet_lite0 --rows rtn:w4a8,flexround:w4a8 --preset fast
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import fmt, imagenet_model, machine, parse_row, run_quantize, save_results  # noqa: E402
from models.build import IMAGE_MODELS, IMAGENET_SAMPLE, MODELS  # noqa: E402
from onnxflex.calib import make_preprocess  # noqa: E402
from onnxflex.runtime.evaluate import evaluate  # noqa: E402

DEFAULT_ROWS = ("rtn:w8a8,adaround:w8a8,flexround:w8a8,rtn:w4a8,adaround:w4a8,flexround:w4a8,"
                "rtn:w3a8,flexround:w3a8,rtn:w4a16,flexround:w4a16")


def preprocess_for(name: str):
    pp = MODELS[name][1]
    return make_preprocess(None, size=pp["size"], resize=pp["resize"], mean=pp["mean"], std=pp["std"],
                           interpolation=pp["interpolation"])


def imagenet_baseline(model: str, work: str):
    """(FP32 model path, val folder, its preprocessing, the FP32 evaluation) for an ImageNet bench."""
    fp32, val = imagenet_model(model, work)
    pp = preprocess_for(model)
    return fp32, val, pp, evaluate(str(fp32), val, preprocess=pp)


def pp_flags(name: str) -> list:
    pp = MODELS[name][1]
    flags = ["--size", str(pp["size"]), "--resize", str(pp["resize"]),
             "--mean", ",".join(f"{v:.6f}" for v in pp["mean"]), "--std", ",".join(f"{v:.6f}" for v in pp["std"])]
    return (["--preprocess", "tf"] if pp["interpolation"] == "bicubic" else ["--preprocess", "torch"]) + flags


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0", choices=list(IMAGE_MODELS))
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="method:wXaY, comma-separated")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--regions", default="auto")
    ap.add_argument("--granularity", default="channel")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench"))
    ap.add_argument("--tag", default="", help="suffix for the results file")
    args = ap.parse_args()
    fp32, val, pp, base = imagenet_baseline(args.model, args.work)
    work = Path(args.work)
    rows = [dict(method="fp32", bits="W32A32", top1=base.top1 * 100, agree=100.0, seconds=None, peak_mb=None,
                 iters=None, sqnr=None)]
    print(f"fp32 top-1 {base.top1 * 100:.2f}", flush=True)
    for spec in args.rows.split(","):
        method, wb, ab = parse_row(spec.strip())
        out = work / f"{args.model}_{method}_w{wb}a{ab}_{args.preset}{args.tag}.onnx"
        report = out.with_suffix(".report.json")
        cmd = [fp32, "--calib", IMAGENET_SAMPLE / "calib", "-o", out, "--method", method, "--weight-bits", wb,
               "--act-bits", ab, "--preset", args.preset, "--regions", args.regions, "--granularity", args.granularity,
               "--calib-size", args.calib_size, "--device", args.device, *pp_flags(args.model)]
        if args.iters is not None:
            cmd += ["--iters", args.iters]
        ran = run_quantize(cmd, report, spec)
        if ran is None:
            continue
        summary, wall = ran
        ev = evaluate(str(out), val, ref=str(fp32), preprocess=pp)
        rows.append(dict(method=method, bits=f"W{wb}A{ab}", top1=ev.top1 * 100, agree=ev.agreement * 100,
                         seconds=wall, peak_mb=summary["peak_rss_mb"], iters=summary["iters"], sqnr=ev.sqnr_db))
        print(f"{spec}: top-1 {ev.top1 * 100:.2f} agree {ev.agreement * 100:.1f} ({wall:.0f} s)", flush=True)

    cmdline = "python bench/flexround_imagenet.py " + " ".join(sys.argv[1:])
    head = (f"# {args.model}: FlexRound / AdaRound / RTN (onnxflex)\n\n"
            f"- calibration: {args.calib_size} images of imagenet-sample/calib; evaluation: 244 images of imagenet-sample/val\n"
            f"- weights per-{args.granularity}, symmetric; first and last weighted op 8-bit; activations int8 per-tensor (A16: int16)\n"
            f"- preset {args.preset}, regions {args.regions}, iterations per region as listed; device {args.device}\n"
            f"- machine: {machine()}; "
            f"ORT CPU provider with graph optimisations off (Q/DQ as written)\n"
            f"- reproduce: `{cmdline}`\n\n")
    table = ["| method | bits | iters | top-1 % | Δ vs FP32 | agree % | out SQNR dB | quant time s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['method']} | {r['bits']} | {fmt(r['iters'], 'd')} | {r['top1']:.2f} | "
                     f"{r['top1'] - rows[0]['top1']:+.2f} | {r['agree']:.1f} | {fmt(r['sqnr'], '.1f')} | "
                     f"{fmt(r['seconds'], '.0f')} | {fmt(r['peak_mb'], '.0f')} |")
    save_results(f"flexround_imagenet_{args.model}_{args.preset}_{args.regions}{args.tag}", head, table, args, rows)


if __name__ == "__main__":
    main()
