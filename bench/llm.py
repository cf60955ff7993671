"""Decoder LM weight-only quantization: onnxflex (RTN, AdaRound, FlexRound) against onnxruntime's own
int4 quantizers (matmul_nbits_quantizer: DEFAULT, HQQ, GPTQ) on SmolLM2-135M-Instruct (or, with --model qwen05,
Qwen2.5-Coder-0.5B-Instruct: 2.5 GB of FP32 weights in external data), by perplexity.

Calibration: K windows of N tokens cut from gensim's Lee corpus (one token stream). Evaluation: perplexity
over the first 53 articles of gensim's Wikipedia dump, non-overlapping windows of N tokens, in onnxruntime's
CPU provider at its default optimisation level (what a user runs: onnxruntime turns blocked
DequantizeLinear -> MatMul into MatMulNBits, whose default accuracy level 4 computes with int8 activations)
and with optimisations off (the QDQ arithmetic exactly). Every quantization runs in its own process, so
time and peak RSS are its own.

    python bench/llm.py [--model smollm2|qwen05] [--windows 128] [--seq-len 512] [--eval-windows 16]
                        [--rows ROW,ROW...] [--preset fast]

Rows: fp32 | ort:default|hqq|gptq[:bBLOCK] | METHOD:wBITS[aBITS][:bBLOCK][:asym][:awq][:cand] (b0 = per channel;
asym: a zero point per block, --asymmetric; awq: --awq, activation-aware scaling first; cand: --gptq-candidate,
the held-out judge also weighs GPTQ's rounding of each linear), e.g. flexround:w4:b128, flexround:w4:b128:awq,
flexround:w4:b128:cand, rtn:w3:b128, flexround:w8a8.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import fmt, machine, save_results  # noqa: E402
from onnxflex.runtime.cpu import describe_cpu  # noqa: E402

DEFAULT_ROWS = ("fp32,ort:default:b128,ort:hqq:b128,ort:gptq:b128,"
                "rtn:w4:b128,adaround:w4:b128,flexround:w4:b128,"
                "rtn:w4:b0,adaround:w4:b0,flexround:w4:b0,"
                "rtn:w3:b128,adaround:w3:b128,flexround:w3:b128,flexround:w8a8")
LM_HEAD = "/lm/lm_head/MatMul"
# --model: (title, recipe in models/ as module:function)
MODELS = {"smollm2": ("SmolLM2-135M-Instruct", "models.smollm2:build_smollm2"),
          "qwen05": ("Qwen2.5-Coder-0.5B-Instruct", "models.qwen:build_qwen")}


def corpus(work: Path) -> tuple[Path, Path]:
    """The calibration (Lee) and evaluation (53 Wikipedia articles) texts as files for the CLI."""
    from models.text_corpus import lee_text, wiki_articles, write_text

    calib, evalf = work / "lee.txt", work / "wiki53.txt"
    if not calib.exists():
        calib.write_text(lee_text(), encoding="utf-8")
    if not evalf.exists():
        write_text(evalf, wiki_articles(53))
    return calib, evalf


def build(work: Path, model: str) -> Path:
    import importlib

    module, fn = MODELS[model][1].split(":")
    path = work / model / "model.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        getattr(importlib.import_module(module), fn)(str(path), check=False)
    return path


def size_mb(path: Path) -> float:
    """The model file plus its external data files."""
    import onnx

    total = path.stat().st_size
    m = onnx.load(str(path), load_external_data=False)
    files = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    total += sum((path.parent / f).stat().st_size for f in files)
    return total / 2**20


def parse(row: str) -> dict:
    parts = row.split(":")
    if parts[0] == "fp32":
        return dict(kind="fp32")
    block = next((int(p[1:]) for p in parts[1:] if p.startswith("b")), 128)
    if parts[0] == "ort":
        return dict(kind="ort", algo=parts[1], block=block, bits=4)
    bits = parts[1].lstrip("w")
    w, a = (bits.split("a") + ["0"])[:2]
    return dict(kind="onnxflex", method=parts[0], bits=int(w), act=int(a or 0), block=block if int(a or 0) == 0 else 0,
                asymmetric="asym" in parts[2:], awq="awq" in parts[2:], gptq_candidate="cand" in parts[2:])


def quantize_onnxflex(spec: dict, fp32: Path, calib: Path, tok: Path, out: Path, args) -> dict:
    report = out.with_suffix(".report.json")
    cmd = [sys.executable, "-m", "onnxflex.cli", "quantize", str(fp32), "--calib", str(calib), "--tokenizer", str(tok),
           "--seq-len", str(args.seq_len), "--calib-size", str(args.windows), "-o", str(out), "--method", spec["method"],
           "--weight-bits", str(spec["bits"]), "--act-bits", str(spec["act"]), "--block-size", str(spec["block"]),
           "--preset", args.preset, "--target", args.target, "--report", str(report), "-q"]
    if args.regions:
        cmd += ["--regions", args.regions]
    if args.device:
        cmd += ["--device", args.device]
    if spec["asymmetric"]:
        cmd += ["--asymmetric"]
    if spec["awq"]:
        cmd += ["--awq"]
    if spec["gptq_candidate"]:
        cmd += ["--gptq-candidate"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return dict(error=(proc.stderr or proc.stdout)[-2000:])
    s = json.loads(report.read_text())["summary"]
    return dict(seconds=wall, peak_rss_mb=s.get("peak_rss_mb"), notes=s.get("notes"), device=s.get("device"),
                regions=s.get("region_mode"), gpu_peak_mb=s.get("gpu_peak_mb"),
                reconstruct_s=(s.get("pass_seconds") or {}).get("reconstruct"))


def quantize_ort(spec: dict, fp32: Path, calib: Path, tok: Path, out: Path, args) -> dict:
    """onnxruntime's matmul_nbits_quantizer in a child process (this file with --ort-child)."""
    res = out.with_suffix(".ort.json")
    cmd = [sys.executable, __file__, "--ort-child", json.dumps(dict(spec=spec, fp32=str(fp32), calib=str(calib), tok=str(tok),
                                                                    out=str(out), res=str(res), windows=args.windows,
                                                                    seq_len=args.seq_len))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return dict(error=(proc.stderr or proc.stdout)[-2000:])
    return dict(seconds=wall, **json.loads(res.read_text()))


def ort_child(job: dict) -> None:
    """Symmetric int4, block size as given; the LM head is left in FP32 (onnxflex keeps it at 8 bits)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    spec = job["spec"]
    model = onnx.load(job["fp32"])
    block = spec["block"]
    if spec["algo"] == "default":
        algo = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True)
    elif spec["algo"] == "hqq":
        algo = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=4)
    elif spec["algo"] == "gptq":
        from onnxflex.calib.text import load_decoder_text
        from onnxflex.runtime.session import input_specs, make_session

        specs = input_specs(make_session(job["fp32"]))
        cal = load_decoder_text(job["calib"], specs, job["tok"], seq_len=job["seq_len"], size=job["windows"])

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(cal.samples)

            def get_next(self):
                return next(self.it, None)

            def rewind(self):
                self.it = iter(cal.samples)

        algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=block, perchannel=True)
    else:
        raise SystemExit(f"unknown onnxruntime algorithm {spec['algo']}")
    q = mnq.MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=True, nodes_to_exclude=[LM_HEAD],
                                 algo_config=algo)
    q.process()
    q.model.save_model_to_file(job["out"], use_external_data_format=False)
    Path(job["res"]).write_text(json.dumps(dict(peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))))


def evaluate(model: Path, evalf: Path, tok: Path, args) -> dict:
    from onnxflex.runtime.perplexity import perplexity

    out = {}
    for label, opt in (("ppl", "all"), ("ppl_exact", "disable")):
        r = perplexity(str(model), evalf, tok, seq_len=args.seq_len, limit_windows=args.eval_windows, optimization=opt)
        out[label], out["eval_tokens"] = r.perplexity, r.tokens
    out["tokens_per_s"] = prefill_speed(model, args.seq_len)
    return out


def prefill_speed(model: Path, seq_len: int, repeats: int = 3) -> float:
    """Tokens per second of one seq_len-token window (batch 1) in onnxruntime, default optimisation."""
    import numpy as np

    from onnxflex.calib.windows import decoder_feeds
    from onnxflex.runtime.session import input_specs, make_session

    sess = make_session(str(model))
    feed = decoder_feeds(np.random.default_rng(0).integers(0, 1000, (1, seq_len)), input_specs(sess))[0]
    sess.run(None, feed)
    t0 = time.perf_counter()
    for _ in range(repeats):
        sess.run(None, feed)
    return seq_len * repeats / (time.perf_counter() - t0)


def gpu_name(rows: list) -> str:
    """The GPU a row's reconstruction ran on, for the table's machine line."""
    if not any(r.get("device") == "cuda" for r in rows):
        return ""
    import torch

    return f"; reconstruction on {torch.cuda.get_device_name(0)}, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--windows", type=int, default=128, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16, help="evaluation windows (16 x 511 = 8176 tokens scored)")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--regions", default=None, help="onnxflex --regions (default: auto)")
    ap.add_argument("--device", default=None, help="onnxflex --device (default: auto, the GPU where torch sees one)")
    ap.add_argument("--target", default="ort-cpu", help="onnxflex --target: ort-cpu (signed per-block scales on the "
                    "full int4 grid) or tensorrt (scales > 0)")
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench" / "llm"))
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--name", default=None, help="results file name (default llm_MODEL)")
    ap.add_argument("--ort-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ort_child:
        return ort_child(json.loads(args.ort_child))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib, evalf = corpus(work)
    fp32 = build(work, args.model)
    tok = fp32.parent
    args.name = args.name or f"llm_{args.model}"
    prefix = "" if args.model == "smollm2" else f"{args.model}_"
    rows, fp_ppl = [], None
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        spec = parse(row)
        out = fp32 if spec["kind"] == "fp32" else work / (prefix + row.replace(":", "_") + ".onnx")
        print(f"== {row}", flush=True)
        res = dict(row=row)
        if spec["kind"] == "onnxflex":
            res.update(quantize_onnxflex(spec, fp32, calib, tok, out, args))
        elif spec["kind"] == "ort":
            res.update(quantize_ort(spec, fp32, calib, tok, out, args))
        if "error" not in res:
            res.update(evaluate(out, evalf, tok, args))
            res["size_mb"] = size_mb(out)
            if spec["kind"] == "fp32":
                fp_ppl = res["ppl"]
        print(json.dumps({k: v for k, v in res.items() if k != "notes"}), flush=True)
        rows.append(res)

    head = (f"# {MODELS[args.model][0]}: weight-only quantization, perplexity\n\n"
            f"Machine: {machine()} ({describe_cpu()}){gpu_name(rows)}. "
            f"Calibration: {args.windows} windows x {args.seq_len} tokens of gensim's "
            f"Lee corpus (fewer if it holds fewer). Evaluation: the first {args.eval_windows} windows x {args.seq_len} tokens "
            f"of the first 53 Wikipedia articles in gensim's dump. onnxflex preset `{args.preset}`, regions "
            f"`{args.regions or 'auto'}`, target `{args.target}`;"
            f" symmetric weights unless the row says asym, activation-aware scaling (--awq) only where the row says awq"
            f" (HQQ is asymmetric by construction: it fits a zero point per "
            f"block); onnxflex keeps the LM head at 8 bits (--first-last-bits), "
            f"onnxruntime's quantizers leave it in FP32; the embedding table is int8 per row in onnxflex's rows on "
            f"target ort-cpu, FP32 otherwise.\n"
            f"ppl: onnxruntime CPU at its default optimisation (MatMulNBits, accuracy level 4 for onnxflex's QDQ); "
            f"ppl exact: optimisations off. tok/s: one {args.seq_len}-token window, batch 1, default optimisation.\n\n"
            f"    python bench/llm.py --model {args.model} --windows {args.windows} --seq-len {args.seq_len} "
            f"--eval-windows {args.eval_windows} "
            f"--preset {args.preset} --target {args.target}{' --regions ' + args.regions if args.regions else ''}"
            f"{' --device ' + args.device if args.device else ''} --rows {args.rows}\n\n")
    table = ["| row | ppl | vs FP32 | ppl exact | quant time (s) | regions, device | GPU peak (MB) | peak RSS (MB) "
             "| size (MB) | tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            table.append(f"| {r['row']} | failed: `{r['error'][-200:].strip().splitlines()[-1]}` | | | | | | | | |")
            continue
        rel = (r["ppl"] / fp_ppl - 1) * 100 if fp_ppl else None
        where = f"{r['regions']}, {r['device']}" if r.get("device") else "-"
        table.append(f"| {r['row']} | {r['ppl']:.3f} | {fmt(rel, '+.1f')}% | {r['ppl_exact']:.3f} | {fmt(r.get('seconds'), '.0f')} | "
                     f"{where} | {fmt(r.get('gpu_peak_mb'), '.0f')} | {fmt(r.get('peak_rss_mb'), '.0f')} | {r['size_mb']:.1f} | "
                     f"{r['tokens_per_s']:.0f} |")
    save_results(args.name, head, table, args, rows)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
