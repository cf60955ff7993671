"""Milliseconds per FlexRound Gram-form training step on SmolLM2's linear shapes (INT4, block 128,
signed grid, what `--target ort-cpu` trains), through the reconstruct pass's own `fit` loop.

Why: a decoder run is 210 linears x 200 steps; this isolates the step's cost from the data passes.
Random weights and inputs (the step's cost does not depend on their values). Each shape runs
``--repeats`` fits of ``--steps`` steps; the first includes allocator warm-up, the table shows all.
Runs on the code it is checked out with (before 2026-11-29 gram_mse took a [Cout, K] weight only).

    python bench/flexround_step.py [--steps 50] [--repeats 3]
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, save_results  # noqa: E402
from onnxflex.runtime.cpu import describe_cpu  # noqa: E402

SHAPES = {"down_proj": (1536, 576), "gate/up_proj": (576, 1536), "q/o_proj": (576, 576)}  # MatMul [K, N]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default="flexround_step")
    args = ap.parse_args()
    import torch

    from onnxflex.quantizers import gram as G
    from onnxflex.quantizers.flexround import FlexRoundQuantizer
    from onnxflex.reconstruction.fit import fit

    layout_arg = "out_axis" in inspect.signature(G.gram_mse).parameters
    torch.manual_seed(0)
    rows = []
    for name, (K, N) in SHAPES.items():
        w = torch.randn(K, N) * 0.02
        x = torch.randn(4096, K)
        st = G.linear_gram(x, w.T, None, x @ w, accum_dtype=torch.float32)
        q = FlexRoundQuantizer(w, 4, 1, 0, block_size=128, grid="signed")
        if layout_arg:
            loss = lambda it: G.gram_mse(st, q() - w, 1)  # noqa: E731
        else:
            loss = lambda it: G.gram_mse(st, G.out_by_in(q() - w, 1))  # noqa: E731
        ms = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fit([q], [], loss, args.steps, 3e-3, 0.0, name, False)
            ms.append((time.perf_counter() - t) / args.steps * 1e3)
        rows.append(dict(linear=name, K=K, N=N, ms=ms))
    head = (f"# FlexRound Gram-form step, ms per step (SmolLM2 shapes, INT4 block 128, signed grid)\n\n"
            f"Machine: {machine()} ({describe_cpu()}), torch {torch.__version__}, {torch.get_num_threads()} threads. "
            f"{args.repeats} fits of {args.steps} steps per shape, in order (the first includes warm-up).\n\n"
            f"    python bench/flexround_step.py --steps {args.steps} --repeats {args.repeats}\n\n")
    table = ["| linear | weight [K, N] | ms per step (each fit) |", "|---|---|---|"]
    table += [f"| {r['linear']} | [{r['K']}, {r['N']}] | {' / '.join(f'{v:.1f}' for v in r['ms'])} |" for r in rows]
    save_results(args.name, head, table, args, rows)


if __name__ == "__main__":
    main()
