"""Image folders as calibration or evaluation data: listing, streaming decode, the model's image input.

Images are read in sorted relative-path order, so ``size=N`` keeps what ``ls | head -N`` shows.  An image
that fails to decode is skipped with one warning naming it, as long as at least one image loads; if none
load, :class:`OnnxflexError` names the first failure.  With a limit, further images replace skipped ones.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import OnnxflexError
from .dataset import CalibrationSet, fmt_shape, is_static, norm_specs
from .preprocess import (
    Preprocess,
    load_image,
    make_preprocess,
    normalize,
    random_resized_crop,
    resample,
    to_layout,
    to_rgb,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_MAX_WORKERS = 4  # PIL releases the GIL while decoding/resizing; a few threads hide file latency


def _check_dir(folder: Path) -> None:
    if not folder.exists():
        raise OnnxflexError(f"{folder} does not exist; check the path")
    if not folder.is_dir():
        raise OnnxflexError(f"{folder} is not a folder; pass a folder of images")
    try:
        with os.scandir(folder):
            pass
    except PermissionError:
        raise OnnxflexError(f"cannot read folder {folder} (permission denied); fix its permissions (chmod +rx)") from None


def list_images(folder: str | Path) -> list[Path]:
    """All images under ``folder`` (recursive), extensions jpg/jpeg/png/bmp/webp in any case.

    Sorted by path relative to ``folder`` so the order (and so any ``size=N`` subset) is deterministic.
    """
    folder = Path(folder)
    _check_dir(folder)
    found = []
    for root, dirs, files in os.walk(folder, onerror=None):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(root) / f)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def no_images_error(folder: Path) -> OnnxflexError:
    """The error for a folder without images (shared by calibration and eval)."""
    return OnnxflexError(
        f"no images in {folder}; put {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files there "
        "(subfolders are searched) or pass .npy/.npz feeds"
    )


def iter_images(
    files: Sequence[Path], pp: Preprocess, limit: int | None = None, chunk: int = 32
) -> Iterator[tuple[Path, np.ndarray]]:
    """Yield ``(file, [3,H,W])`` for the first ``limit`` files that decode, skipping (and warning about)
    the rest; raise if none decode.  Streams, so an eval over a large folder never holds it all."""
    skipped: list[str] = []
    n_ok = 0
    first_err: str | None = None

    def one(p: Path):
        try:
            return p, load_image(p, pp), None
        except OnnxflexError:
            raise
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            return p, None, f"{type(e).__name__}: {e}"

    i = 0
    workers = max(1, min(_MAX_WORKERS, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        while i < len(files) and (limit is None or n_ok < limit):
            want = chunk if limit is None else min(chunk, limit - n_ok)
            batch = files[i : i + want]
            i += len(batch)
            for p, x, err in pool.map(one, batch):
                if x is None:
                    skipped.append(f"{p.name} ({err})")
                    first_err = first_err or f"{p}: {err}"
                    continue
                if limit is not None and n_ok >= limit:
                    break
                n_ok += 1
                yield p, x
    if n_ok == 0 and skipped:
        raise OnnxflexError(f"no image could be decoded ({len(skipped)} tried), first: {first_err}; check the files are valid images")
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; ... {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(f"skipped {len(skipped)} image(s) that failed to decode: {shown}", stacklevel=2)


@dataclass
class ImageInput:
    """The single image input of a model and the preprocessing resolved for it."""

    name: str
    preprocess: Preprocess  # size/resize/layout filled in
    dtype: np.dtype
    batch: int | None  # static batch dim, else None


def resolve_image_input(input_specs: dict, preprocess: Preprocess | None = None) -> ImageInput:
    """Find the model's image input ([N,3,H,W] or [N,H,W,3]) and fill size/layout into ``preprocess``.

    Raises if the model has several inputs, a non-image input, a non-square static H/W, a ``--size``
    that contradicts the static H/W, or dynamic H/W without ``--size``.
    """
    specs = norm_specs(input_specs)
    if len(specs) != 1:
        raise OnnxflexError(
            f"an image folder can only feed a model with one input, this one has {len(specs)} "
            f"({', '.join(specs)}); pass .npz feeds keyed by input name instead"
        )
    name, (shape, dtype) = next(iter(specs.items()))
    if shape is None or len(shape) != 4:
        raise OnnxflexError(
            f"model input {name!r} has shape {fmt_shape(shape)}, not an image batch [N,3,H,W] or [N,H,W,3]; "
            "pass .npy/.npz feeds instead of an image folder"
        )
    if not np.issubdtype(dtype, np.floating):
        raise OnnxflexError(
            f"model input {name!r} is {dtype}, not float; image preprocessing yields floats, so pass .npy/.npz feeds instead"
        )
    if shape[1] == 3 or (not is_static(shape[1]) and not (is_static(shape[3]) and shape[3] == 3)):
        layout, hw = "NCHW", (shape[2], shape[3])
    elif shape[3] == 3:
        layout, hw = "NHWC", (shape[1], shape[2])
    else:
        raise OnnxflexError(
            f"model input {name!r} has shape {fmt_shape(shape)} with no 3-channel axis; "
            "image folders need an RGB input [N,3,H,W] or [N,H,W,3]; pass .npy/.npz feeds instead"
        )
    pp = replace(preprocess) if preprocess is not None else make_preprocess("torch")
    pp.layout = layout
    h, w = hw
    if is_static(h) and is_static(w):
        if int(h) != int(w):
            raise OnnxflexError(
                f"model input {name!r} is {int(h)}x{int(w)} (not square); image folders are center-cropped square, "
                "so pass .npy/.npz feeds preprocessed for this model"
            )
        if pp.size is not None and int(pp.size) != int(h):
            raise OnnxflexError(
                f"--size {pp.size} does not match model input {name!r} of {int(h)}x{int(w)}; drop --size or pass --size {int(h)}"
            )
        pp = pp.resolved(int(h))
    else:
        if pp.size is None:
            raise OnnxflexError(
                f"model input {name!r} has dynamic height/width {fmt_shape(shape)}; pass the image size with --size (e.g. --size 224)"
            )
        pp = pp.resolved()
    batch = int(shape[0]) if is_static(shape[0]) else None
    return ImageInput(name=name, preprocess=pp, dtype=dtype, batch=batch)


def augmented_views(path: Path, pp: Preprocess, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``k`` extra views of one calibration image: random resized crops (25-100 % of the area) resized
    to the crop size, normalised like the center crop. Few calibration images let learned rounding fit
    those images; more views of them generalise better."""
    from PIL import Image

    with Image.open(path) as im:
        base = to_rgb(im)
        base.load()
    size = int(pp.size)
    return [normalize(random_resized_crop(base, rng, (0.25, 1.0)).resize((size, size), resample(pp.interpolation)), pp)
            for _ in range(k)]


def load_image_folder(folder: Path, specs: dict, limit: int | None, preprocess: Preprocess | None,
                      batch: int | None, augment: int = 0, seed: int = 0) -> CalibrationSet:
    """The first ``limit`` decodable images of ``folder``, each followed by ``augment`` random views."""
    img = resolve_image_input(specs, preprocess)
    files = list_images(folder)
    if not files:
        raise no_images_error(folder)
    samples, used = [], []
    rng = np.random.default_rng(seed)
    for p, x in iter_images(files, img.preprocess, limit):
        views = [x] + (augmented_views(p, img.preprocess, augment, rng) if augment else [])
        for v in views:  # an image's views stay together, so a held-out tail never shares an image with training
            samples.append({img.name: to_layout(v, img.preprocess.layout)[None].astype(img.dtype, copy=False)})
        used.append(p)
    return CalibrationSet(samples, [img.name], str(folder), used, batch, specs)
