"""LLaMA-style decoder recipes -> ONNX (TorchScript exporter, opset 17).

:func:`tiny_llama` builds a random, small ``LlamaForCausalLM`` (GQA, tied
embeddings, eager attention) for tests; :func:`export_decoder` exports any
``LlamaForCausalLM`` in one of two forms:

``kv_cache=False`` (prefill / scoring)
    inputs ``input_ids``, ``attention_mask`` int64 [batch, seq]
    -> ``logits`` float32 [batch, seq, vocab].
``kv_cache=True`` (generation)
    inputs ``input_ids`` int64 [batch, seq], ``attention_mask`` int64
    [batch, past_seq + seq], ``past_key_values.{i}.key`` / ``.value`` float32
    [batch, kv_heads, past_seq, head_dim] (``past_seq`` may be 0)
    -> ``logits``, ``present.{i}.key`` / ``.value`` [batch, kv_heads,
    past_seq + seq, head_dim].

Both forms compute ``position_ids`` inside the graph from the attention mask
(``cumsum(mask) - 1``, as ``generate()`` does), so left-padded batches get
the same positions as in transformers.  The rotary cos/sin tables are
computed in the graph (Range/Cos/Sin on the position ids), not stored.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from . import IR_VERSION, OPSET

# ONNX protobufs cannot exceed 2 GiB; stay clear of the limit.
_PROTO_LIMIT = 2 ** 31 - 2 ** 26


def tiny_llama(seed: int = 0, layers: int = 2):
    """Random fp32 ``LlamaForCausalLM`` in eval mode: hidden 64, MLP 128,
    4 attention heads over 2 KV heads (GQA), vocab 256, 512 positions,
    tied word embeddings, eager attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    return model


def _wrapper_cls():
    import torch
    import torch.nn as nn

    def positions(attention_mask, seq):
        pos = attention_mask.long().cumsum(-1) - 1
        pos = pos.masked_fill(attention_mask == 0, 1)
        return pos[:, -seq:]

    class Prefill(nn.Module):
        """``LlamaForCausalLM`` without cache: (ids, mask) -> logits."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask):
            pos = positions(attention_mask, input_ids.shape[1])
            return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=pos, use_cache=False).logits

    class WithCache(nn.Module):
        """Flat-tensor form of ``LlamaForCausalLM`` with a ``DynamicCache``:
        (ids, mask, k0, v0, k1, v1, ...) -> (logits, k0', v0', ...)."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, *past):
            from transformers import DynamicCache

            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            cache = DynamicCache(pairs, config=self.lm.config)
            pos = positions(attention_mask, input_ids.shape[1])
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=pos, cache=cache, use_cache=True)
            flat = []
            for layer in out.cache.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return Prefill, WithCache, torch


def decoder_module(model, kv_cache: bool = False):
    """The flat-tensor ``nn.Module`` that :func:`export_decoder` exports.
    Written for the transformers 5 API (``cache=`` argument, ``DynamicCache.layers``)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"models.decoder needs transformers >= 5 (found {transformers.__version__})")
    Prefill, WithCache, _ = _wrapper_cls()
    return (WithCache if kv_cache else Prefill)(model).eval()


def _kv_shape(model):
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, c.num_key_value_heads, head_dim


def io_names(model, kv_cache: bool = False):
    """``(input_names, output_names)`` of the exported decoder."""
    n_layers = _kv_shape(model)[0]
    ins, outs = ["input_ids", "attention_mask"], ["logits"]
    if kv_cache:
        for i in range(n_layers):
            ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


def sample_inputs(model, kv_cache: bool = False, batch: int = 2, seq: int = 7,
                  past: int = 0, seed: int = 0, pad: bool = True):
    """Random inputs (torch tensors, in ``io_names`` order).  With ``pad``
    the later rows are left-padded (mask 0 at the start).  Past keys/values
    are random float32 [batch, kv_heads, past, head_dim]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=g, dtype=torch.int64)
    total = seq + (past if kv_cache else 0)
    mask = torch.ones(batch, total, dtype=torch.int64)
    if pad:
        for b in range(1, batch):
            mask[b, :min(total - 1, 2 * b)] = 0
    args = [ids, mask]
    if kv_cache:
        n_layers, kv_heads, head_dim = _kv_shape(model)
        for _ in range(2 * n_layers):
            args.append(torch.randn(batch, kv_heads, past, head_dim, generator=g))
    return args


def _save(m, path: str) -> None:
    """Save ``m`` at ``path``; tensors go to ``path + ".data"`` when the
    model would not fit a single protobuf."""
    import onnx

    data = path + ".data"
    if os.path.exists(data):
        os.remove(data)
    size = sum(t.ByteSize() for t in m.graph.initializer)
    size += sum(n.ByteSize() for n in m.graph.node if n.op_type == "Constant")
    if size > _PROTO_LIMIT:
        onnx.save_model(m, path, save_as_external_data=True,
                        all_tensors_to_one_file=True,
                        location=os.path.basename(data), size_threshold=1024)
        onnx.checker.check_model(path)
    else:
        onnx.checker.check_model(m)
        onnx.save_model(m, path)


def check_decoder(model, path, kv_cache: bool = False, past_lens=(0, 5),
                  rtol: float = 1e-4, seq: int = 7) -> float:
    """Run the ONNX decoder at ``path`` in onnxruntime (CPU) and compare
    with torch; raise ``AssertionError`` when logits (or presents) differ by
    more than ``rtol`` relative to the largest torch logit.  Returns the
    worst relative error."""
    import numpy as np
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ins, _ = io_names(model, kv_cache)
    module = decoder_module(model, kv_cache)
    worst = 0.0
    for past in (past_lens if kv_cache else (0,)):
        args = sample_inputs(model, kv_cache, seq=seq, past=past)
        with torch.no_grad():
            ref = module(*args)
        ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        got = sess.run(None, {n: a.numpy() for n, a in zip(ins, args)})
        for r, o in zip(ref, got):
            r = r.numpy()
            assert r.shape == o.shape, (r.shape, o.shape)
            err = float(np.abs(r - o).max() / max(np.abs(r).max(), 1e-6))
            worst = max(worst, err)
            assert err <= rtol, f"past={past}: ONNX vs torch relative error {err:.2e} > {rtol}"
    return worst


def export_decoder(model, path, kv_cache: bool = False, opset: int = OPSET,
                   check: bool = True) -> str:
    """Export ``model`` (a ``LlamaForCausalLM``, or a LLaMA-style one such as
    ``Qwen2ForCausalLM``) to ONNX at ``path`` with the
    TorchScript exporter; see the module docstring for the two forms.

    The trace uses a past length of 3 so that ``past_seq`` stays a symbolic
    dimension (a trace at 0 bakes the empty cache in).  Weights are embedded
    unless the model exceeds 2 GiB, then they go to ``path + ".data"``.
    With ``check`` the file is compared with torch in onnxruntime (past
    lengths 0 and 5).  Returns ``str(path)``.
    """
    import onnx
    import torch

    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model = model.eval()
    module = decoder_module(model, kv_cache)
    ins, outs = io_names(model, kv_cache)
    args = sample_inputs(model, kv_cache, seq=4, past=3 if kv_cache else 0)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes["attention_mask"] = {0: "batch", 1: "total_seq" if kv_cache else "seq"}
    for n in ins[2:]:
        axes[n] = {0: "batch", 2: "past_seq"}
    for n in outs[1:]:
        axes[n] = {0: "batch", 2: "total_seq"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # the padding mask's attention_mask[batch_idx, kv_idx]: indices are >= 0
        warnings.filterwarnings("ignore", "Exporting aten::index operator")
        torch.onnx.export(
            module, tuple(args), path, dynamo=False, opset_version=opset,
            input_names=ins, output_names=outs, dynamic_axes=axes,
            do_constant_folding=True,
        )
    folder = Path(path).parent
    m = onnx.load(path, load_external_data=False)
    # the TorchScript exporter writes one file per tensor for > 2 GiB models,
    # named after the tensor with ':' etc. replaced (onnx::MatMul_7 -> onnx__MatMul_7)
    stale = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    onnx.load_external_data_for_model(m, str(folder))
    m.ir_version = min(m.ir_version, IR_VERSION)
    _save(m, path)
    keep = {Path(path).name, Path(path).name + ".data"}
    for name in stale - keep:
        f = folder / name
        if f.is_file():
            f.unlink()
    if check:
        check_decoder(model, path, kv_cache)
    return path


def save_tokenizer(tokenizer, folder) -> str:
    """Write ``tokenizer.json`` (+ ``tokenizer_config.json`` and friends) to
    ``folder``.  ``tokenizer`` is a transformers tokenizer or a
    ``tokenizers.Tokenizer``.  Returns the ``tokenizer.json`` path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
        if not (folder / "tokenizer.json").exists():  # a slow tokenizer
            tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    else:
        tokenizer.save(str(folder / "tokenizer.json"))
    return str(folder / "tokenizer.json")
