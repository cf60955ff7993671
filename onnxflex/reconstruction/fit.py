"""How a region's rounding is fitted: one Adam loop (BRECQ's) over either real forward/backward
passes of the lifted region (blocks) or the exact Gram form of a one-op region's linear-output loss
(DESIGN §3), with QDrop mixing of the two streams' inputs."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..graph import Graph, WeightSpec
from ..lift.ops import node_attrs
from ..progress import progress_bar
from ..quantizers import gram as gram_mod
from .losses import FLOAT_TYPES, data_loss, token_weights
from .streams import stage, to_torch


def drop_mask(shape, p: float, gen, device) -> torch.Tensor:
    """Booleans, each True with probability p rounded to a multiple of 1/256: one random byte per
    element, cut from 64-bit draws. torch.rand's float per element and its compare took 2/3 of
    QDrop's mixing (9 % of a Lite0 fast run); these bytes cost 1/3 of that (bench/qdrop_mask.py)."""
    n = math.prod(shape)
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 7) // 8,), dtype=torch.int64, generator=gen, device=device)
    return words.view(torch.uint8)[:n].view(shape) < round(p * 256)


def mix(q, f, p, gen):
    """QDrop: element-wise, feed the FP input with probability p (dropping the quantization error
    upstream), the quantized-stream input otherwise. p = 0: always the quantized stream."""
    level = round(p * 256)  # drop_mask's grid
    if level <= 0 or not q.is_floating_point():
        return q
    if level >= 256:
        return f
    return torch.where(drop_mask(q.shape, p, gen, q.device), f, q)


def adam(groups) -> torch.optim.Optimizer:
    """Adam, as one fused kernel per step where this torch has it (CPU since torch 2.4): the
    per-parameter loop was 3.3 of ~50 ms in a SmolLM2 MLP linear's step, the fused one 0.7."""
    try:
        return torch.optim.Adam(groups, fused=True)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device it has no fused kernel for
        return torch.optim.Adam(groups)


def fit(quantizers, act_params, batch_loss, iters: int, lr: float, act_lr: float, desc: str, progress: bool,
        element_lr: float | None = None, holdout=None, checks: int = 0):
    """The one reconstruction loop: Adam with cosine decay on ``batch_loss(it)`` plus the
    quantizers' regularisers, with a progress bar and a guard against non-finite losses.

    ``element_lr``: learning rate of the per-weight parameters (FlexRound's S2), ``lr`` if None.
    ``holdout``: the region's error on held-out samples; measured ``checks`` times along the schedule,
    and the parameters with the lowest one are kept (early stopping: more iterations cannot end worse
    on held-out data than the best point seen)."""
    element = [p for q in quantizers for p in q.element_parameters()]
    ids = {id(p) for p in element}
    groups = [{"params": [p for q in quantizers for p in q.parameters() if id(p) not in ids], "lr": lr}]
    if element:
        groups.append({"params": element, "lr": lr if element_lr is None else element_lr})
    if act_params:
        groups.append({"params": act_params, "lr": act_lr})
    opt = adam([g for g in groups if g["params"]])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0)
    params = [p for g in groups for p in g["params"]]
    at = set() if holdout is None or checks <= 0 else {iters * (k + 1) // checks - 1 for k in range(checks)}
    best = (holdout(), [p.detach().clone() for p in params]) if at else None
    bar = progress_bar(total=iters, desc=desc, leave=False, enable=progress)
    try:
        for it in range(iters):
            for q in quantizers:
                q.set_progress(it / iters)
            loss = batch_loss(it) + sum(q.regularizer() for q in quantizers)
            if not torch.isfinite(loss):
                raise FloatingPointError
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if it % 25 == 0 or it == iters - 1:
                bar.set_postfix_str(f"loss {loss.item():.3g}")
            bar.update(1)
            if it in at:
                err = holdout()
                if err < best[0]:
                    best = (err, [p.detach().clone() for p in params])
    finally:
        bar.close()
    if best is not None:
        with torch.no_grad():
            for p, v in zip(params, best[1]):
                p.copy_(v)


def train_direct(module, region, quantizers, own_acts, streams, y_fp, cfg, per_sample, rng, gen, device, desc,
                 holdout=None):
    """Block regions: real forward/backward passes of the lifted region on random mini-batches."""
    n, bs = streams.n_train, min(cfg.batch_size, streams.n_train)
    for m in own_acts:
        m.train()
    float_outs = [o for o in region.outputs if y_fp[o].dtype in FLOAT_TYPES]
    xq = {t: stage(streams.q[t], device) for t in region.inputs}
    xfp = {t: stage(streams.fp[t], device) for t in region.inputs}
    ys = {o: stage(y_fp[o], device) for o in float_outs}
    masks = None if streams.mask is None else stage(streams.mask, device)

    def batch_loss(it):
        idx = streams.random_batch(rng, n, bs)
        feeds = [mix(to_torch(streams.layout(t).take(xq[t], idx), device), to_torch(streams.layout(t).take(xfp[t], idx), device),
                     cfg.drop_prob, gen) for t in region.inputs]
        out = module(*feeds)
        m = None if masks is None else to_torch(masks[idx], device)  # numpy on the CPU, a device tensor on a GPU
        loss = sum(data_loss(out[o], to_torch(streams.layout(o).take(ys[o], idx), device), m, per_sample) for o in float_outs)
        return loss / max(1, len(float_outs))

    fit(quantizers, [p for m in own_acts for p in m.parameters()], batch_loss, cfg.iters, cfg.lr, cfg.act_lr,
        desc, cfg.progress, cfg.lr * cfg.element_lr_scale, holdout, cfg.checks)


# ----------------------------------------------------------------------------- Gram form

def conv_geometry(node, x_shape, w_shape):
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
        ht, wl, hb, wr = list(a.get("pads", [0, 0, 0, 0]))
    return dict(stride=tuple(strides), padding=(wl, wr, ht, hb), dilation=tuple(dil), groups=int(a.get("group", 1)))


def gram_applicable(graph: Graph, region) -> bool:
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


def row_step(out_shape, positions: int, samples: int) -> int:
    """Every how many output rows of an [n, C, H, W] conv output the statistics read, so that the ``samples``
    fitted samples give at least about ``positions`` output positions together (0: every row). Neighbouring
    rows see nearly the same inputs: on 224 images, reading every 4th row of a 112x112 map costs the Gram
    estimate nothing measurable and its time 4x less. The budget is over all samples because with few of
    them every row counts (64 calibration crops lost 2-3 points of top-1 at a per-sample budget)."""
    if positions <= 0 or len(out_shape) != 4:
        return 1
    ho, wo = out_shape[2], out_shape[3]
    return max(1, min(ho, samples * ho * wo // positions))


def pointwise(node, x_shape, w_shape) -> bool:
    """A 1x1 conv of stride 1 without padding: output row i reads input row i alone."""
    geo = conv_geometry(node, tuple(x_shape), tuple(w_shape))
    return geo is not None and tuple(w_shape[2:]) == (1, 1) and geo["stride"] == (1, 1) and not any(geo["padding"])


@torch.no_grad()
def gram_stats(graph: Graph, spec: WeightSpec, act, streams, y_lin: np.ndarray, batch: int, drop_prob: float,
               rng, gen, device, deployed: bool = False, positions: int = 0, sums: bool = False) -> tuple:
    """Per mini-batch statistics (G = XᵀX, C = RᵀX, ||R||²) of the op's linear-output loss, with the
    op's input taken from the quantized stream (QDrop-mixed with the FP stream) through its Q/DQ.

    Returns (per-batch statistics, their deployed-input total or None). With ``deployed`` the total
    is of the quantized stream alone (no QDrop mixing: what GPTQ's candidate fits), made in the same
    pass over the streams rather than a second one. ``positions``: see ``row_step``; batch k reads the rows
    k mod step, k mod step + step, ... so the batches together cover every row. ``sums``: the column
    sums bias correction needs."""
    node = graph.node_by_name[spec.node]
    w = torch.from_numpy(graph.array(spec.weight).astype(np.float32)).to(device)
    b = torch.from_numpy(graph.array(spec.bias).astype(np.float32)).to(device) if spec.bias else None
    w_lin = w if spec.op_type == "Conv" else gram_mod.out_by_in(w, spec.out_axis)
    lin = streams.layout(node.output[0])
    stats, plain = [], None

    def one(x, y, n, keep, step, phase):
        if keep is not None:  # only the real tokens' rows enter G, C and ||R||²
            x = x[keep]
        if spec.op_type == "Conv":
            geo = conv_geometry(node, tuple(x.shape), tuple(w.shape))
            return gram_mod.conv_gram(x, w, b, y, **geo, accum_dtype=torch.float32, row_step=step, row_offset=phase,
                                      sums=sums)
        st = gram_mod.linear_gram(x, w_lin, b, y, accum_dtype=torch.float32)
        st.samples = n
        return st

    for k, idx in enumerate(streams.shuffled(rng, streams.n_train, batch)):
        xq = to_torch(streams.take(streams.q, spec.data_input, idx), device)
        xf = to_torch(streams.take(streams.fp, spec.data_input, idx), device)
        y = to_torch(lin.take(y_lin, idx), device)
        step = row_step(tuple(y.shape), positions, streams.n_train) if spec.op_type == "Conv" else 1
        phase, scale = k % step, 1.0
        if step > 1 and pointwise(node, xq.shape, w.shape):
            # a 1x1 conv reads just the rows it outputs: take them before the mixing and the fake-quant
            scale = y.shape[2] / len(range(phase, y.shape[2], step))
            xq, xf, y = xq[:, :, phase::step], xf[:, :, phase::step], y[:, :, phase::step]
            step, phase = 1, 0
        x = mix(xq, xf, drop_prob, gen)
        mixed = x is not xq
        if act is not None:
            x = act(x)
        m = None if streams.mask is None else token_weights(to_torch(streams.mask[idx], device), y)
        keep = None if m is None else m.reshape(m.shape[:2]) > 0
        if keep is not None:
            y = y[keep]
        stats.append(one(x, y, len(idx), keep, step, phase).scaled(scale))
        del x  # before the deployed input is made: one activation-sized buffer at a time
        if deployed and mixed:
            st = one(xq if act is None else act(xq), y, len(idx), keep, step, phase).scaled(scale)
            plain = st if plain is None else plain + st
    if not deployed:
        return stats, None
    return stats, plain if plain is not None else sum(stats[1:], stats[0])


def train_gram(graph: Graph, spec: WeightSpec, quantizer, stats: list, cfg, per_sample: bool, desc: str, device,
               holdout=None):
    """One-op regions: Adam on the exact quadratic form of the linear-output MSE, per cached mini-batch."""
    w = torch.from_numpy(graph.array(spec.weight).astype(np.float32)).to(device)
    data = gram_mod.gram_sample_loss if per_sample else gram_mod.gram_mse

    def batch_loss(it):
        return data(stats[it % len(stats)], quantizer() - w, spec.out_axis)

    fit([quantizer], [], batch_loss, cfg.iters, cfg.lr, cfg.act_lr, desc, cfg.progress, cfg.lr * cfg.element_lr_scale,
        holdout, cfg.checks)
