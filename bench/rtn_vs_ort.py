"""onnxflex round-to-nearest vs onnxruntime.quantization.quantize_static, same model and images.

Calibration: 256 images of ../shared/data/imagenet-sample/calib; evaluation: its 244 labelled val
images. Per-channel weights, int8 activations (QDQ, symmetric int8 for both tools), W8A8 and W4A8.
Each quantization runs in its own process so time and peak memory (max RSS) belong to it.
Also measures onnxflex's activation-range methods (minmax / percentile / mse) at W8A8.

    python bench/rtn_vs_ort.py [--model efficientnet_lite0] [--calib-size 256]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.flexround_imagenet import preprocess_for  # noqa: E402
from models.build import IMAGENET_SAMPLE  # noqa: E402


def _ort_quantize(fp32, out, calib_size, name, bits, q):
    import onnx
    from onnxruntime.quantization import QuantType

    from bench.common import ort_quantize_static
    from onnxflex.calib import load_calibration
    from onnxflex.graph import model_input_specs

    cal = load_calibration(str(IMAGENET_SAMPLE / "calib"), model_input_specs(onnx.load(fp32)), size=calib_size,
                           preprocess=preprocess_for(name))
    secs = ort_quantize_static(fp32, out, cal, activation_type=QuantType.QInt8,
                               weight_type=QuantType.QInt4 if bits == 4 else QuantType.QInt8,
                               extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    q.put((secs, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def _onnxflex_quantize(fp32, out, calib_size, name, bits, calib_method, q):
    from onnxflex import QuantConfig, quantize

    t0 = time.perf_counter()
    quantize(fp32, out, str(IMAGENET_SAMPLE / "calib"),
             QuantConfig(method="rtn", weight_bits=bits, act_bits=8, calib_size=calib_size, calib_method=calib_method,
                         progress=False), preprocess=preprocess_for(name))
    q.put((time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def _in_process(fn, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main():
    from onnxflex.runtime.evaluate import evaluate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench"))
    args = ap.parse_args()
    from bench.common import imagenet_model

    fp32, val = imagenet_model(args.model, args.work)
    fp32, work, pp = str(fp32), Path(args.work), preprocess_for(args.model)
    base = evaluate(fp32, val, preprocess=pp).top1 * 100
    runs = [("onnxruntime quantize_static", 8, "minmax"), ("onnxruntime quantize_static", 4, "minmax"),
            ("onnxflex rtn", 8, "minmax"), ("onnxflex rtn", 8, "percentile"), ("onnxflex rtn", 8, "mse"),
            ("onnxflex rtn", 4, "mse")]
    rows = []
    for tool, bits, cm in runs:
        out = str(work / f"{args.model}_{tool.split()[0]}_{cm}_w{bits}a8.onnx")
        try:
            if tool.startswith("onnxruntime"):
                secs, rss = _in_process(_ort_quantize, fp32, out, args.calib_size, args.model, bits)
            else:
                secs, rss = _in_process(_onnxflex_quantize, fp32, out, args.calib_size, args.model, bits, cm)
        except Exception as e:  # report a tool that cannot produce this setting instead of dying
            rows.append((tool, bits, cm, None, None, None, None, f"failed: {e}"))
            continue
        for opt in ("disable", "all"):
            ev = evaluate(out, val, ref=fp32, preprocess=pp, optimization=opt)
            rows.append((tool, bits, cm, opt, ev.top1 * 100, ev.agreement * 100, secs, rss))
        print(rows[-2], rows[-1], flush=True)
    cmd = "python bench/rtn_vs_ort.py " + " ".join(sys.argv[1:])
    text = (f"# {args.model}: onnxflex RTN vs onnxruntime quantize_static\n\n"
            f"- calibration {args.calib_size} imagenet-sample/calib images; evaluation 244 imagenet-sample/val images; "
            f"FP32 top-1 {base:.2f} %\n- per-channel symmetric weights, symmetric int8 activations, QDQ format\n"
            f"- ORT opt = graph optimisation level of the evaluating ORT CPU session: `disable` runs Q/DQ as "
            f"written; `all` lets ORT-CPU fuse them into its int8 kernels\n- reproduce: `{cmd}`\n\n"
            "| tool | bits | act range | ORT opt | top-1 % | agree % | quant time s | peak RSS MB |\n"
            "|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        if r[3] is None:
            text += f"| {r[0]} | W{r[1]}A8 | {r[2]} | - | - | - | - | {r[7]} |\n"
        else:
            text += f"| {r[0]} | W{r[1]}A8 | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.1f} | {r[6]:.0f} | {r[7]:.0f} |\n"
    print(text)
    res = ROOT / "bench" / "results"
    res.mkdir(parents=True, exist_ok=True)
    (res / f"rtn_vs_ort_{args.model}.md").write_text(text)
    (res / f"rtn_vs_ort_{args.model}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
