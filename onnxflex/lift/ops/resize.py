"""Resize, with ORT's coordinate transforms and rounding."""
from __future__ import annotations

import math

import numpy as np
import torch

from .core import Tensor, _axis, _floats, _ints, _opt, register


def _resize_coords(ctm: str, out_len: int, in_len: int, scale: float, roi: tuple[float, float]) -> np.ndarray:
    """Source coordinate of every output index, in float32 with ORT's operation order, so that
    nearest-neighbour ties round the same way as ORT."""
    x = np.arange(out_len, dtype=np.float32)
    s = np.float32(scale)
    h = np.float32(0.5)
    if ctm == "half_pixel":
        return (x + h) / s - h
    if ctm == "half_pixel_symmetric":
        adj = np.float32(out_len) / (s * np.float32(in_len))
        center = np.float32(in_len) / np.float32(2)
        offset = center * (np.float32(1) - adj)
        return offset + (x + h) / s - h
    if ctm == "pytorch_half_pixel":
        return (x + h) / s - h if out_len > 1 else np.zeros_like(x)
    if ctm == "align_corners":
        return np.zeros_like(x) if out_len == 1 else x * np.float32(in_len - 1) / np.float32(out_len - 1)
    if ctm == "asymmetric":
        return x / s
    if ctm == "tf_half_pixel_for_nn":
        return (x + h) / s
    if ctm == "tf_crop_and_resize":
        r0, r1 = np.float32(roi[0]), np.float32(roi[1])
        n = np.float32(in_len - 1)
        if out_len > 1:
            return r0 * n + x * (r1 - r0) * n / np.float32(out_len - 1)
        return np.full_like(x, h * (r0 + r1) * n)
    raise NotImplementedError(f"Resize coordinate_transformation_mode {ctm!r} has no torch lifting")


def _nearest(xo: np.ndarray, mode: str, downsample: bool) -> np.ndarray:
    if mode == "round_prefer_floor":
        return np.ceil(xo - np.float32(0.5))
    if mode == "round_prefer_ceil":
        return np.floor(xo + np.float32(0.5))
    if mode == "floor":
        return np.floor(xo)
    if mode == "ceil":
        return np.ceil(xo)
    if mode == "simple":  # opset 10 Resize as implemented by ORT
        return np.ceil(xo) if downsample else np.trunc(xo)
    raise NotImplementedError(f"Resize nearest_mode {mode!r} has no torch lifting")


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic kernel weights for taps at floor(x)-1 .. floor(x)+2, ``t`` = x - floor(x)."""
    a = np.float32(a)
    d = np.stack([t + 1, t, 1 - t, 2 - t], axis=-1).astype(np.float32)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, far).astype(np.float32)


def _resize_axis(x: Tensor, axis: int, out_len: int, scale: float, attrs: dict, ctm: str,
                 nearest_mode: str, roi: tuple[float, float]) -> Tensor:
    """Resample one axis; N-d linear/cubic is separable, so axes are done one after another."""
    in_len = x.shape[axis]
    mode = attrs.get("mode", "nearest")
    xo = _resize_coords(ctm, out_len, in_len, scale, roi)
    dev = x.device
    bshape = [1] * x.dim()
    bshape[axis] = out_len

    def take(i: np.ndarray) -> Tensor:
        return x.index_select(axis, torch.from_numpy(i.astype(np.int64)).to(dev))

    def weight(w: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(dev).reshape(bshape)

    if mode == "nearest":
        idx = np.clip(_nearest(xo, nearest_mode, scale < 1), 0, in_len - 1)
        y = take(idx)
    elif mode == "linear":
        xc = xo if ctm == "tf_crop_and_resize" else np.clip(xo, 0, in_len - 1)
        x0 = np.clip(np.floor(xc), 0, in_len - 1)
        x1 = np.minimum(x0 + 1, in_len - 1)
        w = np.clip(xc - x0, 0, 1).astype(np.float32)
        y = take(x0) * weight(1 - w) + take(x1) * weight(w)
    elif mode == "cubic":
        base = np.floor(xo)
        taps = base[:, None] + np.arange(-1, 3, dtype=np.float32)[None, :]
        w = _cubic_weights(xo - base, attrs.get("cubic_coeff_a", -0.75))
        if attrs.get("exclude_outside", 0):
            w = np.where((taps < 0) | (taps > in_len - 1), 0, w)
            w = w / w.sum(axis=1, keepdims=True)
        taps = np.clip(taps, 0, in_len - 1)
        y = sum(take(taps[:, j]) * weight(w[:, j]) for j in range(4))
    else:
        raise NotImplementedError(f"Resize mode {mode!r} has no torch lifting")
    if ctm == "tf_crop_and_resize":
        outside = (xo < 0) | (xo > in_len - 1)
        if outside.any():
            mask = torch.from_numpy(outside).to(dev).reshape(bshape)
            y = torch.where(mask, torch.as_tensor(attrs.get("extrapolation_value", 0.0), dtype=y.dtype, device=dev), y)
    return y


@register("Resize")
def resize(inputs, attrs, opset):
    """nearest/linear/cubic with every coordinate_transformation_mode, scales or sizes input,
    axes and keep_aspect_ratio_policy (opset 18). Antialiased downscaling is refused."""
    x = inputs[0]
    r = x.dim()
    if opset < 11:
        scales, sizes, roi = _opt(inputs, 1), None, None
        ctm, nearest_mode = "asymmetric", "simple"
    else:
        roi, scales, sizes = _opt(inputs, 1), _opt(inputs, 2), _opt(inputs, 3)
        ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
        nearest_mode = attrs.get("nearest_mode", "round_prefer_floor")
    roi = _floats(roi) if roi is not None and roi.numel() else None
    scales = _floats(scales) if scales is not None and scales.numel() else None
    sizes = _ints(sizes) if sizes is not None and sizes.numel() else None
    axes = [_axis(a, r) for a in attrs["axes"]] if "axes" in attrs else list(range(r))
    n = len(axes)
    in_len = [x.shape[a] for a in axes]
    if sizes is not None:
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            out_len = sizes
            sc = [float(np.float32(o) / np.float32(i)) for o, i in zip(out_len, in_len)]
        else:
            ratios = [np.float32(o) / np.float32(i) for o, i in zip(sizes, in_len)]
            s = min(ratios) if policy == "not_larger" else max(ratios)
            out_len = [int(math.floor(float(s * np.float32(i)) + 0.5)) for i in in_len]
            sc = [float(s)] * n
    elif scales is not None:
        sc = scales
        out_len = [int(np.float32(s) * np.float32(i)) for s, i in zip(sc, in_len)]
    else:
        raise ValueError("Resize needs scales or sizes")
    if attrs.get("antialias", 0) and attrs.get("mode", "nearest") != "nearest" and any(s < 1 for s in sc):
        raise NotImplementedError("Resize with antialias downscaling has no torch lifting")
    for k, a in enumerate(axes):
        if out_len[k] == in_len[k] and sc[k] == 1.0 and ctm != "tf_crop_and_resize":
            continue
        rk = (roi[k], roi[k + n]) if roi is not None and len(roi) == 2 * n else (0.0, 1.0)
        x = _resize_axis(x, a, out_len[k], sc[k], attrs, ctm, nearest_mode, rk)
    return [x]
