"""Seconds to gather one mini-batch's Gram statistics (G = XᵀX, C, ||R||²) for each of a SmolLM2
decoder layer's seven linears, through `linear_gram` as the reconstruct pass calls it (float32
accumulation, float16 stream inputs).

Why: at the protocol's 128 windows the statistics are a fixed cost of every linear region, paid
before any Adam step; this isolates it. Random weights and inputs (the cost does not depend on their
values). Runs on the code it is checked out with: gram_stats_before.md is ce73c51 (C from the
residual R = Y - X Wᵀ, a third product; the shipped form), gram_stats.md is d83cd18 (C = YᵀX - W G,
measured and reverted for its float32 error: README, "Decoder LM").

    python bench/gram_stats.py [--rows 16384] [--repeats 3] [--name gram_stats]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, save_results  # noqa: E402
from onnxflex.runtime.cpu import describe_cpu  # noqa: E402

# linear -> (K, N, how many of it a layer has)
LINEARS = {"q/o_proj": (576, 576, 2), "k/v_proj": (576, 192, 2), "gate/up_proj": (576, 1536, 2),
           "down_proj": (1536, 576, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16384, help="token rows of one mini-batch (32 windows x 512)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default="gram_stats")
    args = ap.parse_args()
    import torch

    from onnxflex.quantizers.gram import linear_gram

    torch.manual_seed(0)
    rows, layer = [], 0.0
    for name, (K, N, count) in LINEARS.items():
        x = torch.randn(args.rows, K).half()
        w = torch.randn(N, K) * 0.05
        y = (x.float() @ w.T).half()
        linear_gram(x, w, None, y, accum_dtype=torch.float32)  # warm-up
        secs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            linear_gram(x, w, None, y, accum_dtype=torch.float32)
            secs.append(time.perf_counter() - t)
        best = min(secs)
        layer += count * best
        rows.append(dict(linear=name, K=K, N=N, count=count, seconds=secs))
    head = (f"# Gram statistics of one mini-batch ({args.rows} token rows), SmolLM2 linear shapes\n\n"
            f"Machine: {machine()} ({describe_cpu()}), torch {torch.__version__}, {torch.get_num_threads()} threads. "
            f"float16 inputs, float32 accumulation (as the reconstruct pass); {args.repeats} timed calls after one "
            f"warm-up. A layer = the fastest call of each linear times its count, summed: **{layer:.2f} s**.\n\n"
            f"    python bench/gram_stats.py --rows {args.rows} --repeats {args.repeats}\n\n")
    table = ["| linear | weight [K, N] | per layer | seconds per call |", "|---|---|---|---|"]
    table += [f"| {r['linear']} | [{r['K']}, {r['N']}] | {r['count']} | {' / '.join(f'{v:.3f}' for v in r['seconds'])} |"
              for r in rows]
    save_results(args.name, head, table, args, rows + [dict(layer_seconds=layer)])


if __name__ == "__main__":
    main()
