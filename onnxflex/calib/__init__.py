"""Calibration data: image folders, ``.npy``/``.npz`` files, text files or feed dicts -> :class:`CalibrationSet`.

:func:`load_calibration` is the entry point; the submodules hold one source kind each (``images``,
``arrays``, ``text``), the image recipe (``preprocess``), the scikit-image photo set (``synthetic``), and
the set itself with its per-input checks (``dataset``).
"""
from __future__ import annotations

from .dataset import CalibrationSet
from .images import iter_images, list_images, resolve_image_input
from .load import load_calibration
from .preprocess import Preprocess, load_image, make_preprocess, to_layout
from .synthetic import synthetic_image_calibration

__all__ = [
    "CalibrationSet",
    "Preprocess",
    "iter_images",
    "list_images",
    "load_calibration",
    "load_image",
    "make_preprocess",
    "resolve_image_input",
    "synthetic_image_calibration",
    "to_layout",
]
