"""Region-by-region weight reconstruction (DESIGN §1): FlexRound, AdaRound or round-to-nearest.

For each region in order:
  FP stream  x_fp --ONNX Runtime (region, FP32)--> y_fp        (the targets)
  Q  stream  x_q  --torch (region, quantizers)-->  y_hat       minimise ||y_hat - y_fp||^2
  then x_q <- quantized region(x_q), x_fp <- y_fp, and tensors no later region reads are freed.
A region of one weighted op takes its loss on the op's linear output in the exact Gram form, so an
iteration costs O(Cout*K^2) instead of a convolution forward and backward.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx
import torch

from ..graph import Graph, WeightSpec, ORT_IR_VERSION
from ..lift.ops import node_attrs
from ..lift.region import RegionModule
from ..quantizers import make_weight_quantizer
from ..quantizers.activation import ActQuantizer
from ..quantizers import gram as gram_mod
from ..runtime.session import target_providers
from ..store import TensorStore
from .partition import Region

log = logging.getLogger("onnxflex")
FLOAT_TYPES = (np.float32, np.float16, np.float64)
ROWS_PER_INPUT = 4  # see ReconstructPass._determined
EVAL_SAMPLES = 32  # held-out calibration samples on which RTN and learned region errors are compared
RANGE_SAMPLES = 64  # training samples on which each activation's range candidates are compared


@dataclass
class WeightResult:
    """What the QDQ writer deploys for one weight: integers and the grid size s1."""

    spec: WeightSpec
    integers: np.ndarray  # int32, weight layout
    scale: np.ndarray  # float32, [Cout] or 0-d
    bits: int


@dataclass
class RegionReport:
    index: int
    name: str
    kind: str
    nodes: int
    weights: list
    loss_form: str  # gram | direct | none
    rtn_mse: Optional[float] = None
    final_mse: Optional[float] = None  # of what is deployed (RTN when learning did not help)
    learned_mse: Optional[float] = None
    iters: int = 0
    seconds: float = 0.0
    status: str = ""
    act_ranges: dict = field(default_factory=dict)  # activation -> range method kept (calib auto)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------- ORT side

def region_model(graph: Graph, region: Region, outputs: list, input_dtypes: dict) -> onnx.ModelProto:
    """A standalone ONNX model holding only this region's nodes, for ONNX Runtime FP32 targets."""
    h = onnx.helper
    inputs = [h.make_tensor_value_info(t, h.np_dtype_to_tensor_dtype(np.dtype(input_dtypes[t])), None)
              for t in region.inputs]
    outs = [h.make_tensor_value_info(t, graph.elem_types.get(t, onnx.TensorProto.FLOAT), None) for t in outputs]
    used = {i for n in region.nodes for i in n.input if i in graph.initializers}
    g = h.make_graph(region.nodes, f"region_{region.index}", inputs, outs,
                     initializer=[graph.initializers[i] for i in sorted(used)])
    m = h.make_model(g, opset_imports=list(graph.model.opset_import))
    m.ir_version = ORT_IR_VERSION
    return m


def ort_outputs(sess, store: TensorStore, inputs: list, outputs: list, n: int, batch: int) -> dict:
    res = {o: [] for o in outputs}
    for s in range(0, n, batch):
        outs = sess.run(outputs, {i: np.asarray(store[i][s:s + batch]) for i in inputs})
        for o, v in zip(outputs, outs):
            res[o].append(v)
    return {o: np.concatenate(v) for o, v in res.items()}


# ----------------------------------------------------------------------------- torch side

def _to_torch(a, device):
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def stage(a: np.ndarray, device, chunk: int = 64) -> torch.Tensor:
    """A region's calibration tensor for training: shared with numpy on the CPU; on a GPU, copied
    once into device memory in pinned, batched host-to-device copies (then indexed on the device)."""
    if device.type != "cuda":
        return torch.from_numpy(np.ascontiguousarray(a))
    out = torch.empty(a.shape, dtype=torch.from_numpy(a[:1].copy()).dtype, device=device)
    for s in range(0, a.shape[0], chunk):
        out[s:s + chunk].copy_(torch.from_numpy(np.ascontiguousarray(a[s:s + chunk])).pin_memory(), non_blocking=True)
    torch.cuda.synchronize(device)
    return out


@torch.no_grad()
def torch_outputs(module, store: TensorStore, inputs: list, outputs: list, n: int, batch: int, device) -> dict:
    res = {o: [] for o in outputs}
    for s in range(0, n, batch):
        outs = module(*[_to_torch(store[i][s:s + batch], device) for i in inputs])
        for o in outputs:
            res[o].append(outs[o].detach().cpu().numpy())
    return {o: np.concatenate(v) for o, v in res.items()}


def token_weights(mask: Optional[torch.Tensor], out: torch.Tensor) -> Optional[torch.Tensor]:
    """The token mask broadcast over ``out`` when ``out`` is laid out [batch, seq, ...]; else None.
    Padded positions carry no meaning, so they are left out of every reconstruction loss."""
    if mask is None or out.dim() < 2 or tuple(out.shape[:2]) != tuple(mask.shape):
        return None
    return mask.reshape(tuple(mask.shape) + (1,) * (out.dim() - 2)).to(out.dtype)


def squared_error(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]):
    """(sum of squared errors over the counted positions, number of counted elements)."""
    d = (pred.float() - target.float()) ** 2
    w = token_weights(mask, d)
    if w is None:
        return d.sum(dtype=torch.float64), d.numel()
    return (d * w).sum(dtype=torch.float64), float(w.sum()) * (d[0, 0].numel())


@torch.no_grad()
def region_mse(module, store: TensorStore, inputs: list, targets: dict, samples: range, batch: int, device,
               token_mask: Optional[np.ndarray] = None) -> float:
    """Mean over the region's float outputs of the output MSE on ``samples`` (streamed)."""
    names = [o for o, t in targets.items() if t.dtype in FLOAT_TYPES]
    if not names:
        return 0.0
    sq = {o: 0.0 for o in names}
    count = {o: 0.0 for o in names}
    for s in range(samples.start, samples.stop, batch):
        e = min(s + batch, samples.stop)
        outs = module(*[_to_torch(store[i][s:e], device) for i in inputs])
        mask = None if token_mask is None else _to_torch(token_mask[s:e], device)
        for o in names:
            err, c = squared_error(outs[o], _to_torch(targets[o][s:e], device), mask)
            sq[o] += float(err)
            count[o] += c
    return float(np.mean([sq[o] / max(count[o], 1.0) for o in names]))


def out_by_in(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Weight as [Cout, K] (the Gram form's layout)."""
    if spec.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    return w if spec.out_axis == 0 else w.t()


def _conv_geometry(node, x_shape, w_shape):
    a = node_attrs(node)
    k = list(w_shape[2:])
    if len(k) != 2:
        return None
    strides = list(a.get("strides", [1, 1]))
    dil = list(a.get("dilations", [1, 1]))
    auto_pad = a.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for d in range(2):
            out = math.ceil(x_shape[2 + d] / strides[d])
            total = max(0, (out - 1) * strides[d] + (k[d] - 1) * dil[d] + 1 - x_shape[2 + d])
            lo = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            pads.append((lo, total - lo))
        (ht, hb), (wl, wr) = pads
    elif auto_pad == "VALID":
        ht = hb = wl = wr = 0
    else:
        p = list(a.get("pads", [0, 0, 0, 0]))
        ht, wl, hb, wr = p
    return dict(stride=tuple(strides), padding=(wl, wr, ht, hb), dilation=tuple(dil), groups=int(a.get("group", 1)))


def gram_applicable(graph: Graph, region: Region) -> bool:
    """Exact Gram form needs one weighted op whose data input is a region input and a linear output."""
    if len(region.weights) != 1:
        return False
    spec = region.weights[0]
    if spec.data_input not in region.inputs:
        return False
    node = graph.node_by_name[spec.node]
    if spec.op_type == "Gemm":
        a = node_attrs(node)
        return a.get("transA", 0) == 0 and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0
    if spec.op_type == "Conv":
        return len(graph.initializers[spec.weight].dims) == 4
    return True


# ----------------------------------------------------------------------------- the pass

@dataclass
class _Streams:
    fp: TensorStore
    q: TensorStore
    n: int
    n_train: int  # samples [0, n_train) train; the rest are held out to judge each region
    mask: Optional[np.ndarray] = None  # [n, seq] token mask (text): padded positions are not fitted


class ReconstructPass:
    """Learn each region's weight rounding against ONNX Runtime's FP32 region outputs."""

    def run(self, graph: Graph, ctx) -> Graph:
        from ..runtime.session import make_session
        from ..progress import progress_bar

        cfg = ctx.config
        device = torch.device(ctx.device)
        torch.manual_seed(cfg.seed)
        tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        if device.type == "cuda":
            # TF32 rounds conv/matmul inputs to 10 mantissa bits; that alone flips rounding decisions
            # against a CPU run, so it is opt-in (--tf32) rather than torch's cuDNN default
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        budget = cfg.max_memory * (1 << 30) / 2
        n = ctx.calibration.num_samples
        n_hold = min(EVAL_SAMPLES, n // 8) if n >= 16 else 0
        mask = ctx.calibration.token_mask
        streams = _Streams(TensorStore(budget), TensorStore(budget), n, n - n_hold,
                           None if mask is None else np.asarray(mask, np.float32))
        for name, arr in ctx.calibration.stacked().items():
            streams.fp.put(name, arr)
            streams.q.put(name, arr)
        regions = ctx.regions
        needed_after = self._needed_after(graph, regions)
        first_last = self._first_last(graph)
        act_modules = {t: ActQuantizer(p.scale, cfg.act_bits, learn=cfg.method != "rtn" and cfg.iters > 0 and cfg.act_lr > 0)
                       for t, p in (ctx.act_points or {}).items()}
        act_owner = self._act_owner(regions, ctx.act_points or {})
        ctx.weight_results, ctx.region_reports = {}, []
        bar = progress_bar(total=len(regions), desc="regions", unit="region", enable=cfg.progress)
        try:
            for region in regions:
                t0 = time.perf_counter()
                rep = self._run_region(graph, ctx, region, streams, act_modules, act_owner, first_last,
                                       make_session, device)
                rep.seconds = time.perf_counter() - t0
                ctx.region_reports.append(rep)
                keep = needed_after[region.index]
                streams.fp.keep_only(keep)
                streams.q.keep_only(keep)
                bar.set_postfix_str(f"{region.name} {rep.status}")
                bar.update(1)
            ctx.final_outputs = {o: (streams.fp[o], streams.q[o]) for o in graph.output_names if o in streams.fp}
            ctx.stream_peak_bytes = streams.fp.peak_bytes + streams.q.peak_bytes
        finally:
            bar.close()
            streams.fp.close()
            streams.q.close()
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        for t, m in act_modules.items():
            ctx.act_points[t].scale = float(m.scale())
        return graph

    # -- bookkeeping
    @staticmethod
    def _needed_after(graph: Graph, regions: list) -> list:
        later = set(graph.output_names)
        needed = [set() for _ in regions]
        for r in reversed(regions):
            needed[r.index] = set(later)
            later |= set(r.inputs)
        return needed

    @staticmethod
    def _first_last(graph: Graph) -> set:
        ws = graph.weighted_nodes()
        return {ws[0].node, ws[-1].node} if ws else set()

    @staticmethod
    def _act_owner(regions, points) -> dict:
        """The region where an activation step is learned: the one holding its first quantized reader."""
        owner = {}
        for r in regions:
            names = {n.name for n in r.nodes}
            for t, p in points.items():
                if t not in owner and p.consumers & names:
                    owner[t] = r.index
        return owner

    @staticmethod
    def _determined(graph, ctx, spec, n) -> bool:
        """Learn a weight's rounding only when the calibration data pins it down: at least
        ROWS_PER_INPUT rows (samples x output positions) per weight input (K). An FC layer fed by
        256 images has 256 rows for K = 1280 and would fit noise in the data's null space."""
        w = graph.initializers[spec.weight]
        cout = w.dims[spec.out_axis]
        k = int(np.prod(w.dims)) // max(1, cout)
        out = graph.node_by_name[spec.node].output[0]
        positions = ctx.tensor_sizes.get(out, cout) // max(1, cout)
        return n * max(1, positions) >= ROWS_PER_INPUT * k

    def _bits(self, spec, ctx, first_last):
        cfg = ctx.config
        if spec.node in first_last and cfg.first_last_bits:
            return max(cfg.first_last_bits, cfg.weight_bits)
        return cfg.weight_bits

    # -- one region
    def _run_region(self, graph, ctx, region, streams, act_modules, act_owner, first_last, make_session, device):
        cfg = ctx.config
        rep = RegionReport(region.index, region.name, region.kind, len(region.nodes),
                           [w.node for w in region.weights], "none")
        n = streams.n
        ebatch = max(cfg.batch_size, 32)
        in_dtypes = {t: streams.fp[t].dtype for t in region.inputs}
        lin_outputs = [graph.node_by_name[w.node].output[0] for w in region.weights]
        extra = [o for o in lin_outputs if o not in region.outputs]
        sess = make_session(region_model(graph, region, region.outputs + extra, in_dtypes),
                            target_providers(ctx.device))
        y_fp_all = ort_outputs(sess, streams.fp, region.inputs, region.outputs + extra, n, ebatch)
        y_fp = {o: y_fp_all[o] for o in region.outputs}

        if region.unsupported:
            rep.status = "fp32: no torch lifting for " + ",".join(region.unsupported)
            log.warning("region %s left in FP32: no torch lifting for %s", region.name, ", ".join(region.unsupported))
            y_q = ort_outputs(sess, streams.q, region.inputs, region.outputs, n, ebatch)
            self._store(streams, y_fp, y_q)
            return rep

        names = {nd.name for nd in region.nodes}
        act_quant = {t: m for t, m in act_modules.items() if ctx.act_points[t].consumers & names}
        act_consumers = {t: set(ctx.act_points[t].consumers) for t in act_quant}
        constants = graph.constants_for(region.nodes)

        def build(quantizers):
            return RegionModule(region.nodes, constants, region.inputs, region.outputs, graph.opset,
                                weight_overrides={w.weight: q for w, q in zip(region.weights, quantizers)},
                                act_quant=act_quant, act_consumers=act_consumers).to(device)

        if not region.weights:
            rep.status = "fp32: no quantized weights"
            y_q = torch_outputs(build([]), streams.q, region.inputs, region.outputs, n, ebatch, device)
            self._store(streams, y_fp, y_q)
            return rep

        determined = [self._determined(graph, ctx, w, n) for w in region.weights]

        def quantizers_for(method):
            return [make_weight_quantizer(method if ok else "rtn",
                                          torch.from_numpy(graph.array(w.weight).astype(np.float32)),
                                          self._bits(w, ctx, first_last), w.out_axis, w.in_axis,
                                          per_channel=cfg.granularity == "channel").to(device)
                    for w, ok in zip(region.weights, determined)]

        rtn_q = quantizers_for("rtn")
        for m in act_quant.values():
            m.eval()
        # RTN vs learned errors are compared on held-out calibration samples that training never
        # sees, so a region that overfits the calibration set keeps its RTN weights
        held = range(streams.n_train, n) if streams.n_train < n else range(0, min(n, EVAL_SAMPLES))
        rtn_module = build(rtn_q)  # reads the shared activation quantizers, so one module serves every candidate
        own = {t: m for t, m in act_quant.items() if act_owner.get(t) == region.index and ctx.act_points[t].candidates}
        sel = range(0, min(streams.n_train, RANGE_SAMPLES))
        for t, m in own.items():  # greedy, in graph order: each range given the ones chosen before it
            errs = {}
            for method, scale in ctx.act_points[t].candidates.items():
                m.step.data.fill_(scale)
                errs[method] = region_mse(rtn_module, streams.q, region.inputs, y_fp, sel, ebatch, device, streams.mask)
            best = min(errs, key=errs.get)
            m.step.data.fill_(ctx.act_points[t].candidates[best])
            rep.act_ranges[t] = best
        rep.rtn_mse = region_mse(rtn_module, streams.q, region.inputs, y_fp, held, ebatch, device, streams.mask)
        chosen, rep.status = rtn_q, "rtn"
        if cfg.method != "rtn" and cfg.iters > 0 and not any(determined):
            rep.status = "rtn: too few calibration rows to learn"
        elif cfg.method != "rtn" and cfg.iters > 0:
            learned = quantizers_for(cfg.method)
            own_acts = [m for t, m in act_quant.items() if act_owner.get(t) == region.index]
            module = build(learned)
            use_gram = gram_applicable(graph, region)
            rep.loss_form = "gram" if use_gram else "direct"
            rng = np.random.default_rng(cfg.seed + 7919 * region.index)
            gen = torch.Generator(device=device).manual_seed(cfg.seed + 7919 * region.index)
            try:
                if use_gram:
                    spec = region.weights[0]
                    act = act_quant.get(spec.data_input) if spec.node in act_consumers.get(spec.data_input, ()) else None
                    self._train_gram(graph, ctx, region, act, learned[0], streams, y_fp_all, rng, gen, device)
                else:
                    self._train_direct(ctx, region, module, learned, own_acts, streams, y_fp, rng, gen, device)
            except FloatingPointError:
                pass
            for q in learned:
                q.freeze()
            for m in act_quant.values():
                m.eval()
            rep.iters = cfg.iters
            rep.learned_mse = region_mse(module, streams.q, region.inputs, y_fp, held, ebatch, device, streams.mask)
            if not math.isfinite(rep.learned_mse):
                rep.status = "kept rtn: loss not finite"
            elif rep.learned_mse > rep.rtn_mse:
                rep.status = "kept rtn: loss above rtn"
            else:
                chosen, rep.status = learned, "learned"
            if rep.status.startswith("kept"):
                log.warning("region %s: %s", region.name, rep.status)
                rep.final_mse = rep.rtn_mse
            else:
                rep.final_mse = rep.learned_mse
        else:
            rep.final_mse = rep.rtn_mse
        y_q = torch_outputs(build(chosen), streams.q, region.inputs, region.outputs, n, ebatch, device)
        for w, q in zip(region.weights, chosen):
            ctx.weight_results[w.node] = WeightResult(
                w, q.integers().detach().cpu().numpy().astype(np.int32),
                q.scale().detach().cpu().numpy().astype(np.float32), self._bits(w, ctx, first_last))
        self._store(streams, y_fp, y_q)
        return rep

    @staticmethod
    def _store(streams, y_fp, y_q):
        for o, v in y_fp.items():
            streams.fp.put(o, v)
        for o, v in y_q.items():
            streams.q.put(o, v)

    @staticmethod
    def _mix(q, f, p, gen):
        """QDrop: element-wise, feed the FP input with probability p (dropping the quantization
        error upstream), the quantized-stream input otherwise. p = 0: always the quantized stream."""
        if p <= 0.0 or not q.is_floating_point():
            return q
        if p >= 1.0:
            return f
        drop = torch.rand(q.shape, generator=gen, device=q.device) < p
        return torch.where(drop, f, q)

    def _optimizer(self, ctx, weight_params, act_params):
        cfg = ctx.config
        groups = [{"params": weight_params, "lr": cfg.lr}]
        if act_params:
            groups.append({"params": act_params, "lr": cfg.act_lr})
        opt = torch.optim.Adam(groups)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters, eta_min=0.0)
        return opt, sched

    @staticmethod
    def _data_loss(pred, target, per_sample: bool, mask=None):
        """MSE over the counted (non-padding) positions; AdaRound's regulariser weight (lambda 0.01)
        is tuned for the per-sample sum instead."""
        d = (pred - target).pow(2)
        w = token_weights(mask, d)
        if w is not None:
            d = d * w
        if per_sample:
            return d.reshape(pred.shape[0], -1).sum(1).mean()
        if w is None:
            return d.mean()
        return d.sum() / (w.sum() * d[0, 0].numel()).clamp(min=1.0)

    def _fit(self, ctx, region, quantizers, act_params, batch_loss):
        """The one reconstruction loop: Adam with cosine decay on ``batch_loss(it)`` plus the
        quantizers' regularisers, with a progress bar and a guard against non-finite losses."""
        from ..progress import progress_bar

        cfg = ctx.config
        opt, sched = self._optimizer(ctx, [p for q in quantizers for p in q.parameters()], act_params)
        bar = progress_bar(total=cfg.iters, desc=f"  {region.name}", leave=False, enable=cfg.progress)
        for it in range(cfg.iters):
            for q in quantizers:
                q.set_progress(it / cfg.iters)
            loss = batch_loss(it) + sum(q.regularizer() for q in quantizers)
            if not torch.isfinite(loss):
                raise FloatingPointError
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if it % 25 == 0 or it == cfg.iters - 1:
                bar.set_postfix_str(f"loss {loss.item():.3g}")
            bar.update(1)
        bar.close()

    def _train_direct(self, ctx, region, module, quantizers, own_acts, streams, y_fp, rng, gen, device):
        """Block regions: real forward/backward passes of the lifted region on random mini-batches."""
        cfg = ctx.config
        n, bs = streams.n_train, min(cfg.batch_size, streams.n_train)
        for m in own_acts:
            m.train()
        float_outs = [o for o in region.outputs if y_fp[o].dtype in FLOAT_TYPES]
        per_sample = cfg.method == "adaround"
        xq = {t: stage(streams.q[t], device) for t in region.inputs}
        xfp = {t: stage(streams.fp[t], device) for t in region.inputs}
        ys = {o: stage(y_fp[o], device) for o in float_outs}
        masks = None if streams.mask is None else stage(streams.mask, device)

        def batch_loss(it):
            idx = torch.from_numpy(np.sort(rng.choice(n, bs, replace=False))).to(device)
            feeds = [self._mix(xq[t].index_select(0, idx), xfp[t].index_select(0, idx), cfg.drop_prob, gen)
                     for t in region.inputs]
            out = module(*feeds)
            m = None if masks is None else masks.index_select(0, idx)
            loss = sum(self._data_loss(out[o], ys[o].index_select(0, idx), per_sample, m) for o in float_outs)
            return loss / max(1, len(float_outs))

        self._fit(ctx, region, quantizers, [p for m in own_acts for p in m.parameters()], batch_loss)

    def _train_gram(self, graph, ctx, region, act, quantizer, streams, y_fp_all, rng, gen, device):
        """Layer regions: the exact quadratic form of the linear-output MSE, per cached mini-batch."""
        cfg = ctx.config
        spec = region.weights[0]
        node = graph.node_by_name[spec.node]
        w = torch.from_numpy(graph.array(spec.weight).astype(np.float32)).to(device)
        b = torch.from_numpy(graph.array(spec.bias).astype(np.float32)).to(device) if spec.bias else None
        y_lin = y_fp_all[node.output[0]]
        n, bs = streams.n_train, min(cfg.batch_size, streams.n_train)
        order = rng.permutation(n)
        stats = []
        with torch.no_grad():
            for s in range(0, n, bs):
                idx = np.sort(order[s:s + bs])
                x = self._mix(_to_torch(streams.q[spec.data_input][idx], device),
                              _to_torch(streams.fp[spec.data_input][idx], device), cfg.drop_prob, gen)
                if act is not None:
                    x = act(x)
                y = _to_torch(y_lin[idx], device)
                m = None if streams.mask is None else token_weights(_to_torch(streams.mask[idx], device), y)
                if m is not None:  # only the real tokens' rows enter G, C and ||R||^2
                    keep = m.reshape(m.shape[:2]) > 0
                    x, y = x[keep], y[keep]
                if spec.op_type == "Conv":
                    geo = _conv_geometry(node, tuple(x.shape), tuple(w.shape))
                    stats.append(gram_mod.conv_gram(x, w, b, y, **geo, accum_dtype=torch.float32))
                else:
                    st = gram_mod.linear_gram(x, out_by_in(w, spec), b, y, accum_dtype=torch.float32)
                    st.samples = len(idx)
                    stats.append(st)
        data = gram_mod.gram_sample_loss if cfg.method == "adaround" else gram_mod.gram_mse

        def batch_loss(it):
            return data(stats[it % len(stats)], out_by_in(quantizer() - w, spec))

        self._fit(ctx, region, [quantizer], [], batch_loss)

