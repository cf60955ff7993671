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
        """The samples ``idx`` (sorted; a whole unit when stacked) of a joined array: numpy, torch or stored."""
        if self.stacked:
            return a[int(idx[0]) // self.unit]
        if self.axis is None:
            return a
        rows = np.asarray(idx) if self.per_sample == 1 else self.rows(idx)
        if hasattr(a, "index_select"):  # a torch tensor
            import torch

            return a.index_select(self.axis, torch.as_tensor(rows, device=a.device))
        return a[(slice(None),) * self.axis + (rows,)]  # numpy, or a stored array (onnxflex.store)

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


def _probe_outputs(model: onnx.ModelProto, graph: Graph) -> list:
    """ValueInfoProtos for the model's outputs and every intermediate whose type shape inference knows,
    in the order the graph computes them (so each probe group needs only a prefix of the graph)."""
    model_outputs = {o.name: o for o in model.graph.output}
    outs, have = [], set()
    for n in graph.nodes:
        for t in n.output:
            if t and t not in have and (t in model_outputs or graph.elem_types.get(t)):
                outs.append(model_outputs.get(t) or onnx.helper.make_tensor_value_info(t, graph.elem_types[t], None))
                have.add(t)
    return outs + [o for name, o in model_outputs.items() if name not in have]  # graph inputs or initializers


DIGEST = 4096  # elements of a probed tensor kept to tell a shared tensor from a per-sample one
PROBE_BYTES = 1 << 30  # outputs of one probe group (both runs): a decoder's every intermediate at once is 10+ GB
_FIRST_GROUP, _MIN_GROUP = 32, 8  # tensors in the probe's first group (later ones: by the bytes fetched)


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


def probe(model: onnx.ModelProto, feed_one: dict, feed_two: Optional[dict], input_axes: dict, unit: int = 1) -> Batching:
    """Run the model on one unit (``feed_one``) and on two (``feed_two``, None when there is only one
    sample) with every tensor as an output, and read each tensor's layout off the two results.

    onnxruntime computes every node on every run and keeps every graph output of the run alive, so a
    graph exposing all its intermediates held all of them at once (SmolLM2, 512 tokens: 8.3 GB peak).
    The intermediates are therefore fetched in groups of about PROBE_BYTES, each group its own session
    (the weights shared, not copied: runtime.session.SharedWeights) holding only the nodes the group
    needs, both runs per session; groups follow the graph's order, so the early ones run a short prefix. The
    sessions have symbolic batch dims; only when that breaks the graph on one unit is the model probed
    as exported, one unit at a time."""
    from .runtime.session import SharedWeights

    graph = Graph(model)
    outputs = _probe_outputs(model, graph)
    weights = SharedWeights(model)
    inputs = {n: (SHARED if a is None else Layout(a)) for n, a in input_axes.items()}
    one, two = {}, {}
    axes = input_axes if feed_two is not None else None
    failure = None if feed_two is not None else "one sample"
    start, count = 0, _FIRST_GROUP  # before any size is known
    while start < len(outputs):
        group = outputs[start:start + count]
        names = [o.name for o in group]
        try:
            sess = weights.session(group, batch_axes=axes, prune=True, arena=False)
            fetched = _fetch(sess, names, feed_one, one)
        except Exception:  # noqa: BLE001 - symbolic batch dims break this graph: probe it as exported
            if axes is None:
                raise
            axes, failure = None, "its graph does not run with a symbolic batch dimension"
            continue
        if failure is None:
            try:
                fetched += _fetch(sess, names, feed_two, two)
            except Exception as e:  # noqa: BLE001 - the graph cannot take a bigger batch: run it unit by unit
                failure = f"it does not run on a batch of {2 * unit} ({str(e).splitlines()[0][:160]})"
        del sess
        trim()
        start += len(group)
        count = int(min(2048, max(_MIN_GROUP, PROBE_BYTES * len(group) // max(fetched, 1))))
    result = Batching(shapes={t: v.shape for t, v in one.items()}, unit=unit, inputs=tuple(inputs))
    if feed_two is None:
        result.layouts = {**{t: _guess(v, unit) for t, v in one.items()}, **inputs}
        return result
    if failure is not None:
        return _locked(result, inputs, unit, failure)
    for t, v in one.items():
        lay = classify(v, two[t], unit)
        if lay is None:
            result.unknown[t] = (f"tensor {t!r} does not follow the batch ({list(v.shape)} for {unit} sample(s), "
                                 f"{list(two[t].shape)} for {2 * unit})")
        else:
            result.layouts[t] = lay
    result.layouts.update(inputs)
    return result


def _fetch(sess, names: list, feed: dict, into: dict) -> int:
    """Run ``sess`` for ``names``, keep a :class:`Seen` of each in ``into``; returns the bytes fetched."""
    total = 0
    for t, v in zip(names, sess.run(names, feed)):
        into[t] = Seen.of(v)
        total += getattr(v, "nbytes", 0)
    return total


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
