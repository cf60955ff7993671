"""Which QDQ layouts does onnxruntime's CPU provider fuse into its integer kernels, and how fast are they?

    python bench/ort_cpu_probe.py            # fusion table (pattern -> fused op), ~20 s
    python bench/ort_cpu_probe.py --time     # + kernel timings: 4-layer Conv chains, FP32 vs u8s8/s8s8/u8u8

Each pattern is a tiny onnx.helper graph; it is loaded with ORT_ENABLE_ALL (intra_op_num_threads=2), the
optimized model is written with SessionOptions.optimized_model_filepath and its op types are counted.
``err`` compares the optimized session with ORT_DISABLE_ALL (Q/DQ as written) in output units.
Run it on each host class you target: the int8 kernels that MLAS picks depend on the CPU (VNNI or not).
Measured on AMD EPYC (AVX512-VNNI, no AVX-VNNI), ORT 1.31.1 (onnxruntime-gpu wheel, CPU provider).
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxflex.runtime.cpu import describe_cpu

NP = {"u8": np.uint8, "s8": np.int8}
TPD = {"u8": TP.UINT8, "s8": TP.INT8}
INT8 = {"session.qdqisint8allowed": "1"}
rng = np.random.default_rng(0)


def session(model, opt_path=None, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, config=None, threads=2):
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.graph_optimization_level = threads, 1, level
    so.log_severity_level = 3
    if opt_path:
        so.optimized_model_filepath = opt_path
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def op_hist(path):
    c = collections.Counter()
    for n in onnx.load(path).graph.node:
        c[n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain.replace('com.microsoft', 'ms')}.{n.op_type}"] += 1
    return c


class G:
    def __init__(self):
        self.nodes, self.inits, self.k = [], [], 0

    def const(self, arr):
        self.k += 1
        self.inits.append(nh.from_array(np.asarray(arr), f"c{self.k}"))
        return f"c{self.k}"

    def node(self, op, ins, **attrs):
        self.k += 1
        out = f"{op}_{self.k}"
        self.nodes.append(h.make_node(op, ins, [out], name=out, **attrs))
        return out

    def q(self, x, s, zp, dt):
        return self.node("QuantizeLinear", [x, self.const(np.float32(s)), self.const(np.array(zp, NP[dt]))])

    def dq(self, x, s, zp, axis=None):
        kw = {} if axis is None else {"axis": axis}
        return self.node("DequantizeLinear", [x, self.const(np.asarray(s, np.float32)), self.const(zp)], **kw)

    def model(self, x_t, x_shape, y_t, y_shape):
        self.nodes[-1].output[0] = "y"
        g = h.make_graph(self.nodes, "g", [h.make_tensor_value_info("x", x_t, x_shape)],
                         [h.make_tensor_value_info("y", y_t, y_shape)], self.inits)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
        m.ir_version = 8
        return m


def quant_w(w, dt):
    """per-output-channel weights: int8 symmetric, or uint8 with zero point 128"""
    s = (np.abs(w).reshape(len(w), -1).max(1) / 127).astype(np.float32)
    q = np.round(w / s.reshape(-1, *[1] * (w.ndim - 1)))
    if dt == "s8":
        return np.clip(q, -127, 127).astype(np.int8), s, np.zeros(len(w), np.int8)
    return np.clip(q + 128, 0, 255).astype(np.uint8), s, np.full(len(w), 128, np.uint8)


def conv(kind="regular", act=None, in_dt="u8", w_dt="s8", out=("u8", 6 / 255, 0), C=32, HW=16, N=1, L=1,
         int_io=False):
    """x -> Q -> DQ -> [Conv(DQ(w), DQ(int32 b)) -> act -> Q -> DQ] x L.  out=None: float output, no Q."""
    g, k = G(), {"regular": 3, "dw": 3, "dw5": 5, "pw": 1}[kind]
    group = C if kind.startswith("dw") else 1
    sx, zx = (2 / 255, 128) if in_dt == "u8" else (1 / 127, 0)
    y = "x" if int_io else g.q("x", sx, zx, in_dt)
    for i in range(L):
        if i:
            sx, zx, in_dt = out[1], out[2], out[0]
        wq, ws, wz = quant_w(rng.normal(0, .1, (C, C // group, k, k)).astype(np.float32), w_dt)
        b = np.round(rng.normal(0, .1, C) / (sx * ws)).astype(np.int32)
        y = g.node("Conv", [g.dq(y, sx, np.array(zx, NP[in_dt])), g.dq(g.const(wq), ws, wz, 0),
                            g.dq(g.const(b), sx * ws, np.zeros(C, np.int32), 0)],
                   pads=[k // 2] * 4, group=group, kernel_shape=[k, k])
        if act == "Relu":
            y = g.node("Relu", [y])
        elif act == "Clip":
            y = g.node("Clip", [y, g.const(np.float32(0)), g.const(np.float32(6))])
        if out is not None:
            y = g.q(y, out[1], out[2], out[0])
            if not int_io and i == L - 1:
                y = g.dq(y, out[1], np.array(out[2], NP[out[0]]))
    shape = [N, C, HW, HW]
    out_t = TP.FLOAT if out is None or not int_io else TPD[out[0]]
    return g.model(TPD[in_dt] if int_io else TP.FLOAT, shape, out_t, shape)


def fp32_conv_chain(kind, C, HW, N, L=4):
    g, k = G(), {"regular": 3, "dw": 3, "dw5": 5, "pw": 1}[kind]
    group = C if kind.startswith("dw") else 1
    y = "x"
    for _ in range(L):
        y = g.node("Relu", [g.node("Conv", [y, g.const(rng.normal(0, .1, (C, C // group, k, k)).astype(np.float32)),
                                           g.const(rng.normal(0, .1, C).astype(np.float32))],
                                   pads=[k // 2] * 4, group=group, kernel_shape=[k, k])])
    return g.model(TP.FLOAT, [N, C, HW, HW], TP.FLOAT, [N, C, HW, HW])


PATTERNS = [
    ("(i) TensorRT layout: Q/DQ on inputs only, float out", dict(out=None)),
    ("(i') TensorRT layout + Relu, float out", dict(act="Relu", out=None)),
    ("(ii) u8 act, s8 w: Conv->Q(u8, zp 128)", dict(out=("u8", 12 / 255, 128))),
    ("(ii) s8 act zp 0, s8 w: Conv->Q(s8, zp 0)", dict(in_dt="s8", out=("s8", 6 / 127, 0))),
    ("(ii) u8 act, u8 w (zp 128)", dict(w_dt="u8", out=("u8", 12 / 255, 128))),
    ("(iii) Relu->Q(u8, zp 0)", dict(act="Relu", out=("u8", 6 / 255, 0))),
    ("(iii') Relu->Q(u8, zp 10)", dict(act="Relu", out=("u8", 6 / 255, 10))),
    ("(iv) Relu->Q(s8, zp -128), s8 in", dict(act="Relu", in_dt="s8", out=("s8", 6 / 255, -128))),
    ("(v) Clip(0,6)->Q(u8, 6/255, zp 0)", dict(act="Clip", out=("u8", 6 / 255, 0))),
    ("(v') Clip(0,6)->Q(u8, 8/255, zp 0) (Q range wider)", dict(act="Clip", out=("u8", 8 / 255, 0))),
    ("(v'') Clip(0,6)->Q(u8, 12/255, zp 128)", dict(act="Clip", out=("u8", 12 / 255, 128))),
    ("(vi) Relu->Q(s8, zp 0) symmetric, s8 in", dict(act="Relu", in_dt="s8", out=("s8", 6 / 127, 0))),
    ("(vi') Clip(0,6)->Q(s8, zp 0) symmetric, s8 in", dict(act="Clip", in_dt="s8", out=("s8", 6 / 127, 0))),
]


def fusion_table(tmp):
    print(f"{'pattern':55s} {'kind':8s} {'default':>16s} {'int8allowed=1':>16s}  err(default)")
    for name, kw in PATTERNS:
        for kind in ("regular", "dw"):
            cells, err = [], None
            for cfg in (None, INT8):
                m = conv(kind, **kw)
                p = os.path.join(tmp, f"p{len(os.listdir(tmp))}.onnx")
                s = session(m, p, config=cfg)
                hist = op_hist(p)
                fused = [k for k in hist if k.startswith(("ms.QLinear", "QLinear"))]
                cells.append(",".join(fused) or "-")
                if cfg is None:
                    x = {"x": rng.uniform(-1, 1, (1, 32, 16, 16)).astype(np.float32)}
                    ref = session(m, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
                    err = float(np.abs(s.run(None, x)[0] - ref.run(None, x)[0]).max())
            print(f"{name:55s} {kind:8s} {cells[0]:>16s} {cells[1]:>16s}  {err:.3g}")


def bench(cases, reps, warmup=3):
    for _ in range(warmup):
        for s, f in cases.values():
            s.run(None, f)
    t = {n: [] for n in cases}
    names = list(cases)
    for r in range(reps):  # interleaved, rotating order
        for n in names[r % len(names):] + names[:r % len(names)]:
            s, f = cases[n]
            t0 = time.perf_counter()
            s.run(None, f)
            t[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(v) for n, v in t.items()}


def kernel_timings(batch, reps):
    print(f"\nbatch {batch}: median ms of {reps} interleaved runs, 4-layer Conv+Relu chains, int8 I/O for quantized")
    for kind, C, HW in (("pw", 144, 56), ("dw", 144, 56), ("pw", 480, 14), ("dw5", 480, 14), ("regular", 32, 112)):
        cases = {"fp32": (session(fp32_conv_chain(kind, C, HW, batch)),
                          {"x": rng.uniform(-1, 1, (batch, C, HW, HW)).astype(np.float32)})}
        for tag, a, w, cfg in (("u8s8", "u8", "s8", None), ("s8s8", "s8", "s8", INT8), ("u8u8", "u8", "u8", None)):
            zmin = 0 if a == "u8" else -128
            m = conv(kind, act="Relu", in_dt=a, w_dt=w, out=(a, 6 / 255, zmin), C=C, HW=HW, N=batch, L=4, int_io=True)
            cases[tag] = (session(m, config=cfg), {"x": rng.integers(0, 100, (batch, C, HW, HW)).astype(NP[a])})
        med = bench(cases, reps)
        print(f"{kind:8s} C={C:<4d} {HW:3d}x{HW:<3d} " +
              "  ".join(f"{n}={v:7.2f} ({med['fp32'] / v:.2f}x)" for n, v in med.items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", action="store_true", help="also time Conv chains (FP32 vs int8 kernels)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, {describe_cpu()}")
    with tempfile.TemporaryDirectory() as tmp:
        fusion_table(tmp)
    if a.time:
        kernel_timings(a.batch, a.reps)


if __name__ == "__main__":
    main()
