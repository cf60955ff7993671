"""onnxflex.runtime.generate: greedy decoding with ONNX decoders, no-cache and KV-cache forms.

One tiny LlamaForCausalLM (2 layers) is exported once per form.  Its weights are re-drawn larger than
tiny_llama's 0.02 init: with that init and tied embeddings every step just repeats the last prompt token,
which would make token-for-token comparisons vacuous (the tests assert the tokens vary).
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from models import decoder
from onnxflex.api import quantize
from onnxflex.errors import OnnxflexError
from onnxflex.runtime.generate import greedy, pair_cache, tokens_per_second

PROMPT = [1, 17, 42, 99, 5, 200, 33, 8]
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16


@pytest.fixture(scope="module")
def tiny(one_thread):
    m = decoder.tiny_llama(seed=0, layers=LAYERS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:  # embedding std 1, projections std 2/sqrt(fan_in): varied greedy tokens
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else 2.0 / p.shape[1] ** 0.5))
    return m


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("generate")


@pytest.fixture(scope="module")
def exported(tiny, folder):
    return {kv: decoder.export_decoder(tiny, folder / f"tiny_{'kv' if kv else 'nocache'}.onnx", kv_cache=kv)
            for kv in (False, True)}


@pytest.fixture(scope="module")
def quantized(exported, folder):
    """Both exports quantized with RTN W4 (block 32, weights only) from the same 8 random 32-token windows."""
    ids = np.random.default_rng(0).integers(3, 256, (8, 32)).astype(np.int64)
    feeds = {False: dict(input_ids=ids, attention_mask=np.ones_like(ids))}
    past = np.zeros((8, KV_HEADS, 0, HEAD_DIM), np.float32)
    feeds[True] = dict(feeds[False], **{f"past_key_values.{i}.{k}": past for i in range(LAYERS) for k in ("key", "value")})
    out = {}
    for kv, src in exported.items():
        tag = "kv" if kv else "nocache"
        calib = folder / f"calib_{tag}.npz"
        np.savez(calib, **feeds[kv])
        out[kv] = str(folder / f"q_{tag}.onnx")
        quantize(src, out[kv], str(calib), method="rtn", weight_bits=4, act_bits=0, block_size=32, progress=False)
    return out


def _torch_greedy(model, prompt, steps):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_nocache_matches_transformers(tiny, exported):
    ref = _torch_greedy(tiny, PROMPT, 16)
    assert len(ref) == 16 and len(set(ref)) > 8  # no early stop, and not one repeated token
    assert greedy(exported[False], PROMPT, steps=16, threads=1) == ref


def test_kv_matches_nocache(exported):
    full = greedy(exported[False], PROMPT, steps=32, threads=1)
    assert len(full) == 32 and len(set(full)) > 8
    assert greedy(exported[True], PROMPT, steps=32, threads=1) == full
    assert greedy(exported[True], PROMPT, steps=0) == []
    assert greedy(exported[True], PROMPT, steps=1) == full[:1]  # prefill only


def _dq_weights(path) -> dict[str, list[np.ndarray]]:
    """{MatMul node name: [integer weight, scale, zero point] of the DequantizeLinear feeding it}."""
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    dq = {o: n for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    out = {}
    for n in m.graph.node:
        if n.op_type != "MatMul":
            continue
        for x in n.input:
            if x in dq and dq[x].input[0] in inits:
                out[n.name] = [numpy_helper.to_array(inits[t]) for t in dq[x].input if t in inits]
    return out


def test_quantized_kv_matches_nocache(exported, quantized):
    a, b = _dq_weights(quantized[False]), _dq_weights(quantized[True])
    assert len(a) == 7 * LAYERS + 1  # q, k, v, o, gate, up, down per layer + lm_head
    assert sorted(a) == sorted(b)
    for name in a:
        assert len(a[name]) == len(b[name]) >= 2, name
        for x, y in zip(a[name], b[name]):
            assert x.dtype == y.dtype and np.array_equal(x, y), name
    full = greedy(quantized[False], PROMPT, steps=32, threads=1)
    assert len(set(full)) > 8
    assert greedy(quantized[True], PROMPT, steps=32, threads=1) == full
    assert full != greedy(exported[False], PROMPT, steps=32, threads=1)  # W4 really changed the model


def test_tokens_per_second(exported):
    for path in exported.values():
        n, secs = tokens_per_second(path, PROMPT, steps=4, threads=1)
        assert n == 4 and secs > 0
    with pytest.raises(OnnxflexError, match="steps"):
        tokens_per_second(exported[True], PROMPT, steps=0)


class _WithPositions(torch.nn.Module):
    """KV-cache decoder that takes position_ids and names its cache past.{i}.* -> present.{i}.*."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)], config=self.lm.config)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      cache=cache, use_cache=True)
        flat = []
        for layer in out.cache.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def test_position_ids_and_past_names(tiny, exported, folder):
    ins = ["input_ids", "attention_mask", "position_ids"]
    outs = ["logits"]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    for i in range(LAYERS):
        for k in ("key", "value"):
            ins.append(f"past.{i}.{k}")
            outs.append(f"present.{i}.{k}")
            axes[ins[-1]] = {0: "batch", 2: "past"}
            axes[outs[-1]] = {0: "batch", 2: "total"}
    ids = torch.randint(3, 256, (1, 4))
    args = (ids, torch.ones(1, 7, dtype=torch.int64), torch.arange(3, 7)[None]) + tuple(
        torch.randn(1, KV_HEADS, 3, HEAD_DIM) for _ in range(2 * LAYERS))
    path = folder / "tiny_positions.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_WithPositions(tiny).eval(), args, str(path), dynamo=False, opset_version=17,
                          input_names=ins, output_names=outs, dynamic_axes=axes)
    full = greedy(exported[False], PROMPT, steps=16, threads=1)
    assert greedy(path, PROMPT, steps=16, threads=1) == full


def test_pair_cache_rule():
    assert pair_cache(["input_ids", "past_key_values.0.key", "past_key_values.0.value"],
                      ["logits", "present.0.value", "present.0.key"]) == {
        "past_key_values.0.key": "present.0.key", "past_key_values.0.value": "present.0.value"}
    assert pair_cache(["past_key_3", "past.1.value"], ["present_key_3", "present.1.value"]) == {
        "past_key_3": "present_key_3", "past.1.value": "present.1.value"}
    assert pair_cache(["input_ids", "attention_mask"], ["logits"]) == {}  # no-cache form


def _unpaired_model() -> onnx.ModelProto:
    """Past inputs whose outputs are named cache_out.*: nothing says which output feeds which input."""
    past = [helper.make_tensor_value_info(f"past_key_values.0.{k}", TensorProto.FLOAT, ["batch", KV_HEADS, "past", HEAD_DIM])
            for k in ("key", "value")]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])
    nodes = [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["f", "axes"], ["logits"]),
             helper.make_node("Identity", ["past_key_values.0.key"], ["cache_out.0"]),
             helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"])]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 1]),
            helper.make_tensor_value_info("cache_out.0", TensorProto.FLOAT, ["batch", KV_HEADS, "past", HEAD_DIM]),
            helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, ["batch", KV_HEADS, "past", HEAD_DIM])]
    g = helper.make_graph(nodes, "unpaired", [ids, mask] + past, outs,
                          [numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m


def test_unpaired_cache_is_a_clear_error():
    m = _unpaired_model()
    with pytest.raises(OnnxflexError, match=r"'past_key_values\.0\.key' have no matching output") as e:
        greedy(m, PROMPT, steps=4)
    assert "past_key_values.0.value" not in str(e.value).split("have no")[0]  # that one pairs
    assert "cache_out.0" in str(e.value)  # the outputs are listed
    with pytest.raises(OnnxflexError, match="would all be fed from output 'present.0.key'"):
        pair_cache(["past.0.key", "past_key_values.0.key"], ["present.0.key"])
