"""GPU vs CPU reconstruction: wall time per region and in total, GPU memory peak, and whether the
CUDA-run model is as accurate as the CPU-run one (same seed and settings).

Two steps, because the GPU machine has no ImageNet val set and the CPU machine has no GPU:
    python bench/gpu.py run --model M.onnx --calib DIR --device cuda --out DIR [--preset fast] [--regions layer]
    python bench/gpu.py table --runs DIR_A DIR_B ... --ref M.onnx --val VAL_DIR
`run` quantizes with the onnxflex CLI and keeps the model and report; `table` evaluates each model on
the labelled images and prints/saves the comparison under bench/results/.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for bits in args.bits.split(","):
        name = f"w{bits}a8_{args.preset}_{args.regions}_{args.device}"
        cmd = [sys.executable, "-m", "onnxflex.cli", "quantize", args.model, "--calib", args.calib,
               "-o", str(out / f"{name}.onnx"), "--method", "flexround", "--weight-bits", bits,
               "--preset", args.preset, "--regions", args.regions, "--device", args.device,
               "--preprocess", "tf", "--seed", "0", "--report", str(out / f"{name}.report.json"), "-q"]
        subprocess.run(cmd, check=True)
        print(f"{name}: {json.loads((out / f'{name}.report.json').read_text())['summary']}", flush=True)


def table(args):
    from onnxflex.calib import make_preprocess
    from onnxflex.runtime.evaluate import evaluate

    pp = make_preprocess("tf", size=224)
    rows = []
    for d in args.runs:
        for rep in sorted(Path(d).glob("*.report.json")):
            r = json.loads(rep.read_text())
            model = rep.with_name(rep.name.replace(".report.json", ".onnx"))
            ev = evaluate(str(model), args.val, ref=args.ref, preprocess=pp)
            s = r["summary"]
            rows.append(dict(name=model.stem, device=s["device"], preset=s["preset"], regions=s["region_mode"],
                             bits=f"W{s['weight_bits']}A{s['act_bits']}", seconds=s["seconds"],
                             region_seconds=round(sum(x["seconds"] for x in r["regions"]), 1),
                             slowest=max(r["regions"], key=lambda x: x["seconds"])["name"],
                             slowest_s=round(max(x["seconds"] for x in r["regions"]), 1),
                             gpu_peak_mb=s.get("gpu_peak_mb"), rss_mb=s["peak_rss_mb"],
                             top1=round(ev.top1 * 100, 2), agree=round(ev.agreement * 100, 1)))
    lines = ["| run | device | preset | regions | bits | total s | regions s | slowest region (s) | GPU peak MB | RSS MB "
             "| top-1 % | agree % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['device']} | {r['preset']} | {r['regions']} | {r['bits']} | {r['seconds']} | "
                     f"{r['region_seconds']} | {r['slowest']} ({r['slowest_s']}) | {r['gpu_peak_mb'] or '-'} | "
                     f"{r['rss_mb']} | {r['top1']} | {r['agree']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    res = ROOT / "bench" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / f"gpu_{args.tag}.md").write_text(
        f"# CUDA vs CPU reconstruction\n\nreproduce: `python bench/gpu.py {' '.join(sys.argv[1:])}`\n\n" + text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--calib", required=True)
    r.add_argument("--device", default="cuda")
    r.add_argument("--preset", default="fast")
    r.add_argument("--regions", default="layer")
    r.add_argument("--bits", default="4")
    r.add_argument("--out", required=True)
    t = sub.add_parser("table")
    t.add_argument("--runs", nargs="+", required=True)
    t.add_argument("--ref", required=True)
    t.add_argument("--val", required=True)
    t.add_argument("--tag", default="lite0")
    args = ap.parse_args()
    run(args) if args.cmd == "run" else table(args)


if __name__ == "__main__":
    main()
