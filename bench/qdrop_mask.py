"""Milliseconds to mix the FP and quantized streams element-wise (QDrop), with the mask drawn as one
float per element (torch.rand < p, the code before 2026-11-29) and as one random byte per element
(`fit.drop_mask`, now), on EfficientNet-Lite0's widest region inputs at a 32-image mini-batch.

Why: the mixing was 9 % of a Lite0 fast run (py-spy), two thirds of it the float mask. Random
inputs (the cost does not depend on their values).

    python bench/qdrop_mask.py [--repeats 5]
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

SHAPES = {"blocks.1 depthwise input": (32, 96, 112, 112), "blocks.3 depthwise input": (32, 144, 56, 56),
          "blocks.9 expand output": (32, 672, 14, 14)}


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--name", default="qdrop_mask")
    args = ap.parse_args()
    import torch

    from onnxflex.reconstruction.fit import drop_mask

    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, shape in SHAPES.items():
        q, f = torch.randn(shape), torch.randn(shape)
        float_mask = best_ms(lambda: torch.where(torch.rand(shape, generator=gen) < args.p, f, q), args.repeats)
        byte_mask = best_ms(lambda: torch.where(drop_mask(shape, args.p, gen, q.device), f, q), args.repeats)
        share = float(drop_mask(shape, args.p, gen, q.device).float().mean())
        rows.append(dict(tensor=name, shape=list(shape), float_mask_ms=float_mask, byte_mask_ms=byte_mask, p_drawn=share))
    head = (f"# QDrop mixing: ms per mini-batch, float mask vs byte mask (p = {args.p})\n\n"
            f"Machine: {machine()} ({describe_cpu()}), torch {torch.__version__}, {torch.get_num_threads()} threads. "
            f"Best of {args.repeats} after one warm-up; `torch.where(mask, fp, q)` included in both.\n\n"
            f"    python bench/qdrop_mask.py --repeats {args.repeats} --p {args.p}\n\n")
    table = ["| tensor | shape | float mask (ms) | byte mask (ms) | speed-up | share dropped (byte mask) |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['tensor']} | {'x'.join(map(str, r['shape']))} | {r['float_mask_ms']:.0f} | {r['byte_mask_ms']:.0f} | "
              f"{r['float_mask_ms'] / r['byte_mask_ms']:.2f}x | {r['p_drawn']:.4f} |" for r in rows]
    save_results(args.name, head, table, args, rows)


if __name__ == "__main__":
    main()
