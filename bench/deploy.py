"""Where the output runs: onnxruntime's CPU provider at its default optimisation level (ORT_ENABLE_ALL).

FP32 vs onnxruntime's own `quantize_static` (QDQ, per-channel int8 weights; S8S8 = int8 activations,
its default; U8S8 = uint8 activations) vs onnxflex W8A8 for each target, on one model, in one run:
accuracy as deployed (ORT-CPU, default optimisations), latency at batch 1 and 32 (median of
interleaved runs, 2 threads), file size, and which integer kernels ORT actually ran.

- image models: calibration 256 imagenet-sample/calib images; top-1 on the 244 val images and
  agreement with FP32;
- minilm: calibration the first 128 documents of gensim's lee_background.cor (128 tokens);
  fidelity = mean cosine of the embeddings to FP32 over lee.cor's 50 documents.

    python bench/deploy.py --model efficientnet_lite0
    python bench/deploy.py --model minilm --rows fp32,ort:S8S8,ort:U8S8,rtn:ort-cpu,flexround:ort-cpu
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, ort_quantize_static, run_quantize, save_results  # noqa: E402
from bench.flexround_imagenet import pp_flags, preprocess_for  # noqa: E402
from models.build import IMAGENET_SAMPLE, MODELS  # noqa: E402
from onnxflex.runtime.cpu import describe_cpu  # noqa: E402

DEFAULT_ROWS = "fp32,ort:S8S8,ort:U8S8,rtn:ort-cpu,flexround:ort-cpu,flexround:tensorrt"
INT_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearGlobalAveragePool", "MatMulInteger",
               "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMul", "QAttention", "ConvInteger")
TEXT_LEN = 128


def session(path: str, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()  # ORT_ENABLE_ALL: what a user gets by default
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def kernels(path: str, work: Path) -> str:
    """Integer kernels in ORT's optimised graph (what really runs), e.g. 'QLinearConv x49'."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(work / (Path(path).stem + ".ortopt.onnx"))
    so.log_severity_level = 3
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    found = [f"{k} x{v}" for k, v in sorted(ops.items()) if k in INT_KERNELS]
    left = ops.get("DequantizeLinear", 0)
    return (", ".join(found) or "none") + (f"; {left} DQ left" if left else "")


def latencies(paths: dict, feeds: dict, runs: int) -> dict:
    """Median ms per model and batch; models are interleaved run by run so load on the machine hits all alike."""
    sessions = {k: session(p) for k, p in paths.items()}
    out = {}
    for bs, feed in feeds.items():
        times = {k: [] for k in paths}
        for k, s in sessions.items():  # warm-up
            for _ in range(2):
                s.run(None, feed)
        for _ in range(runs):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feed)
                times[k].append((time.perf_counter() - t0) * 1000)
        for k in paths:
            out[(k, bs)] = statistics.median(times[k])
    return out


# ----------------------------------------------------------------------------- data per model kind

class Images:
    def __init__(self, name):
        self.name, self.pp = name, preprocess_for(name)
        self.calib = IMAGENET_SAMPLE / "calib"

    def quantize_flags(self):
        return ["--calib", self.calib, *pp_flags(self.name)]

    def calibration(self, specs, size):
        from onnxflex.calib import load_calibration

        return load_calibration(str(self.calib), specs, size=size, preprocess=self.pp)

    def feeds(self, specs):
        from onnxflex.calib import load_calibration

        cs = load_calibration(str(IMAGENET_SAMPLE / "val"), specs, size=32, preprocess=self.pp)
        return {1: next(cs.batches(1)), 32: next(cs.batches(32))}

    def accuracy(self, path, fp32):
        from onnxflex.runtime.evaluate import evaluate

        ev = evaluate(path, str(IMAGENET_SAMPLE / "val"), ref=fp32 if path != fp32 else None, preprocess=self.pp,
                      optimization="all")
        return {"top-1 %": ev.top1 * 100, "agree %": (ev.agreement * 100) if path != fp32 else 100.0}


class Text:
    def __init__(self, work: Path):
        from bench.minilm import gensim_data, read_lines, write_texts
        from models import minilm

        data = gensim_data()
        self.tok = str(minilm.tokenizer_dir())
        self.calib = write_texts(read_lines(data / "lee_background.cor")[:128], work / "deploy_calib.txt")
        self.eval = write_texts(read_lines(data / "lee.cor"), work / "deploy_eval.txt")
        self._ref = None

    def quantize_flags(self):
        return ["--calib", self.calib, "--tokenizer", self.tok, "--max-length", TEXT_LEN, "--batch-size", 8]

    def calibration(self, specs, size):
        from onnxflex.calib import load_calibration

        return load_calibration(str(self.calib), specs, size=size, tokenizer=self.tok, max_length=TEXT_LEN)

    def feeds(self, specs):
        from onnxflex.calib import load_calibration

        cs = load_calibration(str(self.eval), specs, size=32, tokenizer=self.tok, max_length=TEXT_LEN)
        return {1: next(cs.batches(1)), 32: next(cs.batches(32))}

    def _embed(self, path):
        from onnxflex.calib import load_calibration

        s = session(path)
        specs = {i.name: ([None, None], np.int64) for i in s.get_inputs()}
        cs = load_calibration(str(self.eval), specs, size=None, tokenizer=self.tok, max_length=256)
        name = next(o.name for o in s.get_outputs() if o.type == "tensor(float)")
        return np.concatenate([s.run([name], f)[0] for f in cs.batches(25)])

    def accuracy(self, path, fp32):
        from bench.minilm import unit

        if self._ref is None:
            self._ref = unit(self._embed(fp32))
        e = unit(self._embed(path))
        return {"cosine to FP32": float(np.mean(np.sum(e * self._ref, axis=1)))}


def ort_quantize(fp32: str, out: str, data, act: str, size: int) -> float:
    """onnxruntime's quantize_static: QDQ, per-channel int8 weights, `act` (S8S8 | U8S8) activations."""
    import onnx
    from onnxruntime.quantization import QuantType

    from onnxflex.graph import model_input_specs

    cal = data.calibration(model_input_specs(onnx.load(fp32, load_external_data=False)), size)
    return ort_quantize_static(fp32, out, cal, weight_type=QuantType.QInt8,
                               activation_type=QuantType.QUInt8 if act == "U8S8" else QuantType.QInt8)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0", choices=["efficientnet_lite0", "efficientnet_lite1", "minilm"])
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="fp32, ort:S8S8|U8S8, METHOD:TARGET (W8A8), comma-separated")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per model and batch size")
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "bench"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / f"{args.model}.onnx"
    if not fp32.exists():
        MODELS[args.model][0](str(fp32))
    text = args.model == "minilm"
    data = Text(work) if text else Images(args.model)
    calib_size = 128 if text else 256
    paths, info = {}, {}
    for row in args.rows.split(","):
        row = row.strip()
        if row == "fp32":
            paths[row], info[row] = str(fp32), {"quant s": None}
        elif row.startswith("ort:"):
            out = work / f"{args.model}_ort_{row[4:]}.onnx"
            secs = ort_quantize(str(fp32), str(out), data, row[4:], calib_size)
            paths[row], info[row] = str(out), {"quant s": secs}
        else:
            method, target = row.split(":")
            out = work / f"{args.model}_{method}_{target}_w8a8.onnx"
            ran = run_quantize([fp32, "-o", out, "--method", method, "--target", target, "--preset", args.preset,
                                "--calib-size", calib_size, *data.quantize_flags()], out.with_suffix(".report.json"), row)
            if ran is None:
                continue
            paths[row], info[row] = str(out), {"quant s": ran[1]}
        info[row].update(data.accuracy(paths[row], str(fp32)), kernels=kernels(paths[row], work),
                         mb=Path(paths[row]).stat().st_size / 2**20)
        print(row, info[row], flush=True)
    import onnx

    from onnxflex.graph import model_input_specs

    lat = latencies(paths, data.feeds(model_input_specs(onnx.load(str(fp32), load_external_data=False))), args.runs)
    acc_cols = [k for k in next(iter(info.values())) if k.endswith("%") or k.startswith("cosine")]
    cmd = "python bench/deploy.py " + " ".join(sys.argv[1:])
    import onnxruntime

    head = (f"# {args.model}: deployed on onnxruntime CPU (default optimisation level)\n\n"
            f"- onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, ORT_ENABLE_ALL, 2 intra-op threads; "
            f"machine: {machine()}; CPU flags: {describe_cpu()}\n"
            f"- W8A8 everywhere; onnxflex preset {args.preset}; ort = onnxruntime.quantization.quantize_static "
            f"(QDQ, per-channel int8 weights, S8S8 = int8 activations, U8S8 = uint8 activations)\n"
            f"- latency: median of {args.runs} interleaved runs after warm-up"
            + (f", sequences of {TEXT_LEN} tokens" if text else "") + "\n"
            f"- reproduce: `{cmd}`\n\n")
    cols = acc_cols + ["ms b1", "ms b32", "speed-up b32 vs FP32", "MB", "quant s", "integer kernels ORT ran"]
    table = ["| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    base32 = lat.get(("fp32", 32))
    rows = []
    for k in paths:
        r = dict(info[k], **{"ms b1": lat[(k, 1)], "ms b32": lat[(k, 32)]})
        r["speed-up b32 vs FP32"] = base32 / lat[(k, 32)] if base32 else None
        rows.append(dict(row=k, **r))
        vals = []
        for c in cols:
            v = r.get({"MB": "mb", "integer kernels ORT ran": "kernels"}.get(c, c))
            vals.append("-" if v is None else (f"{v:.4f}" if c.startswith("cosine") else
                                               f"{v:.2f}" if isinstance(v, float) else str(v)))
        table.append(f"| {k} | " + " | ".join(vals) + " |")
    save_results(f"deploy_{args.model}", head, table, args, rows)


if __name__ == "__main__":
    main()
