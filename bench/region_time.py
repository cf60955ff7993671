"""Where a quantize run's time goes, region by region: the reconstruct pass's steps timed in-process.

One `onnxflex quantize` run (EfficientNet-Lite0 FlexRound W4A8 fast by default, the 256 calibration
images) with timers around the functions each region calls: the Gram statistics (and inside them the
conv products and QDrop's mixing), the Adam steps, onnxruntime's FP32 targets, the quantized stream's
torch pass, the held-out errors, GPTQ's candidate. A profiler's sampling says the same in total; this
says it per region, which is what a change to large early maps or to depthwise convs moves.

    python bench/region_time.py [--model efficientnet_lite0] [--tag T] [-- extra quantize flags]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import save_results  # noqa: E402

# (column, module attribute to time); the module is onnxflex.passes.reconstruct unless it is named
STEPS = [("gram statistics", "gram_stats"), ("conv products", "gram.conv_gram"), ("QDrop mixing", "fit.mix"),
         ("Adam steps", "train_gram"), ("ORT FP32 targets", "ort_outputs"), ("torch Q stream", "torch_outputs"),
         ("held-out errors", "region_mse"), ("act ranges", "choose_act_ranges"), ("GPTQ solve", "RegionRun.gptq_candidate")]


def instrument(acc: dict, current: list) -> None:
    """Wrap each step so its seconds add up under the region being run."""
    import onnxflex.passes.reconstruct as rec
    import onnxflex.reconstruction.fit as fit

    owners = {"gram": fit.gram_mod, "fit": fit, "RegionRun": rec.RegionRun}
    for column, path in STEPS:
        owner, _, name = path.rpartition(".")
        mod = owners[owner] if owner else rec
        f = getattr(mod, name)

        def timed(*a, _f=f, _c=column, **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                acc[current[0]][_c] += time.perf_counter() - t
        setattr(mod, name, timed)
    run = rec.RegionRun.run

    def region(self):
        current[0] = (self.region.index, self.region.name)
        t = time.perf_counter()
        try:
            return run(self)
        finally:
            acc[current[0]]["total"] += time.perf_counter() - t
    rec.RegionRun.run = region


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--top", type=int, default=16, help="regions listed one by one (the slowest)")
    ap.add_argument("flags", nargs="*", help="quantize flags after --, replacing the default W4A8 fast ones")
    args = ap.parse_args()
    from bench.ablation_cnn import BASE, pp_flags
    from bench.common import imagenet_model
    from models.build import IMAGENET_SAMPLE
    from onnxflex.cli import main as cli
    from onnxflex.runtime.cpu import describe_cpu

    fp32 = imagenet_model(args.model, args.work)[0]
    acc, current = collections.defaultdict(collections.Counter), [None]
    instrument(acc, current)
    flags = args.flags or BASE
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["quantize", str(fp32), "--calib", str(IMAGENET_SAMPLE / "calib"), "-o", str(Path(tmp) / "q.onnx"),
               "-q", *flags, *pp_flags(args.model)]
        t0 = time.perf_counter()
        try:
            cli(cmd)
        except SystemExit as e:
            if e.code:
                sys.exit(f"quantize failed ({e.code})")
        wall = time.perf_counter() - t0
    cols = ["total"] + [c for c, _ in STEPS]
    regions = sorted(k for k in acc if k is not None)
    total = collections.Counter()
    for r in regions:
        total.update(acc[r])
    slow = sorted(regions, key=lambda r: -acc[r]["total"])[:args.top]
    table = ["| region | " + " | ".join(f"{c} s" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in sorted(slow):
        table.append(f"| {r[1]} | " + " | ".join(f"{acc[r][c]:.2f}" for c in cols) + " |")
    table.append(f"| **all {len(regions)} regions** | " + " | ".join(f"**{total[c]:.1f}**" for c in cols) + " |")
    flags_txt = " ".join(flags)
    head = (f"# Per-region time of one quantize run: {args.model}\n\n"
            f"- command: `python bench/region_time.py --model {args.model}"
            f"{' --tag ' + args.tag if args.tag else ''}{' -- ' + ' '.join(args.flags) if args.flags else ''}`\n"
            f"- quantize flags: `{flags_txt}`, 256 calibration images (imagenet-sample/calib)\n"
            f"- machine: {os.cpu_count()} cores, {describe_cpu()}; wall {wall:.0f} s for the whole run, "
            f"{total['total']:.0f} s in the reconstruct pass\n"
            f"- the {len(slow)} slowest regions, in graph order; the columns nest: conv products and QDrop mixing are "
            "inside the Gram statistics, which with the other steps are inside the total\n\n")
    rows = [dict(region=r[1], **{c: acc[r][c] for c in cols}) for r in regions]
    save_results(f"region_time_{args.model}{'_' + args.tag if args.tag else ''}", head, table, args, rows)


if __name__ == "__main__":
    main()
