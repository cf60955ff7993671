"""Input recipes: calibration and held-out feeds for each corpus model, made the way its package makes them.

Images come from ../shared/data/imagenet-sample (calib/ for calibration, val/ for held-out) and are
resized and normalised as the package's own preprocessing does (read from its code in the wheel);
other inputs are plausible arrays of the right dtype and shape (token ids in the vocabulary, audio in
[-1, 1], zero recurrent state, the sample rate as a scalar). Every feed dict is one sample with a
batch dim of 1 (rank-0 inputs stay rank 0), which is what ``onnxflex quantize --calib x.npz`` reads.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
IMAGENET = ROOT.parent / "shared" / "data" / "imagenet-sample"
SPLIT_SEED = {"calib": 0, "held": 1}


def imagenet_available() -> bool:
    return (IMAGENET / "calib").is_dir() and (IMAGENET / "val").is_dir()


def _images(split: str, n: int) -> list[Path]:
    folder = IMAGENET / ("calib" if split == "calib" else "val")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if len(files) < n:
        raise FileNotFoundError(f"need {n} images in {folder}, found {len(files)} (../shared beside the repo)")
    return files[:n]


def _resize(img, w: int, h: int):
    from PIL import Image

    return img.resize((max(1, w), max(1, h)), Image.BILINEAR)


def preprocess_image(path: Path, size, fit="stretch", color="rgb", scale=1 / 255, mean=None, std=None, resize=None,
                     pad=0, aspect=None, layout="nchw") -> np.ndarray:
    """One image as the model's input, [1, C, H, W] (or NHWC).

    fit: ``stretch`` to H x W; ``crop`` (short side to ``resize`` or to fill H x W, centre crop);
    ``letterbox`` (fit inside, top-left, the rest ``pad`` in pixel values, or 0 after normalising
    when pad is None); ``line`` (a centre band of aspect ``aspect`` as a text line: height H, width
    up to W, zeros on the right after normalising, as PaddleOCR's rec/cls preprocessing).
    """
    from PIL import Image

    img = Image.open(path).convert("L" if color == "gray" else "RGB")
    H, W = size
    w, h = img.size
    valid = (H, W)
    if fit == "stretch":
        img = _resize(img, W, H)
    elif fit == "crop":
        s = max(H / h, W / w) if resize is None else resize / min(h, w)
        img = _resize(img, round(w * s), round(h * s))
        left, top = (img.size[0] - W) // 2, (img.size[1] - H) // 2
        img = img.crop((left, top, left + W, top + H))
    elif fit == "letterbox":
        s = min(H / h, W / w)
        img = _resize(img, int(w * s), int(h * s))
        valid = (img.size[1], img.size[0])
        canvas = Image.new(img.mode, (W, H), 0 if pad is None else (pad if color == "gray" else (pad,) * 3))
        canvas.paste(img, (0, 0))
        img = canvas
    elif fit == "line":
        band = min(h, round(w / aspect))
        top = (h - band) // 2
        img = img.crop((0, top, w, top + band))
        rw = min(W, math.ceil(H * img.size[0] / img.size[1]))
        img = _resize(img, rw, H)
        valid = (H, rw)
    else:
        raise ValueError(f"unknown fit {fit!r}")
    x = np.asarray(img, dtype=np.float32)
    x = x[..., None] if x.ndim == 2 else x
    if color == "bgr":
        x = x[..., ::-1]
    x = x * scale
    if mean is not None:
        x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    if fit == "line" or (fit == "letterbox" and pad is None):  # padding is zero after normalising
        out = np.zeros((H, W, x.shape[2]), np.float32)
        out[: valid[0], : valid[1]] = x[: valid[0], : valid[1]]
        x = out
    x = x[None] if layout == "nhwc" else x.transpose(2, 0, 1)[None]
    return np.ascontiguousarray(x, dtype=np.float32)


def image(entry, model, split, n):
    params = dict(entry.params)
    name = params.pop("input", None) or _input_names(model)[0]
    return [{name: preprocess_image(p, **params)} for p in _images(split, n)]


def tokens(entry, model, split, n):
    """Random token ids in the vocabulary range ([CLS] ... [SEP] when given), mask all ones."""
    p = entry.params
    rng = np.random.default_rng(SPLIT_SEED[split])
    out = []
    for _ in range(n):
        ids = rng.integers(*p["vocab"], size=p["seq"])
        if "cls" in p:
            ids[0], ids[-1] = p["cls"], p["sep"]
        feed = {p["ids"]: ids[None].astype(np.int64)}
        if p.get("mask"):
            feed[p["mask"]] = np.ones((1, p["seq"]), dtype=p.get("mask_dtype", "int64"))
        out.append(feed)
    return out


def speech_like(rng, samples: int, rate: int = 16000) -> np.ndarray:
    """Audio-like float noise in [-1, 1]: a few harmonics with a syllable-rate envelope, plus noise."""
    t = np.arange(samples) / rate
    f0 = rng.uniform(90, 250)
    x = sum(rng.uniform(0.1, 0.5) / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) for k in range(1, 6))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, 6.3))
    x = x * env + rng.normal(0, 0.02, samples)
    return np.clip(x / max(1e-6, np.abs(x).max()) * rng.uniform(0.2, 0.9), -1, 1).astype(np.float32)


def audio(entry, model, split, n):
    """Silero VAD: one chunk of audio (or ``frames`` rows of chunks), zero state, the sample rate as a scalar."""
    p = entry.params
    rng = np.random.default_rng(SPLIT_SEED[split])
    out = []
    for _ in range(n):
        rows = p.get("frames", 1)
        feed = {p["input"]: speech_like(rng, rows * p["samples"]).reshape(rows, p["samples"])}
        feed.update({k: np.zeros(shape, np.float32) for k, shape in p["state"].items()})
        if "sr" in p:
            feed["sr"] = np.array(p["sr"], dtype=np.int64)
        out.append(feed)
    return out


def wakeword(entry, model, split, n):
    """openWakeWord's own pipeline on speech-like audio: melspectrogram.onnx -> x/10 + 2 -> 76-frame windows
    -> embedding_model.onnx -> 16 embeddings; each stage's model takes the previous stage's output."""
    import onnxruntime as ort

    from .corpus import extract
    from .manifest import OWW_MODELS

    stage = entry.params["stage"]
    rng = np.random.default_rng(SPLIT_SEED[split])
    sess = {k: ort.InferenceSession(str(extract(entry.package, OWW_MODELS + f"{k}.onnx")), providers=["CPUExecutionProvider"])
            for k in ("melspectrogram", "embedding_model")}
    name = _input_names(model)[0]
    out = []
    for _ in range(n):
        pcm = speech_like(rng, int(entry.params["seconds"] * 16000)) * 32767
        if stage == "mel":
            out.append({name: pcm[None]})
            continue
        mel = sess["melspectrogram"].run(None, {"input": pcm[None]})[0].squeeze() / 10 + 2  # [frames, 32]
        wins = [mel[i: i + 76] for i in range(0, mel.shape[0] - 75, 8)]
        if stage == "embedding":
            out.append({name: wins[0][None, :, :, None].astype(np.float32)})
            continue
        emb = sess["embedding_model"].run(None, {"input_1": np.stack(wins[:16])[..., None].astype(np.float32)})[0]
        out.append({name: emb.reshape(1, 16, 96).astype(np.float32)})
    return out


def file_bytes(entry, model, split, n):
    """Magika's features of real files (this repo's sources, docs and images): the first, middle and last
    ``size`` bytes after stripping whitespace, padded with ``pad``."""
    p = entry.params
    files = sorted(ROOT.glob("onnxflex/**/*.py")) + [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "Makefile"]
    if imagenet_available():
        files += _images("calib", 4)
    files = [f for f in files if f.stat().st_size > 64]
    pick = files[::2] if split == "calib" else files[1::2]
    k = p["size"]
    out = []
    for f in pick[:n]:
        data = f.read_bytes()
        beg, end = data.lstrip()[:k], data.rstrip()[-k:]
        mid_at = max(0, (len(data) - k) // 2)
        mid = data[mid_at: mid_at + k]
        feats = (list(beg) + [p["pad"]] * (k - len(beg)) + list(mid) + [p["pad"]] * (k - len(mid))
                 + [p["pad"]] * (k - len(end)) + list(end))
        out.append({p["input"]: np.asarray(feats, np.float32)[None]})
    return out


def tabular(entry, model, split, n):
    """Uniform rows in each column's range (integer-valued hyper-parameters, as the surrogate was trained on)."""
    rng = np.random.default_rng(SPLIT_SEED[split])
    cols = entry.params["columns"]
    return [{entry.params["input"]: np.array([[rng.integers(lo, hi + 1) for lo, hi in cols]], np.float32)} for _ in range(n)]


def _input_names(model) -> list[str]:
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


RECIPES = dict(image=image, tokens=tokens, audio=audio, wakeword=wakeword, file_bytes=file_bytes, tabular=tabular)


def make_feeds(entry, model, split: str, n: int) -> list[dict]:
    """``n`` feed dicts for ``split`` ("calib" or "held"); calib and held-out never share a sample."""
    return RECIPES[entry.recipe](entry, model, split, n)
