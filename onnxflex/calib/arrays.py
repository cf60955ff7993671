"""Array calibration data: ``.npy`` files (single-input models), ``.npz`` files (keys = input names),
and in-memory arrays or ``{input_name: array}`` dicts, each split into per-sample feeds."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import OnnxflexError
from .dataset import batch_axes, is_static, split_samples
from .images import IMAGE_EXTENSIONS

Samples = list[dict[str, np.ndarray]]


def single_input_samples(arr: np.ndarray, specs: dict, where: str) -> Samples:
    """One array (with or without the batch dim) for a model that has exactly one input."""
    if len(specs) != 1:
        raise OnnxflexError(
            f"{where} is a single array but the model has {len(specs)} inputs ({', '.join(specs)}); "
            "pass .npz files or dicts keyed by input name"
        )
    name = next(iter(specs))
    return [{name: a} for a in split_samples(name, arr, specs[name], where, batch_axes(specs)[name])]


def dict_samples(d: dict, specs: dict, where: str) -> Samples:
    """``{input_name: array}`` whose keys are exactly the model inputs, all with the same batch size."""
    missing = [n for n in specs if n not in d]
    extra = [k for k in d if k not in specs]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unknown key(s) {', '.join(map(repr, map(str, extra)))}")
        raise OnnxflexError(f"{where}: {' and '.join(parts)}; keys must be exactly the model inputs {', '.join(specs)}")
    axes = batch_axes(specs)
    per = {n: split_samples(n, d[n], specs[n], where, axes[n]) for n in specs}
    counts = {n: len(v) for n, v in per.items() if axes[n] is not None}  # a scalar input joins every sample
    if len(set(counts.values())) > 1 and _one_feed(d, specs, axes):
        return [{k: np.asarray(d[k]) if axes[k] is not None else per[k][0] for k in specs}]
    if len(set(counts.values())) > 1:
        raise OnnxflexError(f"{where}: inputs have different batch sizes {counts} (batch axis per input: "
                            f"{ {n: axes[n] for n in counts} }); give every input the same number of samples")
    n = next(iter(counts.values()), 1)
    return [{k: per[k][i if axes[k] is not None else 0] for k in specs} for i in range(n)]


def _one_feed(d: dict, specs: dict, axes: dict) -> bool:
    """A dict whose arrays have their inputs' full ranks, one of them with the fixed batch size the
    graph gives it, is one feed of a model without a free batch (e.g. a [time, features] sequence with
    a [1, 1, h] state): one sample, not several."""
    full = all(axes[n] is None or specs[n][0] is None or np.ndim(d[n]) == len(specs[n][0]) for n in specs)
    fixed = any(axes[n] is not None and specs[n][0] and is_static(specs[n][0][axes[n]])
                and np.shape(d[n])[axes[n]] == int(specs[n][0][axes[n]]) for n in specs)
    return full and fixed


def _load_npy(p: Path, specs: dict) -> Samples:
    try:
        arr = np.load(p, allow_pickle=False)
    except PermissionError:
        raise OnnxflexError(f"cannot read {p} (permission denied); fix its permissions") from None
    except Exception as e:
        raise OnnxflexError(f"{p.name} is not a readable .npy array ({type(e).__name__}: {e}); re-save it with numpy.save") from None
    if not isinstance(arr, np.ndarray):
        raise OnnxflexError(f"{p.name} does not hold an array; re-save it with numpy.save")
    return single_input_samples(arr, specs, p.name)


def _load_npz(p: Path, specs: dict) -> Samples:
    try:
        with np.load(p, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except PermissionError:
        raise OnnxflexError(f"cannot read {p} (permission denied); fix its permissions") from None
    except Exception as e:
        raise OnnxflexError(f"{p.name} is not a readable .npz archive ({type(e).__name__}: {e}); re-save it with numpy.savez") from None
    return dict_samples(d, specs, p.name)


def file_samples(paths: list[Path], specs: dict, limit: int | None) -> Samples:
    """Samples of ``.npy``/``.npz`` files in the given order; stops reading once ``limit`` are in."""
    samples: Samples = []
    for p in paths:
        suf = p.suffix.lower()
        if suf == ".npy":
            samples += _load_npy(p, specs)
        elif suf == ".npz":
            samples += _load_npz(p, specs)
        elif suf in IMAGE_EXTENSIONS:
            raise OnnxflexError(f"{p} is a single image; pass the folder that holds the calibration images")
        else:
            raise OnnxflexError(f"unsupported calibration file {p.name}; use an image folder, .npy or .npz files")
        if limit and len(samples) >= limit:
            break
    return samples


def iterable_samples(source: Any, specs: dict, limit: int | None) -> Samples:
    """Samples of a dict or an iterable of arrays/dicts (each may hold a batch); stops at ``limit``."""
    if isinstance(source, dict):
        source = [source]
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise OnnxflexError(
            f"unsupported calibration source of type {type(source).__name__}; pass an image folder, .npy/.npz paths, "
            "or an iterable of {input_name: array} dicts"
        )
    samples: Samples = []
    for i, item in enumerate(source):
        where = f"item {i} of the iterable"
        if isinstance(item, np.ndarray):
            samples += single_input_samples(item, specs, where)
        elif isinstance(item, dict):
            samples += dict_samples(item, specs, where)
        else:
            raise OnnxflexError(
                f"{where} is a {type(item).__name__}; each item must be a dict {{input_name: array}}"
            )
        if limit and len(samples) >= limit:
            break
    return samples
