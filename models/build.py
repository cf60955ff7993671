"""Model registry + CLI.

    python -m models.build efficientnet_lite0 -o PATH [--exporter torchscript|dynamo]
    python -m models.build --list
    python -m models.build efficientnet_lite0 --eval [--limit N]   # FP32 top-1 on the sample

``MODELS[name] = (build_fn, PREPROCESS)``; ``build_fn(path, exporter=...) -> path``.
``PREPROCESS`` is a dict (image models: mean, std, resize, size, interpolation;
MiniLM: tokenizer settings).  :func:`preprocess_image` / :func:`load_imagenet_sample`
apply an image dict, so benchmarks and tests share one implementation.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from functools import partial
from pathlib import Path
from typing import Callable

from . import efficientnet_lite, efficientnet_lite1, efficientnet_lite2, minilm, paraphrase_minilm_l3, qwen, smollm2

MODELS: dict[str, tuple[Callable[..., str], dict]] = {
    "efficientnet_lite0": (efficientnet_lite.build_efficientnet_lite0,
                           efficientnet_lite.PREPROCESS),
    "efficientnet_lite1": (efficientnet_lite1.build_efficientnet_lite1,
                           efficientnet_lite1.PREPROCESS),
    "efficientnet_lite2": (efficientnet_lite2.build_efficientnet_lite2,
                           efficientnet_lite2.PREPROCESS),
    "minilm": (minilm.build_minilm, minilm.PREPROCESS),
    "paraphrase_minilm_l3": (paraphrase_minilm_l3.build_paraphrase_minilm_l3, minilm.PREPROCESS),
    # decoder LLM: model.onnx (input_ids, attention_mask -> logits) + tokenizer.json beside it
    "smollm2": (smollm2.build_smollm2, smollm2.PREPROCESS),
    # the generation form: + past_key_values.{i}.key/value -> present.{i}.key/value
    "smollm2_kv": (partial(smollm2.build_smollm2, kv_cache=True), smollm2.PREPROCESS),
    # Qwen2.5-Coder-0.5B-Instruct (Qwen2: QKV bias); weights in model.onnx.data beside the model
    "qwen05": (qwen.build_qwen, qwen.PREPROCESS),
    "qwen05_kv": (partial(qwen.build_qwen, kv_cache=True), qwen.PREPROCESS),
}

# Image models whose output is ImageNet-1k logits (evaluable with --eval).
IMAGE_MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")

# shared/ sits beside the repository checkout.
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
IMAGENET_SAMPLE = SHARED_DIR / "data" / "imagenet-sample"

_INTERP = {"bilinear": 2, "bicubic": 3, "nearest": 0, "lanczos": 1}


def preprocess_image(path: str | os.PathLike, pp: dict):
    """Load one image as float32 CHW array per the preprocessing dict ``pp``:
    RGB, resize short side to ``pp['resize']`` with ``pp['interpolation']``,
    center-crop ``pp['size']``, scale to 0..1, ``(x - mean) / std``."""
    import numpy as np
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    r = pp["resize"]
    if w <= h:
        nw, nh = r, max(1, int(round(h * r / w)))
    else:
        nw, nh = max(1, int(round(w * r / h))), r
    img = img.resize((nw, nh), resample=_INTERP[pp["interpolation"]])
    s = pp["size"]
    left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
    img = img.crop((left, top, left + s, top + s))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(pp["mean"], np.float32)) / np.asarray(pp["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_imagenet_sample(pp: dict, split: str = "val", limit: int | None = None,
                         root: str | os.PathLike = IMAGENET_SAMPLE):
    """Return ``(x [N,3,S,S] float32, labels [N] int64)`` for the labelled
    sample ``root/split/labels.csv`` (columns file,class_index,wnid,name)."""
    import numpy as np

    d = Path(root) / split
    with open(d / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if limit is not None:
        rows = rows[:limit]
    xs = [preprocess_image(d / r["file"], pp) for r in rows]
    ys = [int(r["class_index"]) for r in rows]
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def ort_session(path: str | os.PathLike, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def top1(path: str | os.PathLike, x, y, batch: int = 16) -> float:
    """Top-1 accuracy of the ONNX classifier at ``path`` on (x, y)."""
    import numpy as np

    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    preds = []
    for i in range(0, len(x), batch):
        preds.append(sess.run(None, {name: x[i:i + batch]})[0].argmax(1))
    return float((np.concatenate(preds) == y).mean())


def build(name: str, path: str | os.PathLike, exporter: str = "torchscript") -> str:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name][0](path, exporter=exporter)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", choices=sorted(MODELS))
    ap.add_argument("-o", "--output", help="ONNX path to write")
    ap.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    ap.add_argument("--list", action="store_true", help="list models and preprocessing")
    ap.add_argument("--eval", action="store_true",
                    help="report FP32 top-1 on the labelled ImageNet sample (image models)")
    ap.add_argument("--limit", type=int, default=None, help="--eval: first N images only")
    a = ap.parse_args(argv)
    if a.list or not a.name:
        for n, (_, pp) in MODELS.items():
            print(f"{n}: {pp}")
        return 0
    if a.eval and a.name not in IMAGE_MODELS:
        ap.error(f"--eval applies to image models: {', '.join(IMAGE_MODELS)}")
    out = a.output
    tmp = None
    if out is None:
        if not a.eval:
            ap.error("-o/--output is required unless --eval is given")
        import tempfile
        tmp = tempfile.TemporaryDirectory()
        out = os.path.join(tmp.name, f"{a.name}.onnx")
    path = build(a.name, out, exporter=a.exporter)
    print(f"wrote {path}" + (" (+ .data)" if os.path.exists(path + ".data") else ""))
    if a.eval:
        x, y = load_imagenet_sample(MODELS[a.name][1], limit=a.limit)
        print(f"{a.name} FP32 top-1 on {len(y)} images: {top1(path, x, y):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
