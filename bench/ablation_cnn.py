"""Where the W4A8 points go on a real ImageNet CNN: one component of the default pipeline changed per row.

Every row is the shipped default (FlexRound W4A8, fast preset, seed 0) with the flags in its `change`
column; `base` is the default itself. Each row runs as its own `onnxflex quantize` process (its own time
and peak RSS), then is scored on the labelled val images against FP32 (top-1 and agreement).

Two steps, so the quantizing can run on a machine without the val images (a GPU machine), several rows
at once:
    python bench/ablation_cnn.py run --model efficientnet_lite0 --fp32 M.onnx --calib DIR --out RUNS [--device cuda --jobs 3]
    python bench/ablation_cnn.py table --model efficientnet_lite0 --runs RUNS [--tag cuda]
or both here: python bench/ablation_cnn.py all --model efficientnet_lite0 --rows base,w4a32,judge-off
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import fmt, machine, run_quantize, save_results  # noqa: E402

BASE = ["--method", "flexround", "--weight-bits", "4", "--act-bits", "8", "--preset", "fast", "--seed", "0"]
# row -> (flags changed against the default, what the row asks)
ROWS = {
    "base": ([], "the shipped default"),
    "w4a32": (["--act-bits", "0"], "weights only: what the activations cost"),
    "qdrop-off": (["--drop-prob", "0"], "no QDrop (quantized inputs always)"),
    "qdrop-off-seed1": (["--drop-prob", "0", "--seed", "1"], "no QDrop, seed 1"),
    "lsq-off": (["--act-lr", "0"], "activation steps kept as calibrated (no LSQ)"),
    "range-mse": (["--calib-method", "mse"], "activation ranges by MSE instead of percentile"),
    "range-minmax": (["--calib-method", "minmax"], "activation ranges by min/max"),
    "judge-off": (["--no-judge"], "learned weights kept even where RTN is better held out"),
    "gptq-cand-off": (["--no-gptq-candidate"], "the judge weighs RTN and FlexRound only (not GPTQ)"),
    "grid-search-off": (["--no-gptq-grid-search"], "GPTQ keeps each channel's initial (lp) grid instead of searching it"),
    "grid-search-off-seed1": (["--no-gptq-grid-search", "--seed", "1"], "no GPTQ grid search, seed 1"),
    "damp-0.1": (["--gptq-damp", "0.1"], "GPTQ damped at 0.1 of G's mean diagonal instead of 0.01"),
    "bias": (["--bias-correction"], "bias correction (each Conv's bias absorbs its rounding's mean output error)"),
    "bias-seed1": (["--bias-correction", "--seed", "1"], "bias correction, seed 1"),
    "gptq": (["--method", "gptq"], "GPTQ alone (closed form, no FlexRound)"),
    "gptq-calib1024": (["--method", "gptq", "--augment", "3"], "GPTQ alone on 1024 inputs (each image + 3 random-resized-crop views)"),
    "calib64": (["--calib-size", "64"], "64 calibration images (8 held out for the judge)"),
    "calib64-gptq-off": (["--calib-size", "64", "--no-gptq-candidate"], "64 images, the judge without GPTQ"),
    "gram-all": (["--gram-positions", "0"], "conv statistics read every output row (the default before 2026-11-29)"),
    "gram-half": (["--gram-positions", "350000"],
                  "conv statistics read half the default's positions (on 224 images: 56x56 maps every 2nd row)"),
    "guard-off": (["--no-row-guard"], "learn weights with too few calibration rows too"),
    "layer": (["--regions", "layer"], "one weighted op per region"),
    "block": (["--regions", "block"], "blocks (residual blocks) as regions"),
    "calib1024": (["--augment", "3"], "1024 inputs: each image plus 3 random-resized-crop views"),
    "iters1000": (["--iters", "1000"], "1000 iterations per region (default preset's budget)"),
    "default-preset": (["--preset", "default"], "the default preset (1000 iterations, S2 at 0.3x, 10 checks)"),
    "iters5000": (["--iters", "5000"], "5000 iterations per region"),
    "s2lr-0.3": (["--element-lr-scale", "0.3"], "S2 learns at 0.3x the rate of s1, s3, s4"),
    "s2lr-0.1": (["--element-lr-scale", "0.1"], "S2 learns at 0.1x the rate of s1, s3, s4"),
    "stop": (["--checks", "5"], "early stopping: 5 held-out checks per region, best kept"),
    "i1000-stop": (["--iters", "1000", "--checks", "10"], "1000 iterations, 10 held-out checks"),
    "i1000-s2lr-0.3": (["--iters", "1000", "--element-lr-scale", "0.3"], "1000 iterations, S2 at 0.3x rate"),
    "i1000-s2lr-0.3-stop": (["--iters", "1000", "--element-lr-scale", "0.3", "--checks", "10"],
                            "1000 iterations, S2 at 0.3x rate, 10 held-out checks"),
    "i1000-lsq-off": (["--iters", "1000", "--act-lr", "0"], "1000 iterations, no LSQ"),
    "i1000-qdrop-off": (["--iters", "1000", "--drop-prob", "0"], "1000 iterations, no QDrop"),
    "i1000-lr1e-3": (["--iters", "1000", "--lr", "1e-3"], "1000 iterations at lr 1e-3"),
    "seed1": (["--seed", "1"], "the default, seed 1 (run-to-run spread)"),
    "seed2": (["--seed", "2"], "the default, seed 2"),
    "mse-seed1": (["--calib-method", "mse", "--seed", "1"], "MSE ranges, seed 1"),
    "adaround": (["--method", "adaround"], "AdaRound instead of FlexRound"),
    "w3a8": (["--weight-bits", "3"], "FlexRound W3A8"),
    "rtn-w3a8": (["--method", "rtn", "--weight-bits", "3"], "RTN W3A8"),
    "adaround-w3a8": (["--method", "adaround", "--weight-bits", "3"], "AdaRound W3A8 (200 iterations)"),
    "adaround-10k": (["--method", "adaround", "--iters", "10000", "--no-gptq-candidate"],
                     "AdaRound W4A8 at its own schedule (10 000 iterations per region, lr 1e-3, beta 20 -> 2), judged against RTN only"),
    "adaround-10k-w3a8": (["--method", "adaround", "--iters", "10000", "--no-gptq-candidate", "--weight-bits", "3"],
                          "AdaRound W3A8 at its own schedule, judged against RTN only"),
    "adaround-10k-w2a8": (["--method", "adaround", "--iters", "10000", "--no-gptq-candidate", "--weight-bits", "2"],
                          "AdaRound W2A8 at its own schedule, judged against RTN only"),
    "w3a8-gptq": (["--method", "gptq", "--weight-bits", "3"], "GPTQ alone, W3A8"),
    "w3a8-default": (["--weight-bits", "3", "--preset", "default"], "FlexRound W3A8, default preset"),
    "w2a8": (["--weight-bits", "2"], "FlexRound W2A8"),
    "paper-preset": (["--preset", "paper"], "the paper preset (20000 iterations, S2 at 0.3x, 20 checks)"),
    "rtn": (["--method", "rtn"], "round-to-nearest"),
    "w8a8": (["--weight-bits", "8"], "FlexRound W8A8"),
    "rtn-w8a8": (["--method", "rtn", "--weight-bits", "8"], "RTN W8A8"),
    "rtn-w8a32": (["--method", "rtn", "--weight-bits", "8", "--act-bits", "0"], "RTN W8, FP32 activations: what int8 weights cost alone"),
    "rtn-w8a8-mse": (["--method", "rtn", "--weight-bits", "8", "--calib-method", "mse"], "RTN W8A8, activation ranges by MSE"),
    "rtn-w8a8-minmax": (["--method", "rtn", "--weight-bits", "8", "--calib-method", "minmax"],
                        "RTN W8A8, activation ranges by min/max"),
    "cle": (["--cle"], "cross-layer equalization first (exact: a ReLU6 channel moves only while its clip stays exact)"),
    "cle-w8a8": (["--cle", "--weight-bits", "8"], "FlexRound W8A8 after CLE"),
    "w8a8-tensor": (["--weight-bits", "8", "--granularity", "tensor"], "FlexRound W8A8, per-tensor weight scales"),
    "cle-w8a8-tensor": (["--cle", "--weight-bits", "8", "--granularity", "tensor"], "per-tensor W8A8 after CLE"),
    "rtn-w8a8-tensor": (["--method", "rtn", "--weight-bits", "8", "--granularity", "tensor"], "RTN W8A8 per-tensor"),
    "cle-rtn-w8a8-tensor": (["--cle", "--method", "rtn", "--weight-bits", "8", "--granularity", "tensor"],
                            "RTN W8A8 per-tensor after CLE"),
}
QUICK = "base,w4a32,qdrop-off,lsq-off,range-mse,judge-off,guard-off,layer,block,rtn"


def pp_flags(model: str) -> list:
    from bench.flexround_imagenet import pp_flags as flags

    return flags(model)


def run(args) -> None:
    """Quantize every row into RUNS (ROW.onnx + ROW.report.json); --jobs rows at a time."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    with open(out / "command.txt", "a") as f:  # what made these rows, for the table's header
        f.write("python bench/ablation_cnn.py " + " ".join(sys.argv[1:]) + "\n")
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    def one(row):
        model = out / f"{row}.onnx"
        flags = ROWS[row][0]
        base = [x for k, v in zip(BASE[::2], BASE[1::2]) if k not in flags for x in (k, v)]  # a row's flag wins
        cmd = [args.fp32, "--calib", args.calib, "-o", model, *base, *flags, "--device", args.device,
               *pp_flags(args.model)]
        ran = run_quantize(cmd, out / f"{row}.report.json", row)
        if ran is None and args.fallback and args.device != args.fallback:  # e.g. a CUDA failure: the row on the CPU
            cmd[cmd.index("--device") + 1] = args.fallback
            ran = run_quantize(cmd, out / f"{row}.report.json", f"{row} on {args.fallback}")
        if ran is not None:
            (out / f"{row}.wall.json").write_text(json.dumps(dict(wall=ran[1], jobs=args.jobs)))
            print(f"{row}: {ran[1]:.0f} s, peak RSS {ran[0]['peak_rss_mb']:.0f} MB", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, rows))


class CalibSplit:
    """Output SQNR against FP32 on the calibration images the fit saw (the first 224 of 256) and on the 32
    it held out. A gap between the two is what the fit learned about those images rather than the model:
    round-to-nearest shows none, the learned rows 2.5-3 dB on Lite0 (README, "Fitted vs held-out")."""

    def __init__(self, fp32, calib, pp, size=256):
        from onnxflex.calib.load import load_calibration
        from onnxflex.passes.reconstruct import held_out_count
        from onnxflex.runtime.session import input_specs, make_session

        sess = make_session(str(fp32), optimization="disable")
        self.name = sess.get_inputs()[0].name
        cal = load_calibration(calib, input_specs(sess), size=size, preprocess=pp)
        self.x = cal.joined(cal.samples)[self.name]
        self.n_fit = len(self.x) - held_out_count(len(self.x))
        self.ref = self.run(sess)

    def run(self, sess):
        return np.concatenate([sess.run(None, {self.name: self.x[i:i + 32]})[0] for i in range(0, len(self.x), 32)])

    def sqnr(self, model) -> tuple:
        from onnxflex.runtime.session import make_session

        out = self.run(make_session(str(model), optimization="disable"))

        def db(a, b):
            a, b = a.astype(np.float64), b.astype(np.float64)
            return float(10 * np.log10((a * a).sum() / max(((a - b) ** 2).sum(), 1e-30)))
        return db(self.ref[:self.n_fit], out[:self.n_fit]), db(self.ref[self.n_fit:], out[self.n_fit:])


def table(args) -> None:
    """Score every row in RUNS on the val images and write bench/results/ablation_cnn_MODEL[_TAG].md."""
    from bench.flexround_imagenet import imagenet_baseline
    from onnxflex.runtime.evaluate import evaluate

    fp32, val, pp, base = imagenet_baseline(args.model, args.work)
    from models.build import IMAGENET_SAMPLE

    split = CalibSplit(fp32, args.calib or str(IMAGENET_SAMPLE / "calib"), pp)
    runs = Path(args.runs)
    rows = []
    for row in ROWS:
        report = runs / f"{row}.report.json"
        if not report.exists():
            continue
        rep = json.loads(report.read_text())
        s, statuses = rep["summary"], [str(r.get("status", "")) for r in rep["regions"]]
        wall = json.loads((runs / f"{row}.wall.json").read_text()) if (runs / f"{row}.wall.json").exists() else {}
        ev = evaluate(str(runs / f"{row}.onnx"), val, ref=str(fp32), preprocess=pp)
        fit_db, held_db = split.sqnr(runs / f"{row}.onnx")
        rows.append(dict(row=row, change=" ".join(ROWS[row][0]) or "-", why=ROWS[row][1], top1=ev.top1 * 100,
                         agree=ev.agreement * 100, sqnr=ev.sqnr_db, fit_sqnr=fit_db, held_sqnr=held_db,
                         seconds=wall.get("wall", s["seconds"]),
                         jobs=wall.get("jobs", 1), peak_mb=s["peak_rss_mb"], gpu_mb=s.get("gpu_peak_mb"),
                         device=s["device"], regions=s["region_mode"], iters=s["iters"],
                         kept_rtn=sum(st.startswith(("kept rtn", "rtn:")) for st in statuses),
                         kept_gptq=sum(st.startswith("kept gptq") for st in statuses), cle=s.get("cle")))
        print(f"{row}: top-1 {ev.top1 * 100:.2f} agree {ev.agreement * 100:.1f}", flush=True)
    ref = next((r["top1"] for r in rows if r["row"] == "base"), None)
    cle = next((r["cle"] for r in rows if r.get("cle")), None)
    cle_line = "" if cle is None else (
        f"- `--cle` rows: {cle['pairs']} conv pairs ({cle['clip_pairs']} through ReLU6, rescaled only where the clip stays "
        f"exact on the calibration data); per-channel weight spread log10(max/median) {cle['spread_before']:.2f} -> "
        f"{cle['spread_after']:.2f}; equalized vs original FP32 output SQNR {fmt(cle['fp32_change_sqnr_db'], '.1f')} dB\n")
    cmds = runs / "command.txt"
    made_by = "; ".join(f"`{c}`" for c in cmds.read_text().splitlines()) if cmds.exists() else "-"
    head = (f"# Ablation: {args.model}, FlexRound W4A8 (fast preset, seed 0) one component at a time\n\n"
            f"- FP32 top-1 {base.top1 * 100:.2f} % on the 244 images of imagenet-sample/val (one image = 0.41 points); "
            f"calibration: the 256 images of imagenet-sample/calib\n"
            f"- quantized on: {rows[0]['device'] if rows else '-'} ({args.where}); scored here: {machine()}, ORT CPU, "
            f"optimisations off (Q/DQ as written)\n"
            f"- time: wall seconds of the row's own process, with `jobs` rows running at once on that machine\n"
            f"- Δ base: top-1 minus the `base` row; kept-RTN: regions whose learned weights lost to RTN held out, "
            f"or had too few rows to learn; kept-GPTQ: regions where GPTQ's rounding won held out\n"
            f"- out SQNR: on val; fit / held-out: on the first {split.n_fit} calibration images (which the fit saw) "
            f"and the last {len(split.x) - split.n_fit} (which every fit holds out)\n"
            f"{cle_line}"
            f"- made by: {made_by}\n"
            f"- table: `python bench/ablation_cnn.py {' '.join(sys.argv[1:])}`\n\n")
    lines = ["| row | change | what it asks | regions | iters | top-1 % | Δ FP32 | Δ base | agree % | out SQNR dB | "
             "fit / held-out SQNR dB | kept-RTN | kept-GPTQ | time s (jobs) | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | `{r['change']}` | {r['why']} | {r['regions']} | {r['iters']} | {r['top1']:.2f} | "
                     f"{r['top1'] - base.top1 * 100:+.2f} | {fmt(None if ref is None else r['top1'] - ref, '+.2f')} | "
                     f"{r['agree']:.1f} | {fmt(r['sqnr'], '.2f')} | {r['fit_sqnr']:.2f} / {r['held_sqnr']:.2f} | "
                     f"{r['kept_rtn']} | {r.get('kept_gptq', 0)} | "
                     f"{r['seconds']:.0f} ({r['jobs']}) | "
                     f"{r['peak_mb']:.0f} |")
    save_results(f"ablation_cnn_{args.model}{'_' + args.tag if args.tag else ''}", head, lines, args, rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["run", "table", "all"])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--rows", default=QUICK, help=f"comma-separated, from: {', '.join(ROWS)}")
    ap.add_argument("--fp32", default=None, help="run: the FP32 model (default: built under --work)")
    ap.add_argument("--calib", default=None, help="run: calibration images (default: imagenet-sample/calib)")
    ap.add_argument("--out", "--runs", dest="runs", default=None, help="folder of the rows' models and reports")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--jobs", type=int, default=1, help="rows quantized at once")
    ap.add_argument("--fallback", default=None, help="run: device for a row that failed on --device")
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench"))
    ap.add_argument("--where", default="this machine", help="table: where the rows were quantized, for the header")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    args.runs = args.runs or str(Path(args.work) / f"ablation_{args.model}{'_' + args.tag if args.tag else ''}")
    args.out = args.runs
    if args.cmd in ("run", "all"):
        if args.fp32 is None or args.calib is None:
            from bench.common import imagenet_model
            from models.build import IMAGENET_SAMPLE

            args.fp32 = args.fp32 or str(imagenet_model(args.model, args.work)[0])
            args.calib = args.calib or str(IMAGENET_SAMPLE / "calib")
        run(args)
    if args.cmd in ("table", "all"):
        table(args)


if __name__ == "__main__":
    main()
