"""The :class:`CalibrationSet` every source becomes, and the per-input checks that build its samples.

Samples are validated against the model's input specs ({name: (shape, dtype)}) here, so a bad shape or
dtype fails with a message naming the input, not deep inside onnxruntime.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import OnnxflexError


def is_static(d: Any) -> bool:
    """True for a fixed (positive integer) dimension; dim names and None are dynamic."""
    return isinstance(d, (int, np.integer)) and not isinstance(d, bool) and int(d) > 0


def fmt_shape(shape: Sequence[Any] | None) -> str:
    """A shape as messages show it: ``[?,3,224,224]``, dim names kept."""
    if shape is None:
        return "[?]"
    return "[" + ",".join(str(int(d)) if is_static(d) else (str(d) if isinstance(d, str) and d else "?") for d in shape) + "]"


def norm_specs(input_specs: dict) -> dict[str, tuple[list | None, np.dtype]]:
    """{name: (shape, dtype)} with list shapes and numpy dtypes; refuses a model without inputs."""
    if not input_specs:
        raise OnnxflexError("the model has no inputs to feed; check the model file")
    out = {}
    for name, spec in input_specs.items():
        shape, dtype = spec
        out[name] = (None if shape is None else list(shape), np.dtype(dtype))
    return out


def batch_axes(specs: dict) -> dict[str, int | None]:
    """input -> the axis that holds its samples; None for a rank-0 input (a constant of the feed, such
    as a sample rate). The batch is the first input's axis 0; another input carries it on the axis with
    the same dim name (a recurrent state ``[2, batch, 128]``), on axis 0 when that is dynamic, else on
    its first dim matching the first input's batch (or its first dynamic dim): exporters often leave
    dims unnamed, and a state's leading 2 is the layer count, not the batch."""
    ranked = [s for s, _ in specs.values() if s]
    ref = ranked[0][0] if ranked else None
    axes = {}
    for name, (shape, _) in specs.items():
        if shape is None:
            axes[name] = 0
        elif not shape:
            axes[name] = None
        elif isinstance(ref, str) and ref and ref in shape:
            axes[name] = shape.index(ref)
        elif not is_static(shape[0]) or (is_static(ref) and int(shape[0]) == int(ref)):
            axes[name] = 0
        else:
            same = [k for k, d in enumerate(shape) if is_static(ref) and is_static(d) and int(d) == int(ref)]
            dynamic = [k for k, d in enumerate(shape) if not is_static(d)]
            axes[name] = (same or dynamic or [0])[0]
    return axes


def static_batch(specs: dict) -> int | None:
    """The model's fixed batch size (a static dim on some input's batch axis), or None when dynamic."""
    for name, axis in batch_axes(specs).items():
        shape = specs[name][0]
        if axis is not None and shape and is_static(shape[axis]):
            return int(shape[axis])
    return None


def _cast(name: str, arr: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    """Cast to the model dtype when it cannot change meaning: float->float, int->int (values in range),
    bool->bool.  Anything across kinds (e.g. uint8 pixels into a float model) is refused, because the
    fix (normalisation, tokenisation) is the user's to make."""
    src = arr.dtype
    if src == dtype:
        return arr
    kind = lambda d: "f" if d.kind == "f" else ("i" if d.kind in "iu" else d.kind)  # noqa: E731
    if kind(src) == kind(dtype) == "f":
        return arr.astype(dtype)
    if kind(src) == kind(dtype) == "i":
        if arr.size:
            info = np.iinfo(dtype)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise OnnxflexError(
                    f"input {name!r} from {where}: values {lo}..{hi} do not fit the model's {dtype}; pass in-range {dtype} data"
                )
        return arr.astype(dtype)
    raise OnnxflexError(
        f"input {name!r} from {where} is {src} but the model expects {dtype}; convert the array to {dtype} "
        "(with the model's preprocessing) before passing it"
    )


def split_samples(name: str, arr: Any, spec: tuple[list | None, np.dtype], where: str,
                  axis: int | None = 0) -> list[np.ndarray]:
    """Validate one input's array against the spec -> list of per-sample arrays with a batch dim of 1
    on ``axis``. A rank-0 input (``axis`` None) is one constant of the feed: a one-item list."""
    shape, dtype = spec
    if not isinstance(arr, np.ndarray):
        try:
            arr = np.asarray(arr)
        except Exception as e:
            raise OnnxflexError(f"input {name!r} from {where} is not an array ({type(arr).__name__}: {e}); pass numpy arrays") from None
    if arr.dtype == object:
        raise OnnxflexError(f"input {name!r} from {where} is an object array; pass numeric numpy arrays")
    arr = _cast(name, arr, dtype, where)
    if axis is None:
        if arr.size != 1:
            raise OnnxflexError(f"input {name!r} from {where} has shape {list(arr.shape)} but the model expects a scalar; "
                                "pass one value (the same for every sample)")
        return [arr.reshape(())]
    if shape is not None:
        rank = len(shape)
        if arr.ndim == rank - 1:
            arr = np.expand_dims(arr, axis)
        if arr.ndim != rank:
            raise OnnxflexError(
                f"input {name!r} from {where} has shape {list(arr.shape)} but the model expects {fmt_shape(shape)} "
                f"(rank {rank}, or {rank - 1} without the batch dim); reshape the data"
            )
        bad = [i for i in range(rank) if i != axis and is_static(shape[i]) and arr.shape[i] != int(shape[i])]
        if bad:
            raise OnnxflexError(
                f"input {name!r} from {where} has shape {list(arr.shape)} but the model expects {fmt_shape(shape)}; "
                f"dim {bad[0]} should be {int(shape[bad[0]])}"
            )
    elif arr.ndim == 0:
        arr = arr[None]
    return [np.take(arr, [i], axis=axis) for i in range(arr.shape[axis])]


@dataclass
class CalibrationSet:
    """Calibration data as one feed dict per sample (arrays with a batch dim of 1 on the input's batch
    axis, see :func:`batch_axes`; rank-0 inputs as they are).

    Kept per sample so passes can re-batch freely; :meth:`batches` and :meth:`stacked` concatenate.
    ``files`` lists the image files behind the samples (image sources only), in sample order.
    """

    samples: list[dict[str, np.ndarray]]
    input_names: list[str]
    source: str = ""
    files: list[Path] | None = None
    static_batch: int | None = None  # the model's fixed batch dim, if any
    input_specs: dict = field(default_factory=dict, repr=False)
    # [num_samples, seq] 0/1 for token inputs (text): positions with 0 are padding, left out of
    # activation ranges and reconstruction losses. None = every position counts.
    token_mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def batch_axes(self) -> dict[str, int | None]:
        return batch_axes(norm_specs(self.input_specs)) if self.input_specs else {n: 0 for n in self.input_names}

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def joined(self, chunk: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """These samples as one feed dict, joined along each input's batch axis."""
        out = {}
        axes = self.batch_axes
        for name in self.input_names:
            parts = [s[name] for s in chunk]
            if axes.get(name, 0) is None:
                if any(not np.array_equal(p, parts[0]) for p in parts[1:]):
                    raise OnnxflexError(f"input {name!r} is a scalar of the feed but the calibration samples give it different "
                                        "values; give every sample the same value")
                out[name] = parts[0]
                continue
            try:
                out[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axes.get(name, 0))
            except ValueError:
                shapes = sorted({tuple(p.shape[1:]) for p in parts})
                raise OnnxflexError(
                    f"samples of input {name!r} have different shapes {shapes[:3]} and cannot be batched; "
                    "use batch size 1 or pad them to one shape"
                ) from None
        return out

    def feed_size(self, feed: dict) -> int:
        """How many samples a feed from :meth:`batches` holds."""
        for name, axis in self.batch_axes.items():
            if axis is not None and name in feed:
                return int(feed[name].shape[axis])
        return 1

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts of ``batch_size`` samples (the last may be smaller).

        If the model has a static batch dim B, batches are exactly B and a remainder that cannot fill one
        is dropped with a warning (the model cannot take it).
        """
        if batch_size < 1:
            raise OnnxflexError(f"batch size must be at least 1, got {batch_size}")
        bs = batch_size
        if self.static_batch is not None:
            bs = self.static_batch
            rem = len(self.samples) % bs
            if rem:
                warnings.warn(
                    f"model has a fixed batch of {bs}; the last {rem} calibration sample(s) are dropped", stacklevel=2
                )
            end = len(self.samples) - rem
        else:
            end = len(self.samples)
        for i in range(0, end, bs):
            yield self.joined(self.samples[i : min(i + bs, end)])

    def stacked(self) -> dict[str, np.ndarray]:
        """All samples as one feed dict (batch dim = num_samples)."""
        if not self.samples:
            return {}
        return self.joined(self.samples)
