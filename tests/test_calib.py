"""Calibration loading: preprocessing numerics, image modes, listing, sources and their error messages."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxflex.calib import (
    CalibrationSet,
    list_images,
    load_calibration,
    load_image,
    make_preprocess,
    resolve_image_input,
    synthetic_image_calibration,
)
from onnxflex.errors import OnnxflexError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLE = SHARED / "data" / "imagenet-sample"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
IMG_SPEC = {"images": ([None, 3, 8, 8], np.float32)}


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def _folder(tmp_path: Path, n=3, size=10, name="imgs") -> Path:
    d = tmp_path / name
    d.mkdir()
    for i in range(n):
        _save(d / f"img{i}.png", _rgb(size, size, i))
    return d


# ---------------------------------------------------------------- preprocessing numerics
def test_torch_preset_matches_hand_computation(tmp_path):
    # size 7 -> resize round(7*256/224) = 8 = the short side, so no resampling: only crop + normalise
    arr = _rgb(8, 10)
    p = _save(tmp_path / "a.png", arr)
    pp = make_preprocess("torch", size=7)
    assert pp.resize_for(7) == 8 and pp.interpolation == "bilinear"
    x = load_image(p, pp)
    # crop: top = round((8-7)/2) = 0, left = round((10-7)/2) = round(1.5) = 2
    want = ((arr[0:7, 2:9].astype(np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1)
    assert x.shape == (3, 7, 7) and x.dtype == np.float32
    np.testing.assert_allclose(x, want, atol=1e-6)


def test_tf_preset_matches_hand_computation(tmp_path):
    # size 4 -> resize 4+32 = 36 = the short side; (x-127)/128 on 0-255
    arr = _rgb(36, 40, 1)
    p = _save(tmp_path / "b.png", arr)
    pp = make_preprocess("tf", size=4)
    assert pp.resize_for(4) == 36 and pp.interpolation == "bicubic"
    x = load_image(p, pp)
    want = ((arr[16:20, 18:22].astype(np.float32) - 127) / 128).transpose(2, 0, 1)
    np.testing.assert_allclose(x, want, atol=1e-5)


@pytest.mark.parametrize("preset,resample", [("torch", Image.Resampling.BILINEAR), ("tf", Image.Resampling.BICUBIC)])
def test_resize_short_side_then_center_crop(tmp_path, preset, resample):
    arr = _rgb(20, 30, 2)
    p = _save(tmp_path / "c.png", arr)
    pp = make_preprocess(preset, size=6, resize=8)  # explicit resize overrides the preset rule
    x = load_image(p, pp)
    # short side 20 -> 8, long 30 -> int(8*30/20) = 12; crop top 1, left 3
    r = np.asarray(Image.fromarray(arr).resize((12, 8), resample), np.float32)[1:7, 3:9] / 255
    m, s = (MEAN, STD) if preset == "torch" else (127 / 255, 128 / 255)
    np.testing.assert_allclose(x, ((r - m) / s).transpose(2, 0, 1), atol=1e-5)


def test_explicit_values_override_preset():
    pp = make_preprocess("tf", size=100, mean=0.5, std=[0.25, 0.5, 1.0], interpolation="bilinear")
    assert pp.mean == (0.5, 0.5, 0.5) and pp.std == (0.25, 0.5, 1.0) and pp.interpolation == "bilinear"
    assert pp.resize_for(100) == 132
    with pytest.raises(OnnxflexError, match="preset"):
        make_preprocess("caffe")
    with pytest.raises(OnnxflexError, match="1 or 3 values"):
        make_preprocess(mean=[0.1, 0.2])


def test_image_modes_converted_to_rgb(tmp_path):
    pp = make_preprocess("raw", size=4)
    gray = Image.fromarray(np.full((6, 6), 100, np.uint8), "L")
    pal = Image.new("P", (6, 6), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 0
    cmyk = Image.new("CMYK", (6, 6), (0, 255, 0, 0))  # magenta
    rgba = Image.fromarray(np.dstack([np.full((6, 6, 3), 50, np.uint8), np.zeros((6, 6), np.uint8)]), "RGBA")
    la = Image.new("LA", (6, 6), (200, 10))
    g16 = Image.fromarray(np.full((6, 6), 65535, np.uint16))
    cases = {"gray.png": (gray, [100] * 3), "pal.png": (pal, [10, 20, 30]), "cmyk.jpg": (cmyk, [255, 0, 255]),
             "rgba.png": (rgba, [50] * 3), "la.png": (la, [200] * 3), "g16.png": (g16, [255] * 3)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's palette-transparency warning must not leak
        for name, (im, rgb) in cases.items():
            im.save(tmp_path / name)
            x = load_image(tmp_path / name, pp)
            assert x.shape == (3, 4, 4), name
            np.testing.assert_allclose(x[:, 2, 2], np.array(rgb) / 255, atol=2 / 255, err_msg=name)


# ---------------------------------------------------------------- listing
def test_list_images_recursive_filtered_sorted(tmp_path):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    img = Image.fromarray(_rgb(4, 4))
    for rel in ["z.JPG", "a/y.Png", "b/deep/x.jpeg", "b/w.bmp", "b/v.WEBP"]:
        img.save(tmp_path / rel, format={"jpg": "JPEG", "png": "PNG", "peg": "JPEG", "bmp": "BMP", "ebp": "WEBP"}[rel[-3:].lower()])
    for rel in ["notes.txt", "a/anim.gif", "b/labels.csv"]:
        (tmp_path / rel).write_text("x")
    got = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert got == ["a/y.Png", "b/deep/x.jpeg", "b/v.WEBP", "b/w.bmp", "z.JPG"]


# ---------------------------------------------------------------- folder source and its errors
def test_folder_loads_with_size_limit_in_sorted_order(tmp_path):
    d = _folder(tmp_path, n=5)
    cs = load_calibration(d, IMG_SPEC, size=3)
    assert cs.num_samples == 3 and [p.name for p in cs.files] == ["img0.png", "img1.png", "img2.png"]
    st = cs.stacked()["images"]
    assert st.shape == (3, 3, 8, 8) and st.dtype == np.float32
    assert [b["images"].shape[0] for b in cs.batches(2)] == [2, 1]


def test_nhwc_model_gets_nhwc_samples(tmp_path):
    d = _folder(tmp_path, n=2)
    cs = load_calibration(d, {"x": ([1, 8, 8, 3], np.float32)})
    assert cs.stacked()["x"].shape == (2, 8, 8, 3)
    assert [b["x"].shape[0] for b in cs.batches(32)] == [1, 1]  # static batch 1 wins over batch_size


def test_missing_path(tmp_path):
    with pytest.raises(OnnxflexError, match="does not exist"):
        load_calibration(tmp_path / "nope", IMG_SPEC)


def test_empty_folder_and_only_txt(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnnxflexError, match=r"no images in .*jpg/jpeg/png/bmp/webp"):
        load_calibration(tmp_path / "empty", IMG_SPEC)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("hello")
    with pytest.raises(OnnxflexError, match="no images"):
        load_calibration(tmp_path / "txt", IMG_SPEC)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="running as root: chmod 000 does not block reads")
def test_unreadable_folder(tmp_path):
    d = _folder(tmp_path, n=1)
    d.chmod(0)
    try:
        with pytest.raises(OnnxflexError, match="permission denied"):
            load_calibration(d, IMG_SPEC)
    finally:
        d.chmod(0o755)


def test_unreadable_folder_simulated(tmp_path, monkeypatch):
    """Same check as above, runnable as root: make the directory scan fail like chmod 000 would."""
    d = _folder(tmp_path, n=1)

    def deny(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", deny)
    with pytest.raises(OnnxflexError, match="permission denied"):
        load_calibration(d, IMG_SPEC)


def test_corrupt_image_skipped_with_warning_or_error_if_none_load(tmp_path):
    d = _folder(tmp_path, n=2)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        cs = load_calibration(d, IMG_SPEC)
    assert cs.num_samples == 2
    only = tmp_path / "only"
    only.mkdir()
    (only / "broken.png").write_bytes(b"garbage")
    with pytest.raises(OnnxflexError, match="broken.png"):
        load_calibration(only, IMG_SPEC)


def test_dynamic_hw_needs_size(tmp_path):
    d = _folder(tmp_path, n=1)
    spec = {"x": (["N", 3, "H", "W"], np.float32)}
    with pytest.raises(OnnxflexError, match="--size"):
        load_calibration(d, spec)
    cs = load_calibration(d, spec, preprocess=make_preprocess("torch", size=6))
    assert cs.stacked()["x"].shape == (1, 3, 6, 6)


def test_folder_needs_single_square_image_input(tmp_path):
    d = _folder(tmp_path, n=1)
    with pytest.raises(OnnxflexError, match="one input"):
        load_calibration(d, {"a": ([1, 3, 8, 8], np.float32), "b": ([1, 4], np.float32)})
    with pytest.raises(OnnxflexError, match="not an image batch"):
        load_calibration(d, {"ids": ([1, 16], np.int64)})
    with pytest.raises(OnnxflexError, match="not square"):
        resolve_image_input({"x": ([1, 3, 8, 12], np.float32)})
    with pytest.raises(OnnxflexError, match="--size 8"):
        resolve_image_input({"x": ([1, 3, 8, 8], np.float32)}, make_preprocess(size=7))


def test_augment_adds_seeded_crop_views_after_each_image(tmp_path):
    d = _folder(tmp_path, n=3, size=20)
    plain = load_calibration(d, IMG_SPEC, size=2)
    a = load_calibration(d, IMG_SPEC, size=2, augment=2, seed=1)
    b = load_calibration(d, IMG_SPEC, size=2, augment=2, seed=1)
    c = load_calibration(d, IMG_SPEC, size=2, augment=2, seed=2)
    x = a.stacked()["images"]
    assert x.shape == (6, 3, 8, 8) and [p.name for p in a.files] == ["img0.png", "img1.png"]
    np.testing.assert_array_equal(x[[0, 3]], plain.stacked()["images"])  # center crop first, then its views
    np.testing.assert_array_equal(x, b.stacked()["images"])
    assert not np.array_equal(x, c.stacked()["images"])


# ---------------------------------------------------------------- array sources
SPEC2 = {"x": ([None, 4], np.float32), "ids": ([None, 3], np.int64)}


def test_npy_with_and_without_batch_dim(tmp_path):
    spec = {"x": (["n", 2, 3], np.float32)}
    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.float64).reshape(2, 2, 3))  # float64 -> float32
    np.save(tmp_path / "b.npy", np.ones((2, 3), np.float32))  # no batch dim
    cs = load_calibration([tmp_path / "a.npy", tmp_path / "b.npy"], spec)
    st = cs.stacked()["x"]
    assert st.shape == (3, 2, 3) and st.dtype == np.float32 and st[1, 1, 2] == 11


def test_npy_wrong_shape_names_input_and_shapes(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((2, 3, 5, 5), np.float32))
    with pytest.raises(OnnxflexError, match=r"'images'.*\[2, 3, 5, 5\].*\[\?,3,8,8\]"):
        load_calibration(tmp_path / "a.npy", IMG_SPEC)
    np.save(tmp_path / "r.npy", np.ones((5,), np.float32))
    with pytest.raises(OnnxflexError, match="rank 4"):
        load_calibration(tmp_path / "r.npy", IMG_SPEC)


def test_npz_keys(tmp_path):
    np.savez(tmp_path / "ok.npz", x=np.ones((2, 4), np.float32), ids=np.zeros((2, 3), np.int32))  # int32 -> int64
    cs = load_calibration(tmp_path / "ok.npz", SPEC2)
    assert cs.num_samples == 2 and cs.stacked()["ids"].dtype == np.int64
    np.savez(tmp_path / "miss.npz", x=np.ones((2, 4), np.float32))
    with pytest.raises(OnnxflexError, match="missing input.*'ids'"):
        load_calibration(tmp_path / "miss.npz", SPEC2)
    np.savez(tmp_path / "extra.npz", x=np.ones((2, 4), np.float32), ids=np.zeros((2, 3), np.int64), mask=np.ones(3))
    with pytest.raises(OnnxflexError, match="unknown key.*'mask'"):
        load_calibration(tmp_path / "extra.npz", SPEC2)


def test_unsafe_dtype_refused():
    with pytest.raises(OnnxflexError, match="expects float32"):
        load_calibration([{"x": np.ones((1, 4), np.uint8), "ids": np.zeros((1, 3), np.int64)}], SPEC2)
    with pytest.raises(OnnxflexError, match="do not fit"):
        load_calibration([{"x": np.ones((1, 4), np.float32), "ids": np.full((1, 3), 300)}], {"x": SPEC2["x"], "ids": ([None, 3], np.int8)})


def test_iterable_source_batches_and_limit():
    def gen():
        for i in range(3):
            yield {"x": np.full((2, 4), i, np.float32), "ids": np.full((2, 3), i, np.int64)}

    cs = load_calibration(gen(), SPEC2, size=5)
    assert cs.num_samples == 5 and isinstance(cs, CalibrationSet)
    b = list(cs.batches(4))
    assert [v["x"].shape for v in b] == [(4, 4), (1, 4)]
    np.testing.assert_array_equal(cs.stacked()["ids"][:, 0], [0, 0, 1, 1, 2])
    with pytest.raises(OnnxflexError, match="batch sizes"):
        load_calibration([{"x": np.ones((2, 4), np.float32), "ids": np.zeros((3, 3), np.int64)}], SPEC2)
    with pytest.raises(OnnxflexError, match="no samples"):
        load_calibration(iter([]), SPEC2)
    with pytest.raises(OnnxflexError, match="dict"):
        load_calibration([1, 2], SPEC2)


# ---------------------------------------------------------------- synthetic photos
def test_synthetic_set_deterministic_and_real():
    pp = make_preprocess("torch")
    a = synthetic_image_calibration(6, 32, pp, seed=3)
    b = synthetic_image_calibration(6, 32, pp, seed=3)
    c = synthetic_image_calibration(6, 32, pp, seed=4)
    assert len(a) == 6 and all(x.shape == (3, 32, 32) and x.dtype == np.float32 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert all(float(x.std()) > 0.1 for x in a)  # textured photos, not flat fills
    assert len({x.tobytes() for x in a}) == 6


# ---------------------------------------------------------------- real images
@pytest.mark.skipif(not (SAMPLE / "calib").is_dir(), reason=f"real images not found at {SAMPLE}/calib (shared data is outside the repo)")
def test_real_calib_folder_tf_preset():
    cs = load_calibration(SAMPLE / "calib", {"images": ([None, 3, 224, 224], np.float32)}, size=8, preprocess=make_preprocess("tf"))
    x = cs.stacked()["images"]
    assert x.shape == (8, 3, 224, 224) and x.dtype == np.float32
    assert np.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.2
