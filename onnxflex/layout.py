"""Where the calibration samples sit in each tensor of the graph: its batch layout.

The reconstruction streams (DESIGN §1) hold every calibration sample of each live tensor, joined along
the batch. Exported graphs do not all keep the batch on axis 0: a recurrent state is [2, batch, 128],
an LSTM output [seq, dirs, batch, hidden], a detection head's Reshape([1, -1, 6]) folds the batch
into axis 1, shape arithmetic (the pads of an explicit F.pad) has no batch at all, and some graphs fix
the batch. One probe of the FP32 model in ONNX Runtime, on one and on two batch units, tells each
tensor's layout; a graph whose tensors do not follow the batch (it mixes samples, or a fixed batch
cannot grow) is *locked*: it runs one unit (its fixed batch, else one sample) at a time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import numpy as np
import onnx

from .graph import Graph
from .runtime.memory import trim

log = logging.getLogger("onnxflex")


@dataclass(frozen=True)
class Layout:
    """How one tensor holds samples. ``axis``: the batch axis, each sample ``per_sample`` rows long on it
    (a Reshape that merged the batch into a longer axis keeps samples contiguous). ``axis`` None: one
    value for every sample (shape arithmetic, a scalar input). ``stacked``: a locked graph's tensor, one
    entry per unit of ``unit`` samples on a new leading axis."""

    axis: Optional[int] = 0
    per_sample: int = 1
    stacked: bool = False
    unit: int = 1

    def rows(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        return (idx[:, None] * self.per_sample + np.arange(self.per_sample)).reshape(-1)

    def take(self, a, idx):
        """The samples ``idx`` (sorted; a whole unit when stacked) of a joined array, numpy or torch."""
        if self.stacked:
            return a[int(idx[0]) // self.unit]
        if self.axis is None:
            return a
        rows = np.asarray(idx) if self.per_sample == 1 else self.rows(idx)
        if isinstance(a, np.ndarray):
            return a[rows] if self.axis == 0 else np.take(a, rows, axis=self.axis)
        import torch

        return a.index_select(self.axis, torch.as_tensor(rows, device=a.device))

    def slice(self, a, start: int, stop: int):
        """Samples [start, stop) of a joined array."""
        if self.stacked:
            return a[start // self.unit]
        if self.axis is None:
            return a
        return a[(slice(None),) * self.axis + (slice(start * self.per_sample, stop * self.per_sample),)]

    def join(self, parts: list):
        """Per-batch results (in sample order) -> the joined array the streams keep."""
        if self.stacked:
            if all(p.shape == parts[0].shape for p in parts):
                return np.stack(parts)
            out = np.empty(len(parts), object)  # a data-dependent shape (e.g. after NonZero) per unit
            out[:] = parts
            return out
        if self.axis is None or len(parts) == 1:
            return parts[0]
        return np.concatenate(parts, axis=self.axis)

    def count(self, a) -> int:
        """How many samples a joined array holds (None-axis arrays hold all of them: 0 here)."""
        if self.stacked:
            return len(a) * self.unit
        return 0 if self.axis is None else a.shape[self.axis] // self.per_sample


BATCH0 = Layout(0)
SHARED = Layout(None)


@dataclass
class Batching:
    """The probe's answer: each tensor's layout, and the unit a locked graph runs in (None: free)."""

    layouts: dict = field(default_factory=dict)
    locked_unit: Optional[int] = None
    reason: str = ""
    shapes: dict = field(default_factory=dict)  # tensor -> shape for one unit (sizes the regions)
    unit: int = 1
    unknown: dict = field(default_factory=dict)  # tensor -> why it follows no batch (harmless inside a region)
    inputs: tuple = ()  # the graph inputs (their layouts come from the calibration data)

    def settle(self, crossing) -> None:
        """Lock the graph when a tensor that streams keep between regions follows no batch (tensors
        that live inside one region, such as a Shape output, may carry the batch size itself)."""
        bad = [t for t in crossing if t in self.unknown]
        if bad and not self.locked_unit:
            _locked(self, {t: v for t, v in self.layouts.items() if t in self.inputs}, self.unit, self.unknown[bad[0]])


    def layout(self, name: str) -> Layout:
        if name in self.layouts:
            return self.layouts[name]
        return Layout(None, stacked=True, unit=self.locked_unit) if self.locked_unit else BATCH0

    def batch(self, wanted: int) -> int:
        """The number of samples a run may take at once."""
        return self.locked_unit or wanted


def _typed_outputs(model: onnx.ModelProto, graph: Graph) -> tuple[onnx.ModelProto, list]:
    """A copy of ``model`` that outputs every intermediate tensor whose type shape inference knows."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    names = list(have)
    for n in graph.nodes:
        for t in n.output:
            if t and t not in have and graph.elem_types.get(t):
                m.graph.output.append(onnx.helper.make_tensor_value_info(t, graph.elem_types[t], None))
                have.add(t)
                names.append(t)
    return m, [o.name for o in m.graph.output]


def _relaxed(model: onnx.ModelProto, axes: dict) -> onnx.ModelProto:
    """The model with each input's batch dim made symbolic, so ONNX Runtime accepts a bigger batch."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        axis = axes.get(vi.name)
        dims = vi.type.tensor_type.shape.dim
        if axis is not None and vi.type.tensor_type.HasField("shape") and axis < len(dims):
            dims[axis].Clear()
            dims[axis].dim_param = "onnxflex_batch"
    return m


DIGEST = 4096  # elements of a probed tensor kept to tell a shared tensor from a per-sample one
PROBE_BYTES = 256 << 20  # outputs fetched per probe run: a decoder's every intermediate at once is 10+ GB


@dataclass(frozen=True)
class Seen:
    """What the probe keeps of a tensor: its shape and up to DIGEST evenly spaced elements."""

    shape: tuple
    sample: np.ndarray

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @classmethod
    def of(cls, v) -> "Seen":
        if isinstance(v, Seen):
            return v
        v = np.asarray(v)
        flat = v.reshape(-1)
        if flat.size > DIGEST:
            flat = flat[np.linspace(0, flat.size - 1, DIGEST).astype(np.int64)]
        return cls(tuple(v.shape), flat.copy())


def _same(a: Seen, b: Seen) -> bool:
    if a.shape != b.shape:
        return False
    x, y = a.sample, b.sample
    if x.dtype.kind == "f":
        scale = float(np.max(np.abs(x))) if x.size else 0.0
        return bool(np.allclose(x, y, rtol=1e-3, atol=1e-4 * max(scale, 1e-6)))
    return bool(np.array_equal(x, y))


def classify(one, two, unit: int) -> Optional[Layout]:
    """A tensor's layout from its value on one unit and on two units (arrays, or what the probe kept
    of them); None when it follows no batch."""
    one, two = Seen.of(one), Seen.of(two)
    if one.shape == two.shape:
        return SHARED if _same(one, two) else None
    if one.ndim != two.ndim:
        return None
    diff = [k for k, (a, b) in enumerate(zip(one.shape, two.shape)) if a != b]
    if len(diff) != 1 or two.shape[diff[0]] != 2 * one.shape[diff[0]] or one.shape[diff[0]] % unit:
        return None
    k = diff[0]
    return Layout(k, one.shape[k] // unit)


def probe(model: onnx.ModelProto, feed_one: dict, feed_two: Optional[dict], input_axes: dict, unit: int = 1,
          session_factory=None) -> Batching:
    """Run the model on one unit (``feed_one``) and on two (``feed_two``, None when there is only one
    sample) with every tensor as an output, and read each tensor's layout off the two results."""
    from .runtime.session import make_session

    make = session_factory or partial(make_session, arena=False)
    graph = Graph(model)
    probed, names = _typed_outputs(model, graph)
    one = _run_seen(make(probed), names, feed_one)
    inputs = {n: (SHARED if a is None else Layout(a)) for n, a in input_axes.items()}
    result = Batching(shapes={t: v.shape for t, v in one.items()}, unit=unit, inputs=tuple(inputs))
    if feed_two is None:
        result.layouts = {**{t: _guess(v, unit) for t, v in one.items()}, **inputs}
        return result
    try:
        nbytes = {t: 2 * int(np.prod(v.shape)) * v.sample.itemsize for t, v in one.items()}
        two = _run_seen(make(_relaxed(probed, input_axes)), names, feed_two, nbytes)
    except Exception as e:  # noqa: BLE001 - the graph cannot take a bigger batch: run it unit by unit
        return _locked(result, inputs, unit, f"it does not run on a batch of {2 * unit} ({str(e).splitlines()[0][:160]})")
    for t, v in one.items():
        lay = classify(v, two[t], unit)
        if lay is None:
            result.unknown[t] = (f"tensor {t!r} does not follow the batch ({list(v.shape)} for {unit} sample(s), "
                                 f"{list(two[t].shape)} for {2 * unit})")
        else:
            result.layouts[t] = lay
    result.layouts.update(inputs)
    return result


def _run_seen(sess, names: list, feed: dict, nbytes: Optional[dict] = None) -> dict:
    """{tensor: Seen} for every name, fetched from one session a group at a time (groups of about
    PROBE_BYTES when sizes are known, else of 512 tensors) so all intermediates never coexist."""
    out, group, size = {}, [], 0

    def flush():
        for t, v in zip(group, sess.run(group, feed)):
            out[t] = Seen.of(v)
        trim()

    for t in names:
        group.append(t)
        size += nbytes[t] if nbytes else 0
        if (nbytes and size >= PROBE_BYTES) or (not nbytes and len(group) >= 512):
            flush()
            group, size = [], 0
    if group:
        flush()
    return out


def _guess(v: Seen, unit: int) -> Layout:
    """With a single sample there is nothing to compare: batch on axis 0 where its size is the unit."""
    return BATCH0 if v.ndim and v.shape[0] == unit else SHARED


def _locked(result: Batching, inputs: dict, unit: int, why: str) -> Batching:
    log.info("calibration runs %d sample(s) at a time: %s", unit, why)
    result.locked_unit, result.reason = unit, why
    # inputs too are kept one unit feed at a time: their axis 0 need not be a batch (a [time, f] sequence)
    result.layouts = {n: lay if lay == SHARED else Layout(None, stacked=True, unit=unit) for n, lay in inputs.items()}
    return result


def probe_calibration(model: onnx.ModelProto, calibration) -> Batching:
    """:func:`probe` on the first calibration samples: one unit (the fixed batch, else one sample) and
    two units (the first sample repeated when there are not enough)."""
    from .errors import OnnxflexError

    unit = calibration.static_batch or 1
    samples = calibration.samples
    first = samples[:unit] if len(samples) >= unit else samples
    second = samples[:2 * unit] if len(samples) >= 2 * unit else first + first
    axes = calibration.batch_axes
    try:
        return probe(model, calibration.joined(first), calibration.joined(second), axes, unit)
    except OnnxflexError:
        raise
    except Exception as e:  # noqa: BLE001 - the FP32 model itself does not run on the data
        raise OnnxflexError(f"the model does not run in ONNX Runtime on the first calibration sample(s) "
                            f"({' '.join(str(e).split())[:300]}); check that the calibration inputs match what the "
                            "model expects (shapes, dtypes, value ranges)") from None


def sizes_per_sample(batching: Batching) -> dict:
    """tensor -> elements per sample, from the probe's shapes (sizes the regions' live sets)."""
    return {t: int(np.prod(s)) // max(1, batching.unit) for t, s in batching.shapes.items()}
