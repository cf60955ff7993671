"""Calibration sources -> model feeds.

Sources: a folder of images (preprocessed like the model was trained), ``.npy``/``.npz`` files, or a
Python iterable of ``{input_name: array}`` dicts.  Everything ends up as a :class:`CalibrationSet`: one
feed dict per sample (arrays keep a batch dim of 1), validated against the model's input specs so that
a bad shape or dtype fails here with a message naming the input, not deep inside onnxruntime.

Decisions (documented because they change results):

* **Sample order / subset.**  Images are read in sorted relative-path order; ``.npy``/``.npz`` files and
  iterables in the order given.  ``size=N`` keeps the *first N* samples of that order, so a run is
  reproducible and the subset is what ``ls | head -N`` shows.  ``seed`` only drives synthetic sources.
* **Unreadable images.**  An image that fails to decode is skipped with one warning naming it, as long as
  at least one image loads; if none load, :class:`OnnxflexError` names the first failure.  With ``size=N``
  further images are read to replace skipped ones.
* **Alpha.**  RGBA/LA/transparent palettes are converted like torchvision's loader (``convert("RGB")``
  drops alpha), so numbers match the reference preprocessing that produced published accuracies.
"""
from __future__ import annotations

import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .errors import OnnxflexError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = ("torch", "tf", "raw")
INTERPOLATIONS = ("bilinear", "bicubic")
_MAX_WORKERS = 4  # PIL releases the GIL while decoding/resizing; a few threads hide file latency


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------
@dataclass
class Preprocess:
    """How an image file becomes a model input (the same recipe the model was trained/evaluated with).

    ``size``/``resize`` may be left ``None`` until the model is known: :meth:`resolved` fills ``size``
    from the model's static H/W and ``resize`` from the preset rule.
    """

    size: int | None = None  # center-crop size; None -> from the model's static input H/W
    resize: int | None = None  # short side before crop; None -> preset rule
    mean: tuple[float, float, float] = IMAGENET_MEAN  # 0-1 scale, torchvision convention
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"  # bilinear | bicubic
    layout: str = "NCHW"  # NCHW | NHWC (from the model input shape)
    preset: str = "torch"  # which rule derives ``resize`` from ``size``

    def resize_for(self, size: int) -> int:
        """Short side to resize to before center-cropping ``size`` (explicit value wins over the preset)."""
        if self.resize is not None:
            return int(self.resize)
        if self.preset == "tf":
            return size + 32  # EfficientNet(-Lite) eval: crop_padding 32
        if self.preset == "raw":
            return size
        return int(round(size * 256 / 224))  # torchvision ImageNet: 256 -> 224

    def resolved(self, size: int | None = None) -> "Preprocess":
        """A copy with ``size`` and ``resize`` filled in; ``size`` here is used only if ``self.size`` is None."""
        s = self.size if self.size is not None else size
        if s is None:
            raise OnnxflexError("image size is unknown; pass the crop size with --size (e.g. --size 224)")
        return replace(self, size=int(s), resize=self.resize_for(int(s)))


def make_preprocess(
    preset: str | None = "torch",
    size: int | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
) -> Preprocess:
    """Build a :class:`Preprocess` from a preset plus explicit overrides.

    ``torch``: ImageNet mean/std, resize = round(size*256/224), bilinear (torchvision models).
    ``tf``: (x-127)/128 on 0-255, resize = size+32, bicubic (EfficientNet-Lite).
    ``raw``: x/255 only, resize = size (no crop margin).  ``None`` means ``torch``.
    """
    preset = "torch" if preset is None else str(preset).lower()
    if preset not in PRESETS:
        raise OnnxflexError(f"unknown preprocessing preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset == "tf":
        pp = Preprocess(mean=(127 / 255,) * 3, std=(128 / 255,) * 3, interpolation="bicubic", preset="tf")
    elif preset == "raw":
        pp = Preprocess(mean=(0.0,) * 3, std=(1.0,) * 3, preset="raw")
    else:
        pp = Preprocess(preset="torch")
    if size is not None:
        if int(size) < 1:
            raise OnnxflexError(f"--size must be a positive integer, got {size}")
        pp.size = int(size)
    if resize is not None:
        if int(resize) < 1:
            raise OnnxflexError(f"--resize must be a positive integer, got {resize}")
        pp.resize = int(resize)
    if mean is not None:
        pp.mean = _triple(mean, "mean")
    if std is not None:
        pp.std = _triple(std, "std")
        if any(s == 0 for s in pp.std):
            raise OnnxflexError(f"--std must not contain 0, got {pp.std}")
    if interpolation is not None:
        if interpolation not in INTERPOLATIONS:
            raise OnnxflexError(f"unknown interpolation {interpolation!r}; choose bilinear or bicubic")
        pp.interpolation = interpolation
    return pp


def _triple(v: Any, what: str) -> tuple[float, float, float]:
    vals = [float(x) for x in (v if isinstance(v, (list, tuple, np.ndarray)) else [v])]
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise OnnxflexError(f"--{what} needs 1 or 3 values (R,G,B on a 0-1 scale), got {len(vals)}")
    return (vals[0], vals[1], vals[2])


def _to_rgb(img):
    """Any PIL mode -> RGB, matching torchvision's loader for the common modes."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16/32-bit grayscale: convert("RGB") would clip, not scale
        from PIL import Image

        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if (mode.startswith("I;16") or a.max(initial=0) > 255) else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's "transparency expressed in bytes" warning
    return img.convert("RGB")


def _resample(name: str):
    from PIL import Image

    return Image.Resampling.BICUBIC if name == "bicubic" else Image.Resampling.BILINEAR


def preprocess_pil(img, pp: Preprocess) -> np.ndarray:
    """PIL image -> normalized float32 [3, size, size] (torchvision Resize(short side) + CenterCrop)."""
    if pp.size is None:
        raise OnnxflexError("image size is unknown; pass the crop size with --size (e.g. --size 224)")
    size = int(pp.size)
    resize = pp.resize_for(size)
    img = _to_rgb(img)
    w, h = img.size
    # torchvision: short side -> resize, long side -> int(resize * long / short)
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nh, nw = resize, int(resize * w / h)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _resample(pp.interpolation))
    if nw < size or nh < size:
        raise OnnxflexError(f"--resize {resize} is smaller than the crop --size {size}; use a resize >= size")
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # [H, W, 3]
    x = (x - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def load_image(path: str | Path, pp: Preprocess) -> np.ndarray:
    """Decode one image file and preprocess it -> float32 [3, H, W].

    Raises ``OSError``/``ValueError`` from PIL for files that do not decode (callers decide to skip);
    raises :class:`OnnxflexError` for a missing file or unknown size.
    """
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise OnnxflexError(f"image {path} does not exist; check the path")
    with Image.open(path) as img:
        img.load()
        return preprocess_pil(img, pp)


def to_layout(chw: np.ndarray, layout: str) -> np.ndarray:
    """[3,H,W] (or [N,3,H,W]) -> the model's layout."""
    if layout == "NHWC":
        return np.ascontiguousarray(np.moveaxis(chw, -3, -1))
    return chw


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


def _no_images_error(folder: Path) -> OnnxflexError:
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


# --------------------------------------------------------------------------------------------------
# Model input specs
# --------------------------------------------------------------------------------------------------
def _is_static(d: Any) -> bool:
    return isinstance(d, (int, np.integer)) and not isinstance(d, bool) and int(d) > 0


def _fmt_shape(shape: Sequence[Any] | None) -> str:
    if shape is None:
        return "[?]"
    return "[" + ",".join(str(int(d)) if _is_static(d) else (str(d) if isinstance(d, str) and d else "?") for d in shape) + "]"


def _norm_specs(input_specs: dict) -> dict[str, tuple[list | None, np.dtype]]:
    if not input_specs:
        raise OnnxflexError("the model has no inputs to feed; check the model file")
    out = {}
    for name, spec in input_specs.items():
        shape, dtype = spec
        out[name] = (None if shape is None else list(shape), np.dtype(dtype))
    return out


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
    specs = _norm_specs(input_specs)
    if len(specs) != 1:
        raise OnnxflexError(
            f"an image folder can only feed a model with one input, this one has {len(specs)} "
            f"({', '.join(specs)}); pass .npz feeds keyed by input name instead"
        )
    name, (shape, dtype) = next(iter(specs.items()))
    if shape is None or len(shape) != 4:
        raise OnnxflexError(
            f"model input {name!r} has shape {_fmt_shape(shape)}, not an image batch [N,3,H,W] or [N,H,W,3]; "
            "pass .npy/.npz feeds instead of an image folder"
        )
    if not np.issubdtype(dtype, np.floating):
        raise OnnxflexError(
            f"model input {name!r} is {dtype}, not float; image preprocessing yields floats, so pass .npy/.npz feeds instead"
        )
    if shape[1] == 3 or (not _is_static(shape[1]) and not (_is_static(shape[3]) and shape[3] == 3)):
        layout, hw = "NCHW", (shape[2], shape[3])
    elif shape[3] == 3:
        layout, hw = "NHWC", (shape[1], shape[2])
    else:
        raise OnnxflexError(
            f"model input {name!r} has shape {_fmt_shape(shape)} with no 3-channel axis; "
            "image folders need an RGB input [N,3,H,W] or [N,H,W,3]; pass .npy/.npz feeds instead"
        )
    pp = replace(preprocess) if preprocess is not None else make_preprocess("torch")
    pp.layout = layout
    h, w = hw
    if _is_static(h) and _is_static(w):
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
                f"model input {name!r} has dynamic height/width {_fmt_shape(shape)}; pass the image size with --size (e.g. --size 224)"
            )
        pp = pp.resolved()
    batch = int(shape[0]) if _is_static(shape[0]) else None
    return ImageInput(name=name, preprocess=pp, dtype=dtype, batch=batch)


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


def _split_samples(name: str, arr: Any, spec: tuple[list | None, np.dtype], where: str) -> list[np.ndarray]:
    """Validate one input's array against the spec -> list of per-sample arrays with a batch dim of 1."""
    shape, dtype = spec
    if not isinstance(arr, np.ndarray):
        try:
            arr = np.asarray(arr)
        except Exception as e:
            raise OnnxflexError(f"input {name!r} from {where} is not an array ({type(arr).__name__}: {e}); pass numpy arrays") from None
    if arr.dtype == object:
        raise OnnxflexError(f"input {name!r} from {where} is an object array; pass numeric numpy arrays")
    arr = _cast(name, arr, dtype, where)
    if shape is not None:
        rank = len(shape)
        if arr.ndim == rank - 1:
            arr = arr[None]
        if arr.ndim != rank:
            raise OnnxflexError(
                f"input {name!r} from {where} has shape {list(arr.shape)} but the model expects {_fmt_shape(shape)} "
                f"(rank {rank}, or {rank - 1} without the batch dim); reshape the data"
            )
        bad = [i for i in range(1, rank) if _is_static(shape[i]) and arr.shape[i] != int(shape[i])]
        if bad:
            raise OnnxflexError(
                f"input {name!r} from {where} has shape {list(arr.shape)} but the model expects {_fmt_shape(shape)}; "
                f"dim {bad[0]} should be {int(shape[bad[0]])}"
            )
    elif arr.ndim == 0:
        arr = arr[None]
    return [arr[i : i + 1] for i in range(arr.shape[0])]


# --------------------------------------------------------------------------------------------------
# CalibrationSet
# --------------------------------------------------------------------------------------------------
@dataclass
class CalibrationSet:
    """Calibration data as one feed dict per sample (arrays with a leading batch dim of 1).

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
    def num_samples(self) -> int:
        return len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def _concat(self, chunk: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        out = {}
        for name in self.input_names:
            parts = [s[name] for s in chunk]
            try:
                out[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            except ValueError:
                shapes = sorted({tuple(p.shape[1:]) for p in parts})
                raise OnnxflexError(
                    f"samples of input {name!r} have different shapes {shapes[:3]} and cannot be batched; use batch size 1 or pad them to one shape"
                ) from None
        return out

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
            yield self._concat(self.samples[i : min(i + bs, end)])

    def stacked(self) -> dict[str, np.ndarray]:
        """All samples as one feed dict (batch dim = num_samples)."""
        if not self.samples:
            return {}
        return self._concat(self.samples)


def _is_pathlike(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def load_calibration(
    source: Any,
    input_specs: dict,
    size: int | None = None,
    preprocess: Preprocess | None = None,
    seed: int = 0,
    augment: int = 0,
) -> CalibrationSet:
    """Load calibration data and validate it against ``input_specs`` ({name: (shape, dtype)}).

    ``source``: an image folder (single-image-input models), one or more ``.npy`` files (single input;
    with or without the batch dim), one or more ``.npz`` files (keys = input names), a numpy array
    (single input), or an iterable of ``{name: array}`` dicts (each may hold a batch).
    ``size``: keep at most this many samples -- the first ones in sorted (folders) or given order.
    ``augment``: for image folders, this many random-crop views per image besides the center crop
    (``size`` still counts images); ``seed`` fixes those crops.
    """
    specs = _norm_specs(input_specs)
    if size is not None and int(size) < 1:
        raise OnnxflexError(f"calibration size must be at least 1, got {size}")
    limit = None if size is None else int(size)
    names = list(specs)
    static_batch = None
    first_shape = next(iter(specs.values()))[0]
    if len(specs) >= 1 and first_shape and _is_static(first_shape[0]):
        static_batch = int(first_shape[0])

    def finish(samples, desc, files=None):
        if not samples:
            raise OnnxflexError(f"calibration source {desc} holds no samples; pass data with at least one sample")
        return CalibrationSet(samples[:limit] if limit else samples, names, desc, files, static_batch, specs)

    # --- a single path or a list of paths
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
            return _load_image_folder(paths[0], specs, limit, preprocess, static_batch, augment, seed)
        if any(p.is_dir() for p in paths):
            raise OnnxflexError("pass either one image folder or a list of .npy/.npz files, not several folders")
        samples: list[dict[str, np.ndarray]] = []
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
        desc = str(paths[0]) if len(paths) == 1 else f"{len(paths)} files ({paths[0].name}, ...)"
        return finish(samples, desc)

    # --- in-memory sources
    if isinstance(source, np.ndarray):
        return finish(_single_input_array(source, specs, "the array"), "array")
    if isinstance(source, dict):
        source = [source]
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise OnnxflexError(
            f"unsupported calibration source of type {type(source).__name__}; pass an image folder, .npy/.npz paths, "
            "or an iterable of {input_name: array} dicts"
        )
    samples = []
    for i, item in enumerate(source):
        where = f"item {i} of the iterable"
        if isinstance(item, np.ndarray):
            samples += _single_input_array(item, specs, where)
        elif isinstance(item, dict):
            samples += _dict_samples(item, specs, where)
        else:
            raise OnnxflexError(
                f"{where} is a {type(item).__name__}; each item must be a dict {{input_name: array}}"
            )
        if limit and len(samples) >= limit:
            break
    return finish(samples, "iterable")


def _single_input_array(arr: np.ndarray, specs: dict, where: str) -> list[dict[str, np.ndarray]]:
    if len(specs) != 1:
        raise OnnxflexError(
            f"{where} is a single array but the model has {len(specs)} inputs ({', '.join(specs)}); "
            "pass .npz files or dicts keyed by input name"
        )
    name = next(iter(specs))
    return [{name: a} for a in _split_samples(name, arr, specs[name], where)]


def _dict_samples(d: dict, specs: dict, where: str) -> list[dict[str, np.ndarray]]:
    missing = [n for n in specs if n not in d]
    extra = [k for k in d if k not in specs]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unknown key(s) {', '.join(map(repr, map(str, extra)))}")
        raise OnnxflexError(f"{where}: {' and '.join(parts)}; keys must be exactly the model inputs {', '.join(specs)}")
    per = {n: _split_samples(n, d[n], specs[n], where) for n in specs}
    counts = {n: len(v) for n, v in per.items()}
    if len(set(counts.values())) > 1:
        raise OnnxflexError(f"{where}: inputs have different batch sizes {counts}; give every input the same number of samples")
    n = next(iter(counts.values()))
    return [{k: per[k][i] for k in specs} for i in range(n)]


def _load_npy(p: Path, specs: dict) -> list[dict[str, np.ndarray]]:
    try:
        arr = np.load(p, allow_pickle=False)
    except PermissionError:
        raise OnnxflexError(f"cannot read {p} (permission denied); fix its permissions") from None
    except Exception as e:
        raise OnnxflexError(f"{p.name} is not a readable .npy array ({type(e).__name__}: {e}); re-save it with numpy.save") from None
    if not isinstance(arr, np.ndarray):
        raise OnnxflexError(f"{p.name} does not hold an array; re-save it with numpy.save")
    return _single_input_array(arr, specs, p.name)


def _load_npz(p: Path, specs: dict) -> list[dict[str, np.ndarray]]:
    try:
        with np.load(p, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except PermissionError:
        raise OnnxflexError(f"cannot read {p} (permission denied); fix its permissions") from None
    except Exception as e:
        raise OnnxflexError(f"{p.name} is not a readable .npz archive ({type(e).__name__}: {e}); re-save it with numpy.savez") from None
    return _dict_samples(d, specs, p.name)


def _load_image_folder(folder: Path, specs: dict, limit: int | None, preprocess: Preprocess | None, static_batch,
                       augment: int = 0, seed: int = 0) -> CalibrationSet:
    img = resolve_image_input(specs, preprocess)
    files = list_images(folder)
    if not files:
        raise _no_images_error(folder)
    samples, used = [], []
    rng = np.random.default_rng(seed)
    for p, x in iter_images(files, img.preprocess, limit):
        views = [x] + (augmented_views(p, img.preprocess, augment, rng) if augment else [])
        for v in views:  # an image's views stay together, so a held-out tail never shares an image with training
            samples.append({img.name: to_layout(v, img.preprocess.layout)[None].astype(img.dtype, copy=False)})
        used.append(p)
    return CalibrationSet(samples, [img.name], str(folder), used, static_batch, specs)


def augmented_views(path: Path, pp: Preprocess, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``k`` extra views of one calibration image: random resized crops (25-100 % of the area, aspect
    3/4-4/3) with random horizontal flips, preprocessed like the center crop. Few calibration images
    let learned rounding fit those images; more views of them generalise better."""
    from PIL import Image

    with Image.open(path) as im:
        base = _to_rgb(im)
        base.load()
    w, h = base.size
    size = int(pp.size)
    out = []
    for _ in range(k):
        area = w * h * rng.uniform(0.25, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = base.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), _resample(pp.interpolation))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = np.asarray(crop, dtype=np.float32) / np.float32(255.0)
        x = (x - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
        out.append(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))
    return out


# --------------------------------------------------------------------------------------------------
# Synthetic calibration from scikit-image's bundled photos
# --------------------------------------------------------------------------------------------------
# Natural photos shipped inside scikit-image (no download needed).  Each entry is tried at first use; any
# that fail (e.g. a slimmed install) are left out.
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "camera", "clock", "coins", "moon", "grass", "gravel", "brick")


@functools.lru_cache(maxsize=1)
def _skimage_photos() -> tuple[np.ndarray, ...]:
    try:
        import skimage.data as skd
    except ImportError:
        raise OnnxflexError("synthetic calibration needs scikit-image; pip install scikit-image or pass real images") from None
    photos = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _SKIMAGE_PHOTOS:
            try:
                a = getattr(skd, name)()
            except Exception:
                continue
            if isinstance(a, tuple):  # stereo_motorcycle -> (left, right, disparity)
                a = a[0]
            a = np.asarray(a)
            if a.dtype != np.uint8 or a.ndim not in (2, 3) or min(a.shape[:2]) < 64:
                continue
            if a.ndim == 3:
                a = a[..., :3]
            photos.append(a)
    if not photos:
        raise OnnxflexError("no scikit-image sample photos could be loaded; reinstall scikit-image or pass real images")
    return tuple(photos)


def synthetic_image_calibration(
    n: int, size: int | None = None, preprocess: Preprocess | None = None, seed: int = 0
) -> list[np.ndarray]:
    """``n`` real-photo calibration images without a dataset: seeded random crops (scale 10-100 % of the
    area, aspect 3/4-4/3, random position and flip) of scikit-image's bundled photos, each preprocessed like
    :func:`load_image` -> list of float32 [3, H, W].  Deterministic for a given seed."""
    from PIL import Image

    if n < 1:
        raise OnnxflexError(f"number of synthetic calibration images must be at least 1, got {n}")
    pp = preprocess if preprocess is not None else make_preprocess("torch")
    pp = pp.resolved(size)
    photos = _skimage_photos()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = photos[i % len(photos)] if i < len(photos) else photos[int(rng.integers(len(photos)))]
        h, w = a.shape[:2]
        area = h * w * rng.uniform(0.10, 1.0)
        ar = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch = int(min(h, max(16, round(np.sqrt(area / ar)))))
        cw = int(min(w, max(16, round(np.sqrt(area * ar)))))
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        crop = a[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        img = Image.fromarray(np.ascontiguousarray(crop))
        out.append(preprocess_pil(img, pp))
    return out
