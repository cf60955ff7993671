"""One decoder linear at a time: how close RTN, GPTQ and FlexRound (at several schedules) get to a
SmolLM2 MatMul's FP32 output, on Lee windows the fit never saw.

Why: the end-to-end perplexity of a layer-wise run mixes 211 regions; this isolates the rounding
problem of one weight (INT4, block 128, signed grid: what `--target ort-cpu` writes) on the exact Gram
loss the reconstruct pass trains on, with FP32 inputs (no upstream quantization error), so the methods
and schedules compare on the same quadratic.

    python bench/llm_layers.py [--layers 2,10,20,29] [--train 16] [--held 8] [--rows rtn,gptq,fr:3e-3:200]

Rows: rtn | gptq (onnxflex's GPTQ, static block scales, classic) | fr:LR:ITERS[:S2SCALE] (FlexRound Adam,
cosine decay, S2 at S2SCALE x LR) | gfr:LR:ITERS (FlexRound started from GPTQ's integers, 10 checks
on the training loss keep the best point). Score: output SQNR in dB on the held-out windows
(10 log10 ||X W||² / ||X (W_hat - W)||²), and on the training windows ("train").
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, save_results  # noqa: E402
from onnxflex.runtime.cpu import describe_cpu  # noqa: E402

LINEARS = ("self_attn/q_proj", "self_attn/o_proj", "mlp/gate_proj", "mlp/down_proj")
DEFAULT_ROWS = "rtn,gptq,fr:3e-3:200,fr:3e-3:1000:0.3,gfr:3e-3:200"


def capture(model: Path, lee: Path, tok: Path, layers: list, windows: int) -> dict:
    """FP32 inputs (float16) and weights of the chosen MatMuls on the first ``windows`` Lee windows."""
    import onnx
    import onnxruntime as ort

    from onnxflex.calib.text import read_text_stream, tokenize_stream
    from onnxflex.calib.windows import decoder_feeds, proto_io_specs, token_windows

    m = onnx.load(str(model))
    want = {f"/lm/model/layers.{L}/{p}/MatMul" for L in layers for p in LINEARS}
    nodes = {n.name: n for n in m.graph.node if n.name in want}
    inits = {i.name: i for i in m.graph.initializer}
    xs = sorted({n.input[0] for n in nodes.values()})
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None) for x in xs if x not in have)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ids = tokenize_stream(read_text_stream(lee), tok)
    acc = {x: [] for x in xs}
    for feed in decoder_feeds(token_windows(ids, 512, windows), proto_io_specs(m)[0]):
        for x, v in zip(xs, sess.run(xs, feed)):
            acc[x].append(v.astype(np.float16))
    return {name: (np.concatenate(acc[n.input[0]], 0), onnx.numpy_helper.to_array(inits[n.input[1]]))
            for name, n in sorted(nodes.items(), key=lambda kv: (int(kv[0].split("layers.")[1].split("/")[0]), kv[0]))}


def start_from(q, ints):
    """FlexRound's S2 set so its rounding gives ``ints`` (GPTQ's), with the smallest change to each
    weight's W/s1: inside the integer's rounding cell, nearest the RTN point. Integers of the other
    sign than the weight (FlexRound's division keeps the sign) become 0."""
    import torch

    with torch.no_grad():
        wz = (q.weight if q.w_signed is None else q.w_signed) / torch.exp(q.expand_blocks(q.log_s1))
        mag = (ints.float() * torch.sign(wz)).clamp_min(0)
        a = wz.abs()
        lo = torch.where(mag == 0, torch.zeros_like(a), mag - 0.49)
        hi = torch.where(mag >= max(abs(q.qmin), abs(q.qmax)), torch.full_like(a, 1e9), mag + 0.49)
        z = torch.minimum(torch.maximum(a, lo), hi).clamp_min(1e-6)
        q.log_S2.copy_(torch.log(a.clamp_min(1e-12)) - torch.log(z))


def score(row: str, W, st, sqnr):
    import torch

    from onnxflex.quantizers import gram as G
    from onnxflex.quantizers.flexround import FlexRoundQuantizer
    from onnxflex.quantizers.gptq import GPTQQuantizer
    from onnxflex.reconstruction.fit import fit

    parts = row.split(":")
    torch.manual_seed(0)
    q = FlexRoundQuantizer(W, 4, 1, 0, block_size=128, grid="signed")
    loss = lambda: G.gram_mse(st, q() - W, 1)  # noqa: E731
    if parts[0] in ("gptq", "gfr"):
        g = GPTQQuantizer(W, 4, 1, 0, block_size=128, grid="signed").solve(st, correct_inputs=False)
        if parts[0] == "gptq":
            return sqnr(g().detach())
        start_from(q, g.integers())
    if parts[0] in ("fr", "gfr"):
        lr, iters = float(parts[1]), int(parts[2])
        scale = float(parts[3]) if len(parts) > 3 else 1.0
        checks = 10 if parts[0] == "gfr" else 0
        fit([q], [], lambda it: loss(), iters, lr, 0.0, row, False, lr * scale,
            holdout=lambda: float(loss().detach()), checks=checks)
    return sqnr(q().detach())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="2,10,20,29")
    ap.add_argument("--train", type=int, default=16, help="training windows of 512 tokens (the bench's --windows)")
    ap.add_argument("--held", type=int, default=8, help="held-out windows after them")
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench" / "llm"))
    ap.add_argument("--name", default="llm_layers_smollm2")
    args = ap.parse_args()
    import torch

    from bench.llm import build, corpus
    from onnxflex.quantizers import gram as G

    work = Path(args.work)
    lee, _ = corpus(work)
    model = build(work, "smollm2")
    data = capture(model, lee, model.parent, [int(v) for v in args.layers.split(",")], args.train + args.held)
    rows = args.rows.split(",")
    results, lines = [], []
    for name, (x, w) in data.items():
        X = torch.from_numpy(x.astype(np.float32))
        W = torch.from_numpy(w.astype(np.float32))
        Xt, Xh = X[:args.train].reshape(-1, X.shape[-1]), X[args.train:].reshape(-1, X.shape[-1])
        st = G.linear_gram(Xt, W.T, None, Xt @ W, accum_dtype=torch.float64)
        Hh, Ht = Xh.double().T @ Xh.double(), Xt.double().T @ Xt.double()
        ref_h, ref_t = float(((Xh @ W) ** 2).sum()), float(((Xt @ W) ** 2).sum())

        def sqnr(What):
            d = (What - W).double()
            return (10 * np.log10(ref_h / float((d * (Hh @ d)).sum())), 10 * np.log10(ref_t / float((d * (Ht @ d)).sum())))

        short = name.split("layers.")[1].replace("/MatMul", "")
        res = dict(linear=short)
        for row in rows:
            t0 = time.perf_counter()
            held, train = score(row, W, st, sqnr)
            res[row] = dict(held=held, train=train, seconds=time.perf_counter() - t0)
        results.append(res)
        lines.append(f"| {short} | " + " | ".join(f"{res[r]['held']:.2f} ({res[r]['train']:.2f})" for r in rows) + " |")
        print(lines[-1], flush=True)
    mean = {r: float(np.mean([res[r]["held"] for res in results])) for r in rows}
    lines.append("| **mean held-out** | " + " | ".join(f"**{mean[r]:.2f}**" for r in rows) + " |")
    head = (f"# SmolLM2-135M, one linear at a time: INT4 block 128 (signed grid), output SQNR dB\n\n"
            f"Machine: {machine()} ({describe_cpu()}). FP32 inputs of each MatMul on Lee windows of 512 tokens: "
            f"{args.train} to fit, the next {args.held} held out. Cells: held-out SQNR (training SQNR).\n\n"
            f"    python bench/llm_layers.py --layers {args.layers} --train {args.train} --held {args.held} --rows {args.rows}\n\n")
    table = ["| linear | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)] + lines
    save_results(args.name, head, table, args, results)


if __name__ == "__main__":
    main()
