"""How an image becomes a model input: the preprocessing recipe, its presets, and the crops.

Alpha: RGBA/LA/transparent palettes are converted like torchvision's loader (``convert("RGB")`` drops
alpha), so numbers match the reference preprocessing that produced published accuracies.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import OnnxflexError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = ("torch", "tf", "raw")
INTERPOLATIONS = ("bilinear", "bicubic")


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


def to_rgb(img):
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


def resample(name: str):
    """The PIL filter for an interpolation name."""
    from PIL import Image

    return Image.Resampling.BICUBIC if name == "bicubic" else Image.Resampling.BILINEAR


def normalize(img, pp: Preprocess) -> np.ndarray:
    """RGB PIL image (already at its final size) -> (x/255 - mean) / std as float32 [3, H, W]."""
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # [H, W, 3]
    x = (x - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def preprocess_pil(img, pp: Preprocess) -> np.ndarray:
    """PIL image -> normalized float32 [3, size, size] (torchvision Resize(short side) + CenterCrop)."""
    if pp.size is None:
        raise OnnxflexError("image size is unknown; pass the crop size with --size (e.g. --size 224)")
    size = int(pp.size)
    resize = pp.resize_for(size)
    img = to_rgb(img)
    w, h = img.size
    # torchvision: short side -> resize, long side -> int(resize * long / short)
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nh, nw = resize, int(resize * w / h)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample(pp.interpolation))
    if nw < size or nh < size:
        raise OnnxflexError(f"--resize {resize} is smaller than the crop --size {size}; use a resize >= size")
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    return normalize(img.crop((left, top, left + size, top + size)), pp)


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


def random_resized_crop(img, rng: np.random.Generator, scale: tuple[float, float]):
    """A random crop of ``img`` covering ``scale`` (low, high) of its area, aspect 3/4-4/3 (uniform in
    log), at a random position, mirrored with probability 1/2 -> PIL image; the caller resizes it.

    The one crop sampler behind augmented calibration views and the synthetic photo set, so both draw
    from the generator in the same order (area, aspect, x, y, flip)."""
    from PIL import Image

    w, h = img.size
    area = w * h * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, max(1, round(np.sqrt(area * aspect)))))
    ch = int(min(h, max(1, round(np.sqrt(area / aspect)))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = img.crop((x0, y0, x0 + cw, y0 + ch))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def to_layout(chw: np.ndarray, layout: str) -> np.ndarray:
    """[3,H,W] (or [N,3,H,W]) -> the model's layout."""
    if layout == "NHWC":
        return np.ascontiguousarray(np.moveaxis(chw, -3, -1))
    return chw
