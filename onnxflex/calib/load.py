""":func:`load_calibration`: the one way any calibration source becomes a :class:`CalibrationSet`.

Sample order and subset: images in sorted relative-path order; ``.npy``/``.npz`` files and iterables in
the order given.  ``size=N`` keeps the *first N* samples of that order, so a run is reproducible and the
subset is what ``ls | head -N`` shows.  ``seed`` only drives random sources (augmented views).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OnnxflexError
from .arrays import file_samples, iterable_samples, single_input_samples
from .dataset import CalibrationSet, norm_specs, static_batch
from .images import load_image_folder
from .preprocess import Preprocess
from .text import infer_token_mask, is_text_file, load_decoder_text, load_text_calibration
from .windows import is_decoder


def load_calibration(
    source: Any,
    input_specs: dict,
    *,
    size: int | None = 256,
    preprocess: Preprocess | None = None,
    seed: int = 0,
    augment: int = 0,
    tokenizer: str | Path | None = None,
    max_length: int = 128,
    seq_len: int | None = None,
    decoder: bool | None = None,
) -> CalibrationSet:
    """Load calibration data and validate it against ``input_specs`` ({name: (shape, dtype)}).

    ``source``: a :class:`CalibrationSet` (returned as is), an image folder (single-image-input models),
    one or more ``.npy`` files (single input; with or without the batch dim), one or more ``.npz`` files
    (keys = input names), a ``.txt`` file (one text per line, tokenized with the ``tokenizer`` folder,
    ``max_length`` tokens), a numpy array (single input), or an iterable of ``{name: array}`` dicts
    (each may hold a batch).
    Text and decoders: a ``.txt`` file for a decoder (``decoder`` True, or None and
    :func:`~onnxflex.calib.windows.is_decoder` says so from the input names) is one token stream cut into
    ``size`` windows of ``seq_len`` tokens (default: the model's fixed length, else 512), each fed with an
    empty KV cache; see :func:`~onnxflex.calib.text.load_decoder_text`.  ``max_length`` is for encoders only.
    ``size``: keep at most this many samples -- the first ones in sorted (folders) or given order; None
    keeps all.  ``augment``: for image folders, this many random-crop views per image besides the center
    crop (``size`` still counts images); ``seed`` fixes those crops.
    ``token_mask`` is set for text, and inferred from an attention-mask input otherwise (padding then
    stays out of activation ranges and losses).
    """
    if isinstance(source, CalibrationSet):
        calib = source
    elif is_text_file(source):
        if is_decoder(input_specs) if decoder is None else decoder:
            return load_decoder_text(source, input_specs, tokenizer, seq_len=seq_len, size=size)
        return load_text_calibration(source, input_specs, tokenizer, max_length=max_length, size=size)
    else:
        calib = _load_feeds(source, input_specs, size, preprocess, seed, augment)
    if calib.token_mask is None:
        calib.token_mask = infer_token_mask(calib)
    return calib


def _is_pathlike(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _load_feeds(source: Any, input_specs: dict, size: int | None, preprocess: Preprocess | None,
                seed: int, augment: int) -> CalibrationSet:
    specs = norm_specs(input_specs)
    if size is not None and int(size) < 1:
        raise OnnxflexError(f"calibration size must be at least 1, got {size}")
    limit = None if size is None else int(size)
    batch = static_batch(specs)

    paths: list[Path] | None = None
    if _is_pathlike(source):
        paths = [Path(source)]
    elif isinstance(source, (list, tuple)) and source and all(_is_pathlike(s) for s in source):
        paths = [Path(s) for s in source]
    if paths is not None:
        for p in paths:
            if not p.exists():
                raise OnnxflexError(f"calibration path {p} does not exist; check the path")
        if len(paths) == 1 and paths[0].is_dir():
            return load_image_folder(paths[0], specs, limit, preprocess, batch, augment, seed)
        if any(p.is_dir() for p in paths):
            raise OnnxflexError("pass either one image folder or a list of .npy/.npz files, not several folders")
        samples = file_samples(paths, specs, limit)
        desc = str(paths[0]) if len(paths) == 1 else f"{len(paths)} files ({paths[0].name}, ...)"
    elif isinstance(source, np.ndarray):
        samples, desc = single_input_samples(source, specs, "the array"), "array"
    else:
        samples, desc = iterable_samples(source, specs, limit), "iterable"
    if not samples:
        raise OnnxflexError(f"calibration source {desc} holds no samples; pass data with at least one sample")
    return CalibrationSet(samples[:limit] if limit else samples, list(specs), desc, None, batch, specs)
