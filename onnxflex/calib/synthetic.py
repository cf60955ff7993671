"""Calibration images without a dataset: random crops of the natural photos shipped inside scikit-image
(no download needed), so the demo and tests run from PyPI alone."""
from __future__ import annotations

import functools
import warnings

import numpy as np

from ..errors import OnnxflexError
from .preprocess import Preprocess, make_preprocess, preprocess_pil, random_resized_crop

# Each is tried at first use; any that fail (e.g. a slimmed install) are left out.
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "camera", "clock", "coins", "moon",
                   "grass", "gravel", "brick")


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
    """``n`` real-photo calibration images without a dataset: seeded random crops (10-100 % of the area,
    see :func:`random_resized_crop`) of scikit-image's bundled photos, each preprocessed like
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
        out.append(preprocess_pil(random_resized_crop(Image.fromarray(a), rng, (0.10, 1.0)), pp))
    return out
