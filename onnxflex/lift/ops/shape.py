"""Shape manipulation: Shape, Reshape, Transpose, Slice, Gather, ScatterND, Trilu, Concat, Pad and the rest."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .core import NUM_OUTPUTS, _axis, _ints, _opt, _torch_pad, numpy_to_torch, register


@register("Reshape")
def reshape(inputs, attrs, opset):
    """0 copies the input dim (unless allowzero=1), -1 is inferred."""
    x = inputs[0]
    shape = _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


@register("Flatten")
def flatten(inputs, attrs, opset):
    x = inputs[0]
    axis = _axis(attrs.get("axis", 1), x.dim())
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


@register("Transpose")
def transpose(inputs, attrs, opset):
    x = inputs[0]
    perm = attrs.get("perm", list(range(x.dim()))[::-1])
    return [x.permute(perm)]


@register("Concat")
def concat(inputs, attrs, opset):
    return [torch.cat([t for t in inputs if t is not None], dim=attrs["axis"])]


@register("Split")
def split(inputs, attrs, opset):
    """Sizes from input (opset>=13) or attr; else num_outputs (ceil chunks, opset 18) or equal parts."""
    x = inputs[0]
    axis = _axis(attrs.get("axis", 0), x.dim())
    sizes = None
    if opset >= 13:
        s = _opt(inputs, 1)
        if s is not None and s.numel():
            sizes = _ints(s)
    elif attrs.get("split"):
        sizes = list(attrs["split"])
    d = x.shape[axis]
    if sizes is None:
        if "num_outputs" in attrs:
            n = attrs["num_outputs"]
            chunk = -(-d // n)
            sizes = [chunk] * (n - 1) + [d - chunk * (n - 1)]
        elif NUM_OUTPUTS in attrs:
            n = attrs[NUM_OUTPUTS]
            if d % n:
                raise ValueError(f"Split: dim {d} not divisible into {n} equal outputs")
            sizes = [d // n] * n
        else:
            raise ValueError("Split without sizes needs attrs['num_outputs'] or attrs[NUM_OUTPUTS]")
    return list(torch.split(x, sizes, dim=axis))


@register("Slice")
def slice_(inputs, attrs, opset):
    """starts/ends/axes/steps as inputs (opset>=10) or attrs; negative indices and out-of-range
    (e.g. INT64_MAX) ends are clamped per the ONNX spec; negative steps use index_select."""
    x = inputs[0]
    if opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes, steps = attrs.get("axes"), None
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if _opt(inputs, 3) is not None else None
        steps = _ints(inputs[4]) if _opt(inputs, 4) is not None else None
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for a, s, e, st in zip(axes, starts, ends, steps):
        a = _axis(a, x.dim())
        d = x.shape[a]
        if st == 0:
            raise ValueError("Slice step cannot be 0")
        s = s + d if s < 0 else s
        e = e + d if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), d), min(max(e, 0), d)
            x = x[(slice(None),) * a + (slice(s, e, st),)]
        else:
            s, e = min(max(s, 0), d - 1), min(max(e, -1), d - 1)
            x = x.index_select(a, torch.arange(s, e, st, device=x.device))
    return [x]


@register("Gather")
def gather(inputs, attrs, opset):
    """out.shape = data.shape[:axis] + indices.shape + data.shape[axis+1:]; negative indices wrap."""
    x, idx = inputs[0], inputs[1].long()
    axis = _axis(attrs.get("axis", 0), x.dim())
    d = x.shape[axis]
    idx = torch.where(idx < 0, idx + d, idx)
    out = x.index_select(axis, idx.reshape(-1))
    return [out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1 :]))]


@register("GatherND")
def gather_nd(inputs, attrs, opset):
    """indices[..., :k] address data's first k dims after ``batch_dims`` shared leading dims."""
    x, idx = inputs[0], inputs[1].long()
    b = int(attrs.get("batch_dims", 0))
    lead = tuple(x.shape[:b])
    nb = int(np.prod(lead)) if b else 1
    xs = x.reshape((nb,) + tuple(x.shape[b:]))
    ids = idx.reshape((nb,) + tuple(idx.shape[b:]))
    k = ids.shape[-1]
    ids = torch.where(ids < 0, ids + torch.tensor(xs.shape[1:1 + k], device=ids.device), ids)
    outs = [xs[i][tuple(ids[i][..., j] for j in range(k))] for i in range(nb)]
    out = torch.stack(outs)
    return [out.reshape(lead + tuple(out.shape[1:])) if b else out[0]]


@register("GatherElements")
def gather_elements(inputs, attrs, opset):
    x, idx = inputs[0], inputs[1].long()
    axis = _axis(attrs.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return [torch.gather(x, axis, idx)]


@register("ScatterND")
def scatter_nd(inputs, attrs, opset):
    """indices[..., :k] address data's first k dims; updates replace (or add/mul/max/min into) those
    slices. Done out of place on a (prod(first k dims), ...) view so gradients reach data and updates."""
    x, idx, upd = inputs[0], inputs[1].long(), inputs[2]
    k = idx.shape[-1]
    lead = x.shape[:k]
    idx = torch.where(idx < 0, idx + torch.tensor(lead, device=idx.device), idx)
    strides = torch.tensor([math.prod(lead[j + 1:]) for j in range(k)], dtype=torch.int64, device=idx.device)
    lin = (idx * strides).sum(-1).reshape(-1)
    flat = x.reshape((math.prod(lead),) + tuple(x.shape[k:]))
    u = upd.reshape((lin.numel(),) + tuple(x.shape[k:]))
    mode = attrs.get("reduction", "none")
    if mode == "none":
        out = flat.index_copy(0, lin, u)
    elif mode == "add":
        out = flat.index_add(0, lin, u)
    elif mode in ("mul", "max", "min"):
        with warnings.catch_warnings():  # "index_reduce() is in beta"
            warnings.simplefilter("ignore", UserWarning)
            out = flat.index_reduce(0, lin, u, {"mul": "prod", "max": "amax", "min": "amin"}[mode])
    else:
        raise NotImplementedError(f"ScatterND reduction {mode!r} has no torch lifting")
    return [out.reshape(x.shape)]


@register("Trilu")
def trilu(inputs, attrs, opset):
    """Upper (default) or lower triangle of the last two dims; optional k input shifts the diagonal."""
    x = inputs[0]
    kt = _opt(inputs, 1)
    k = _ints(kt)[0] if kt is not None else 0
    return [torch.triu(x, k) if attrs.get("upper", 1) else torch.tril(x, k)]


@register("Unsqueeze")
def unsqueeze(inputs, attrs, opset):
    """Axes (input from opset 13, attr before) index the *output* rank."""
    x = inputs[0]
    axes = _ints(inputs[1]) if opset >= 13 else list(attrs["axes"])
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return [x]


@register("Squeeze")
def squeeze(inputs, attrs, opset):
    """Axes (input from opset 13, attr before); none = drop every size-1 dim."""
    x = inputs[0]
    if opset >= 13:
        a = _opt(inputs, 1)
        axes = _ints(a) if a is not None else None
    else:
        axes = attrs.get("axes")
    if axes is None:
        return [x.squeeze()]
    return [x.squeeze(tuple(_axis(a, x.dim()) for a in axes))]


@register("Pad")
def pad(inputs, attrs, opset):
    """constant/reflect/edge/wrap; pads (and constant_value, axes) are inputs from opset 11.
    Non-constant modes are done with index_select so they work on any rank and any axis."""
    x = inputs[0]
    mode = attrs.get("mode", "constant")
    axes = None
    if opset < 11:
        pads, value = list(attrs["pads"]), attrs.get("value", 0.0)
    else:
        pads = _ints(inputs[1])
        cv = _opt(inputs, 2)
        value = cv.reshape(-1)[0].item() if cv is not None and cv.numel() else 0
        if _opt(inputs, 3) is not None:
            axes = _ints(inputs[3])
    r = x.dim()
    axes = [_axis(a, r) for a in axes] if axes is not None else list(range(r))
    n = len(axes)
    per_axis = {a: (pads[i], pads[i + n]) for i, a in enumerate(axes)}
    if mode == "constant":
        return [F.pad(x, _torch_pad([per_axis.get(a, (0, 0)) for a in range(r)]), value=value)]
    for a, (b, e) in per_axis.items():
        if b == 0 and e == 0:
            continue
        d = x.shape[a]
        i = torch.arange(-b, d + e, device=x.device)
        if mode == "edge":
            i = i.clamp(0, d - 1)
        elif mode == "reflect":
            period = 2 * (d - 1)
            if period == 0:
                i = torch.zeros_like(i)
            else:
                i = i.remainder(period)
                i = torch.where(i >= d, period - i, i)
        elif mode == "wrap":
            i = i.remainder(d)
        else:
            raise NotImplementedError(f"Pad mode {mode!r} has no torch lifting")
        x = x.index_select(a, i)
    return [x]


@register("Expand")
def expand(inputs, attrs, opset):
    """Bidirectional broadcast (a target dim of 1 keeps the input's dim), unlike Tensor.expand."""
    x = inputs[0]
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(inputs[1])))
    return [x.expand(shape)]


@register("Tile")
def tile(inputs, attrs, opset):
    return [inputs[0].repeat(_ints(inputs[1]))]


@register("Shape")
def shape(inputs, attrs, opset):
    """int64 shape on the input's device; start/end (opset 15) are clamped like Python slices."""
    x = inputs[0]
    dims = list(x.shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return [torch.tensor(dims[start:end], dtype=torch.int64, device=x.device)]


@register("Size")
def size(inputs, attrs, opset):
    return [torch.tensor(inputs[0].numel(), dtype=torch.int64, device=inputs[0].device)]


@register("ConstantOfShape")
def constant_of_shape(inputs, attrs, opset):
    shp = inputs[0]
    value = attrs.get("value")
    v = numpy_to_torch(value if value is not None else np.zeros(1, np.float32)).reshape(-1)[0]
    return [torch.full(_ints(shp), v.item(), dtype=v.dtype, device=shp.device)]


@register("Range")
def range_(inputs, attrs, opset):
    start, limit, delta = inputs
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)]


@register("Constant")
def constant(inputs, attrs, opset):
    """Value from whichever value* attribute is set (on CPU; RegionModule turns these into buffers)."""
    if "value" in attrs:
        return [numpy_to_torch(attrs["value"])]
    if "value_float" in attrs:
        return [torch.tensor(attrs["value_float"], dtype=torch.float32)]
    if "value_floats" in attrs:
        return [torch.tensor(list(attrs["value_floats"]), dtype=torch.float32)]
    if "value_int" in attrs:
        return [torch.tensor(attrs["value_int"], dtype=torch.int64)]
    if "value_ints" in attrs:
        return [torch.tensor(list(attrs["value_ints"]), dtype=torch.int64)]
    raise NotImplementedError(f"Constant with attributes {sorted(attrs)} has no torch lifting")
