"""Region-by-region weight reconstruction, the loop of DESIGN §1.

For each region in order:
  FP stream  x_fp --ONNX Runtime (region, FP32)--> y_fp        (the targets)
  Q  stream  x_q  --torch (region, quantizers)-->  y_hat       fit the method: minimise ||y_hat - y_fp||^2
  then x_q <- quantized region(x_q), x_fp <- y_fp, and tensors no later region reads are freed.
How a region is fitted is the method's entry (onnxflex/methods/); the parts live in
onnxflex/reconstruction/ (streams, losses, fit, activation ranges).
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from ..context import RegionReport, WeightResult
from ..errors import OnnxflexError
from ..graph import Graph
from ..lift.region import RegionModule
from ..methods import get_method
from ..progress import progress_bar
from ..quantizers.activation import ActQuantizer
from ..quantizers import gram as gram_mod
from ..quantizers.gptq import SEARCH_RATIOS
from ..reconstruction.fit import gram_applicable, gram_stats, train_direct, train_gram
from ..reconstruction.losses import region_mse
from ..reconstruction.ranges import choose_act_ranges
from ..reconstruction.streams import (Streams, later_inputs, needed_after, ort_outputs, region_model, samples_within, to_torch,
                                      torch_outputs)
from ..runtime.memory import trim
from ..runtime.session import make_session, target_providers
from ..store import TensorStore
from .base import Pass

log = logging.getLogger("onnxflex")
ROWS_PER_INPUT = 4  # see determined()
EVAL_SAMPLES = 32  # held-out calibration samples on which RTN and learned region errors are compared
RANGE_SAMPLES = 64  # training samples on which each activation's range candidates are compared
EVAL_CHUNK_BYTES = 32 << 20  # see eval_batch()
LIFT_TOLERANCE = 1e-3  # relative output error of the lifted FP32 region against onnxruntime's


def held_out_count(n: int, unit: int = 1) -> int:
    """How many of n calibration samples (the last ones) every fit holds out for the judge: EVAL_SAMPLES,
    at most an eighth, none below 16, in whole units of a graph locked to ``unit`` samples a run."""
    return (min(EVAL_SAMPLES, n // 8) if n >= 16 else 0) // unit * unit


def determined(graph: Graph, ctx, spec, n: int) -> bool:
    """Learn a weight's rounding only when the calibration data pins it down: at least
    ROWS_PER_INPUT rows (samples x output positions) per weight input (K). An FC layer fed by
    256 images has 256 rows for K = 1280 and would fit noise in the data's null space."""
    w = graph.initializers[spec.weight]
    cout = w.dims[spec.out_axis]
    k = int(np.prod(w.dims)) // max(1, cout)
    positions = ctx.tensor_sizes.get(graph.node_by_name[spec.node].output[0], cout) // max(1, cout)
    return n * max(1, positions) >= ROWS_PER_INPUT * k


def eval_batch(graph: Graph, sizes: dict, region, most: int) -> int:
    """Samples per forward pass (onnxruntime targets, torch outputs, held-out errors): as many as keep
    one pass's inputs and outputs within EVAL_CHUNK_BYTES, at most ``most``. The passes' copies (layout
    reorders, float32 reads of float16 streams) are several times one batch: at 32 images the widest
    CNN region took 1.2 GB above its streams. Independent of --max-memory, so results are too."""
    per_sample = sum(sizes.get(t, 0) for t in list(region.inputs) + list(region.outputs)) * 4
    return int(max(1, min(most, EVAL_CHUNK_BYTES // max(per_sample, 1))))


def max_scale(point, bits: int) -> float:
    """The largest step that keeps the grid's top inside the point's limit (a Clip(0, 6) that
    onnxruntime folds into the Q only while 255 * scale <= 6)."""
    if not math.isfinite(point.high_limit):
        return float("inf")
    top = (2 ** bits - 1 if not point.dtype.startswith("int") else 2 ** (bits - 1) - 1) - point.zero_point
    return point.high_limit / max(top, 1)


def act_owner(regions, points) -> dict:
    """The region where an activation step is learned: the one holding its first quantized reader."""
    owner = {}
    for r in regions:
        names = {n.name for n in r.nodes}
        for t, p in points.items():
            if t not in owner and p.consumers & names:
                owner[t] = r.index
    return owner


class ReconstructPass(Pass):
    """Fit each region's weight rounding against ONNX Runtime's FP32 region outputs."""

    name = "reconstruct"

    def run(self, graph: Graph, ctx) -> Graph:
        cfg = ctx.config
        device = torch.device(ctx.device)
        torch.manual_seed(cfg.seed)
        tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        if device.type == "cuda":
            # TF32 rounds conv/matmul inputs to 10 mantissa bits; that alone flips rounding decisions
            # against a CPU run, so it is opt-in (--tf32) rather than torch's cuDNN default
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        budget = cfg.max_memory * (1 << 30) / 2
        batching = ctx.batching
        unit = batching.locked_unit or 1
        n = ctx.calibration.num_samples // unit * unit  # a locked graph runs whole units
        if n == 0:
            raise OnnxflexError(f"the model runs {unit} samples at a time but the calibration data holds "
                                f"{ctx.calibration.num_samples}; give at least {unit} samples")
        n_hold = held_out_count(n, unit)
        mask = ctx.calibration.token_mask
        compact = cfg.stream_precision == "float16"
        streams = Streams(TensorStore(budget, compact=compact), TensorStore(budget, compact=compact), n, n - n_hold,
                          None if mask is None else np.asarray(mask[:n], np.float32), batching)
        # one span (no copy beyond the join) unless the graph is locked: then one feed per unit
        feeds = [ctx.calibration.joined(ctx.calibration.samples[s:e]) for s, e in streams.spans(range(n), n)]
        for name in ctx.calibration.input_names:
            arr = streams.layout(name).join([f[name] for f in feeds])
            streams.fp.put(name, arr, compact=False)  # the inputs as given: one array shared by both streams
            streams.q.put(name, arr, compact=False)
        del feeds
        keep_after = needed_after(graph, ctx.regions)
        learn_steps = ctx.method.fit == "adam" and ctx.method.learns_act_steps and cfg.iters > 0 and cfg.act_lr > 0
        act_modules = {t: ActQuantizer(p.scale, cfg.act_bits, learn=learn_steps, zero_point=p.zero_point,
                                       signed=p.dtype.startswith("int"), max_scale=max_scale(p, cfg.act_bits))
                       for t, p in ctx.act_points.items() if not p.same_as}
        act_modules.update({t: act_modules[p.same_as] for t, p in ctx.act_points.items() if p.same_as})
        # a point that shares another's qparams is learned where that one is
        owners = act_owner(ctx.regions, {t: p for t, p in ctx.act_points.items() if not p.same_as})
        first_last = graph.first_last_nodes(ctx.traits.decoder)
        ctx.weight_results, ctx.region_reports = {}, []
        read_later = later_inputs(ctx.regions)
        bar = progress_bar(total=len(ctx.regions), desc="regions", unit="region", enable=cfg.progress)
        try:
            for region in ctx.regions:
                t0 = time.perf_counter()
                run_streams = streams
                if not set(region.outputs) & read_later[region.index]:
                    # a terminal region (an LM head): nothing later reads its outputs, so it may be fitted
                    # on fewer samples rather than hold outputs beyond the budget
                    m = samples_within(graph, ctx.tensor_sizes, region.outputs, n, unit)
                    if m < n:
                        run_streams = streams.first(m)
                        ctx.notes.append(f"region {region.name} was fitted and checked on the first {m} of {n} calibration "
                                         f"samples: its outputs ({', '.join(region.outputs)}) would not fit in memory")
                rep = RegionRun(graph, ctx, region, run_streams, act_modules, owners, first_last, device).run()
                rep.seconds = time.perf_counter() - t0
                ctx.region_reports.append(rep)
                streams.keep_only(keep_after[region.index])
                trim()
                bar.set_postfix_str(f"{region.name} {rep.status}")
                bar.update(1)
            ctx.final_outputs = {o: (streams.fp.release(o), streams.q.release(o)) for o in graph.output_names
                                 if o in streams.fp and o in streams.q}
            ctx.stream_peak_bytes = streams.fp.peak_bytes + streams.q.peak_bytes
        finally:
            bar.close()
            streams.close()
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        for t, m in act_modules.items():
            ctx.act_points[t].scale = float(m.scale())
            ctx.act_points[t].zero_point = m.zero_point
        return graph


class RegionRun:
    """One region: FP targets from ORT, RTN baseline, the method's fit, the held-out judgement, and
    the region's quantized outputs pushed onto the Q stream."""

    def __init__(self, graph, ctx, region, streams, act_modules, owners, first_last, device):
        self.graph, self.ctx, self.region, self.streams, self.device = graph, ctx, region, streams, device
        self.cfg = ctx.config
        self.batch = streams.batching.batch(eval_batch(graph, ctx.tensor_sizes, region, max(self.cfg.batch_size, 32)))
        names = {nd.name for nd in region.nodes}
        self.act_quant = {t: m for t, m in act_modules.items() if ctx.act_points[t].consumers & names}
        self.own_acts = {t: m for t, m in self.act_quant.items() if owners.get(t) == region.index}
        self.first_last = first_last
        self.rtn = get_method("rtn")  # the baseline every region is judged against
        self.initial_grids = {}  # weight name -> its quantizers' initial scale (see quantizers())

    def bits(self, spec) -> int:
        cfg = self.cfg
        if spec.node in self.first_last and cfg.first_last_bits:
            return max(cfg.first_last_bits, cfg.weight_bits)
        return cfg.weight_bits

    def learns(self, spec) -> bool:
        """Whether the method learns this weight. A decoder's weight-only 8-bit weights (the LM head) are
        rounded to nearest: learning SmolLM2's 8-bit LM head (49152 x 576, W4 b128 run, 128 windows) took
        676 of 2647 s and moved perplexity only from 26.29 to 26.22 (README, "Decoder LM")."""
        return not (self.ctx.traits.decoder and not self.cfg.act_bits and self.bits(spec) >= 8)

    def grid_bits(self, spec) -> int:
        """Bits of the weight's integer grid: int8 weights under reduce_range learn on [-63, 63] (still
        stored as int8), the grid onnxruntime's u8s8 kernels take without saturating on AVX2 CPUs."""
        bits = self.bits(spec)
        return 7 if bits == 8 and self.cfg.reduce_range else bits

    def build(self, quantizers, constants: dict | None = None):
        """The region as a torch module with these weight quantizers; ``constants`` replace initializers
        (a corrected bias)."""
        r = self.region
        consts = self.graph.constants_for(r.nodes)
        consts.update(constants or {})
        return RegionModule(r.nodes, consts, r.inputs, r.outputs, self.graph.opset,
                            weight_overrides={w.weight: q for w, q in zip(r.weights, quantizers)},
                            act_quant=self.act_quant,
                            act_consumers={t: set(self.ctx.act_points[t].consumers) for t in self.act_quant}
                            ).to(self.device)

    def block_size(self, spec) -> int:
        """--block-size applies to 2-D (MatMul/Gemm) weights; conv weights keep per-channel scales."""
        return self.cfg.block_size if spec.op_type in ("MatMul", "Gemm") else 0

    def quantizers(self, method, learnable):
        """One quantizer per weight of the region; every method starts from the same initial grid,
        searched once per weight (the first quantizer's) and handed to the next ones."""
        out = []
        for w, ok in zip(self.region.weights, learnable):
            q = (method if ok else self.rtn).make_quantizer(
                torch.from_numpy(self.graph.array(w.weight).astype(np.float32)), self.grid_bits(w), w.out_axis,
                w.in_axis, per_channel=self.cfg.granularity == "channel", block_size=self.block_size(w),
                grid=self.ctx.target.weight_grid(self.cfg.act_bits, self.grid_bits(w), self.cfg.asymmetric),
                init_scale=self.initial_grids.get(w.weight))
            self.initial_grids.setdefault(w.weight, q.initial_grid())
            out.append(q.to(self.device))
        return out

    def run(self) -> RegionReport:
        graph, ctx, region, streams, cfg = self.graph, self.ctx, self.region, self.streams, self.cfg
        rep = RegionReport(region.index, region.name, region.kind, len(region.nodes),
                           [w.node for w in region.weights], "none")
        n = streams.n
        lin_outputs = [graph.node_by_name[w.node].output[0] for w in region.weights]
        method = ctx.method
        active = method.fit == "solve" or (method.fit == "adam" and cfg.iters > 0)
        # the weighted ops' own outputs, when a one-op region's Gram form will be fitted on them
        extra = [o for o in lin_outputs if o not in region.outputs] if active and gram_applicable(graph, region) else []
        in_dtypes = {t: streams.fp[t].dtype for t in region.inputs}
        sess = make_session(region_model(graph, region, region.outputs + extra, in_dtypes),
                            target_providers(ctx.device), spin=False, arena=False)
        y_fp_all = ort_outputs(sess, streams, streams.fp, region.inputs, region.outputs + extra, self.batch, streams.fp)
        y_fp = {o: y_fp_all[o] for o in region.outputs}

        problem = ("no torch lifting for " + ",".join(region.unsupported)) if region.unsupported else self.lift_problem(y_fp)
        if problem:
            rep.status = "fp32: " + problem
            log.warning("region %s left in FP32: %s", region.name, problem)
            names = {nd.name for nd in region.nodes}
            for p in ctx.act_points.values():  # nothing of this region reads quantized activations
                p.consumers -= names
            ort_outputs(sess, streams, streams.q, region.inputs, region.outputs, self.batch, streams.q)
            return rep
        if not region.weights:
            rep.status = "fp32: no quantized weights"
            torch_outputs(self.build([]), streams, streams.q, region.inputs, region.outputs, self.batch, self.device,
                          streams.q)
            return rep

        learned_at_all = [self.learns(w) for w in region.weights]
        learnable = [ok and (not cfg.row_guard or determined(graph, ctx, w, n)) for w, ok in zip(region.weights, learned_at_all)]
        rtn_q = self.quantizers(self.rtn, [False] * len(learnable))
        for m in self.act_quant.values():
            m.eval()
        # RTN vs learned errors are compared on held-out calibration samples that training never
        # sees, so a region that overfits the calibration set keeps its RTN weights
        held = range(streams.n_train, n) if streams.n_train < n else range(0, min(n, EVAL_SAMPLES))
        rtn_module = self.build(rtn_q)  # reads the shared activation quantizers: one module serves every candidate
        ranged = {t: m for t, m in self.own_acts.items() if ctx.act_points[t].candidates}
        rep.act_ranges = choose_act_ranges(ctx.act_points, ranged, rtn_module, streams, region.inputs, y_fp,
                                           range(0, min(streams.n_train, RANGE_SAMPLES)), self.batch, self.device)
        rep.rtn_mse = region_mse(rtn_module, streams, streams.q, region.inputs, y_fp, held, self.batch, self.device)
        rep.final_mse, chosen, rep.status = rep.rtn_mse, rtn_q, "rtn"
        bias = {}
        if active and not any(learned_at_all):
            rep.status = "rtn: 8-bit weight-only weights of a decoder are rounded to nearest"
        elif active and not any(learnable):
            rep.status = "rtn: too few calibration rows to learn"
        elif active and method.fit == "solve" and not gram_applicable(graph, region):
            rep.status = f"rtn: {method.name} needs a one-op region"
        elif active:
            learned, gptq, deployed = self.fit(method, learnable, y_fp, y_fp_all, rep, held)
            rep.learned_mse = region_mse(self.build(learned), streams, streams.q, region.inputs, y_fp, held, self.batch,
                                         self.device)
            if gptq is not None:
                rep.gptq_mse = region_mse(self.build(gptq), streams, streams.q, region.inputs, y_fp, held, self.batch,
                                          self.device)
            if not math.isfinite(rep.learned_mse):
                rep.status = "kept rtn: loss not finite"
            elif cfg.judge and rep.learned_mse > rep.rtn_mse:
                rep.status = "kept rtn: loss above rtn"
            else:
                rep.final_mse, chosen, rep.status = rep.learned_mse, learned, "learned"
            if cfg.judge and gptq is not None and rep.gptq_mse < rep.final_mse:
                rep.final_mse, chosen, rep.status = rep.gptq_mse, gptq, "kept gptq: loss below learned"
            if rep.status.startswith("kept rtn"):
                log.warning("region %s: %s", region.name, rep.status)
            bias = self.corrected_bias(chosen, deployed, y_fp, rep, held)
        torch_outputs(self.build(chosen, bias), streams, streams.q, region.inputs, region.outputs, self.batch, self.device,
                      streams.q)
        for w, q in zip(region.weights, chosen):
            ctx.weight_results[w.node] = WeightResult(
                w, q.stored_integers().detach().cpu().numpy().astype(np.int32),
                q.scale().detach().cpu().numpy().astype(np.float32), self.bits(w), q.block_size,
                q.zero_point().cpu().numpy() if q.grid == "asymmetric" else None,
                None if not bias else bias[w.bias])
        return rep

    def corrected_bias(self, chosen, stats, y_fp, rep, held) -> dict:
        """{bias name: corrected bias} for a one-op region whose op has a [Cout] bias, or {}: the bias that
        cancels the chosen rounding's mean output error on the deployed training inputs (``bias_shift``),
        kept only where it lowers the held-out error too. ``stats``: the fit's deployed-input statistics."""
        spec = self.region.weights[0] if len(self.region.weights) == 1 else None
        if not self.cfg.bias_correction or stats is None or spec is None or not spec.bias or stats.x_sum is None:
            return {}
        b = self.graph.array(spec.bias).astype(np.float32)
        w = torch.from_numpy(self.graph.array(spec.weight).astype(np.float32)).to(self.device)
        if b.shape != (stats.C.shape[0],):
            return {}
        with torch.no_grad():
            shift = gram_mod.bias_shift(stats, chosen[0]() - w, spec.out_axis).cpu().numpy()
        if not np.all(np.isfinite(shift)):
            return {}
        bias = {spec.bias: (b + shift).astype(np.float32)}
        rep.bias_mse = region_mse(self.build(chosen, bias), self.streams, self.streams.q, self.region.inputs, y_fp,
                                  held, self.batch, self.device)
        if not rep.bias_mse < rep.final_mse:
            return {}
        rep.final_mse, rep.bias_corrected = rep.bias_mse, True
        return bias

    def lift_problem(self, y_fp: dict) -> str | None:
        """Why the lifted torch region cannot stand in for ONNX Runtime's (None when it can): it fails
        to build or run, or its FP32 outputs differ from ONNX Runtime's on the first batch. A model
        we did not export may use an op attribute or dtype the lifting gets wrong; that region then
        stays FP32 instead of being quantized against a wrong simulation."""
        r, streams = self.region, self.streams
        s, e = next(streams.spans(range(streams.n), self.batch))
        try:
            module = RegionModule(r.nodes, self.graph.constants_for(r.nodes), r.inputs, r.outputs, self.graph.opset).to(self.device)
            with torch.no_grad():
                outs = module(*[to_torch(x, self.device) for x in streams.feed(streams.fp, r.inputs, s, e)])
        except Exception as ex:  # noqa: BLE001 - any failure of the lifting keeps the region in FP32
            return f"torch lifting failed ({type(ex).__name__}: {' '.join(str(ex).split())[:160]})"
        for o in r.outputs:
            want = np.asarray(streams.layout(o).slice(y_fp[o], s, e))
            got = outs[o].detach().cpu().numpy()
            if got.shape != want.shape:
                return f"lifted region gives {o!r} shape {list(got.shape)}, onnxruntime {list(want.shape)}"
            if want.dtype.kind == "f":
                err = float(np.linalg.norm((got - want).astype(np.float64)) / (np.linalg.norm(want.astype(np.float64)) + 1e-12))
                if not err <= (LIFT_TOLERANCE if want.dtype.itemsize >= 4 else 10 * LIFT_TOLERANCE):  # fp16 models
                    return f"lifted region differs from onnxruntime on {o!r} (relative error {err:.1e})"
            elif np.mean(got != want) > 1e-3:
                return f"lifted region differs from onnxruntime on {o!r}"
        return None

    def fit(self, method, learnable, y_fp, y_fp_all, rep, held) -> tuple:
        """The method's fit: Adam on the Gram form or on real passes, or a closed-form solve.
        Returns (the learned quantizers, GPTQ's for the judge to weigh or None, the deployed-input Gram
        statistics of a one-op region when GPTQ or bias correction asked for them, else None)."""
        graph, region, streams, cfg, device = self.graph, self.region, self.streams, self.cfg, self.device
        learned = self.quantizers(method, learnable)
        gptq = deployed = None
        seed = cfg.seed + 7919 * region.index
        rng = np.random.default_rng(seed)
        gen = torch.Generator(device=device).manual_seed(seed)
        desc = f"  {region.name}"
        holdout = None
        one_op = gram_applicable(graph, region)
        checked = method.checkable and cfg.checks > 0 and streams.n_train < streams.n
        # one module serves the real passes (blocks) and the held-out checks; a Gram fit without checks needs none
        module = self.build(learned) if checked or not one_op else None
        if checked:

            def holdout():
                with torch.no_grad():
                    return region_mse(module, streams, streams.q, region.inputs, y_fp, held, self.batch, device)
        try:
            if one_op:
                spec = region.weights[0]
                act = self.act_quant.get(spec.data_input)
                if act is not None and spec.node not in self.ctx.act_points[spec.data_input].consumers:
                    act = None
                drop = cfg.drop_prob if method.fit == "adam" else 0.0  # a solve fits the deployed input
                gptq_on = cfg.gptq_candidate if cfg.gptq_candidate is not None else not self.ctx.traits.decoder
                wants_gptq = gptq_on and method.fit == "adam" and bool(learnable[0])
                stats, deployed = gram_stats(graph, spec, act, streams, y_fp_all[graph.node_by_name[spec.node].output[0]],
                                             min(cfg.batch_size, streams.n_train), drop, rng, gen, device,
                                             wants_gptq or (cfg.bias_correction and bool(spec.bias)),
                                             cfg.gram_positions, cfg.bias_correction)
                if method.fit == "solve":
                    # with and without the input-error correction; the held-out samples choose
                    rep.loss_form = "closed-form"
                    total = sum(stats[1:], stats[0])
                    errs = {}
                    for corr in (False, True):
                        self.solve_gptq(learned[0], total, correct_inputs=corr)
                        errs[corr] = region_mse(self.build(learned), streams, streams.q, region.inputs, y_fp, held,
                                                self.batch, device)
                    best = min(errs, key=lambda c: (errs[c], not c))  # a tie keeps the corrected solve
                    if not best:  # the last solve was the corrected one
                        self.solve_gptq(learned[0], total, correct_inputs=False)
                    rep.loss_form = "closed-form" + ("" if best else " (classic)")
                else:
                    rep.loss_form = "gram"
                    train_gram(graph, spec, learned[0], stats, cfg, method.per_sample_loss, desc, device, holdout)
                    if wants_gptq:
                        gptq = self.gptq_candidate(deployed, learnable)
            else:
                rep.loss_form = "direct"
                train_direct(module, region, learned, list(self.own_acts.values()), streams, y_fp, cfg,
                             method.per_sample_loss, rng, gen, device, desc, holdout)
        except FloatingPointError:
            pass
        for q in learned:
            q.freeze()
        for m in self.act_quant.values():
            m.eval()
        rep.iters = cfg.iters
        return learned, gptq, deployed

    def solve_gptq(self, quantizer, stats, correct_inputs: bool):
        """Every GPTQ solve of the run, with its settings: ``--gptq-damp``, and the grids it tries per channel
        (``--gptq-grid-search``) or the initial one alone."""
        ratios = SEARCH_RATIOS if self.cfg.gptq_grid_search else (1.0,)
        return quantizer.solve(stats, self.cfg.gptq_damp, correct_inputs=correct_inputs, ratios=ratios)

    def gptq_candidate(self, deployed, learnable) -> list:
        """GPTQ's integers for a one-op region on the learned method's grid, from the deployed-input
        Gram statistics (the quantized stream alone, without QDrop's FP mixing: GPTQ fits the deployed
        input). One op at a time, GPTQ's error feedback reaches a lower loss than learned rounding on
        most of a CNN's layers and of a decoder's linears (README, "The judge"), so the judge weighs both."""
        gptq = self.quantizers(get_method("gptq"), learnable)
        try:
            self.solve_gptq(gptq[0], deployed, correct_inputs=True)
        except (ValueError, RuntimeError) as e:  # no output axis, or a Hessian beyond damping: no candidate
            log.info("region %s: no GPTQ candidate (%s)", self.region.name, e)
            return None
        return gptq
