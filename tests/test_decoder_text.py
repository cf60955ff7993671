"""Decoder LMs and text: one token stream cut into windows (calibration and perplexity), empty-KV feeds,
perplexity / KL / agreement, and the CLI (eval --perplexity, quantize with --seq-len)."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

tokenizers = pytest.importorskip("tokenizers", reason="text calibration needs the tokenizers library")

from onnxflex.calib import load_calibration  # noqa: E402
from onnxflex.calib.text import read_text_stream, tokenize_stream  # noqa: E402
from onnxflex.calib.windows import (  # noqa: E402
    decoder_feeds,
    is_decoder,
    is_past_input,
    proto_io_specs,
    token_windows,
)
from onnxflex.cli import main  # noqa: E402
from onnxflex.errors import OnnxflexError  # noqa: E402
from onnxflex.runtime.perplexity import perplexity  # noqa: E402

SENTENCES = ["the cat sat on the mat.", "hello world, the dog ran!", "a big cat and a small dog."]
KV = {"input_ids": (["batch", "seq"], np.int64), "attention_mask": (["batch", "total_seq"], np.int64),
      "past_key_values.0.key": (["batch", 2, "past_seq", 16], np.float32),
      "past_key_values.0.value": (["batch", 2, "past_seq", 16], np.float32)}
NO_CACHE = {"input_ids": (["batch", "seq"], np.int64), "attention_mask": (["batch", "seq"], np.int64)}
BERT = {**NO_CACHE, "token_type_ids": (["batch", "seq"], np.int64)}
LOGITS = {"logits": (["batch", "seq", 256], np.float32)}


# ---------------------------------------------------------------------------------------------- helpers
def byte_tokenizer(folder: Path) -> Path:
    """A byte-level BPE with exactly the 256 byte tokens (no merges): one token per UTF-8 byte, no specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def corpus_file(path: Path, n_bytes: int) -> Path:
    """ASCII text of exactly ``n_bytes`` bytes (= tokens with :func:`byte_tokenizer`), lines of sentences."""
    text = ""
    i = 0
    while len(text) < n_bytes:
        text += SENTENCES[i % len(SENTENCES)] + "\n"
        i += 1
    path.write_bytes(text[:n_bytes].encode("ascii"))
    return path


def const_lm(path: Path, logits: np.ndarray, kv: bool = False, name: str = "logits", extra_input: str | None = None) -> Path:
    """An ONNX 'LM' whose logits are ``logits`` ([V]) at every position, whatever the tokens:
    input_ids, attention_mask (+ an empty-able past_key_values.0.key/value with ``kv``)."""
    v = len(logits)
    ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_seq"])]
    nodes = [helper.make_node("Shape", ["input_ids"], ["s"]),
             helper.make_node("Concat", ["s", "vdim"], ["shape"], axis=0),
             helper.make_node("Expand", ["table", "shape"], [name])]
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", v])]
    if kv:
        for kind in ("key", "value"):
            n = f"past_key_values.0.{kind}"
            ins.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 2, "past_seq", 4]))
            nodes.append(helper.make_node("Identity", [n], [f"present.0.{kind}"]))
            outs.append(helper.make_tensor_value_info(f"present.0.{kind}", TensorProto.FLOAT, ["batch", 2, "past_seq", 4]))
    if extra_input:
        ins.append(helper.make_tensor_value_info(extra_input, TensorProto.INT64, ["batch", "seq"]))
    inits = [helper.make_tensor("vdim", TensorProto.INT64, [1], [v]),
             helper.make_tensor("table", TensorProto.FLOAT, [v], np.asarray(logits, np.float32).tolist())]
    m = helper.make_model(helper.make_graph(nodes, "const_lm", ins, outs, inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def _invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _user_error(res, *words):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error:"), last
    for w in words:
        assert w.lower() in last.lower(), last


@pytest.fixture
def tok_dir(tmp_path):
    return byte_tokenizer(tmp_path / "tok")


@pytest.fixture(scope="module")
def tiny_decoders(tmp_path_factory):
    """The tiny random LLaMA exported both ways, its byte tokenizer and a corpus."""
    pytest.importorskip("transformers")
    from models.decoder import export_decoder, tiny_llama

    d = tmp_path_factory.mktemp("decoder")
    model = tiny_llama(seed=0, layers=2)
    plain = export_decoder(model, d / "tiny.onnx", kv_cache=False)
    kv = export_decoder(model, d / "tiny_kv.onnx", kv_cache=True)
    return dict(model=model, plain=Path(plain), kv=Path(kv), tok=byte_tokenizer(d / "tok"),
                corpus=corpus_file(d / "corpus.txt", 1000))


# ---------------------------------------------------------------------------------------------- windows
def test_token_windows_are_consecutive_and_non_overlapping():
    ids = np.arange(50)
    w = token_windows(ids, 8, 3)
    assert w.dtype == np.int64 and w.shape == (3, 8)
    np.testing.assert_array_equal(w, np.arange(24).reshape(3, 8))
    allw = token_windows(ids, 8)  # None: every full window, the partial tail dropped
    np.testing.assert_array_equal(allw, np.arange(48).reshape(6, 8))


def test_short_corpus_gives_the_windows_it_has_with_a_warning():
    with pytest.warns(UserWarning, match=r"holds 6 full window\(s\) of 8 tokens .*fewer than the 10"):
        w = token_windows(np.arange(50), 8, 10)
    assert w.shape == (6, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token_windows(np.arange(50), 8, 6)  # exactly enough: no warning


def test_zero_windows_is_an_error_naming_tokens_and_seq_len():
    with pytest.raises(OnnxflexError, match=r"has 5 token\(s\), fewer than one window of --seq-len 8; use --seq-len 5"):
        token_windows(np.arange(5), 8, 4)
    with pytest.raises(OnnxflexError, match="at least 2"):
        token_windows(np.arange(5), 1)


# ---------------------------------------------------------------------------------------------- detection
def test_is_decoder_rules():
    assert is_past_input("past_key_values.3.value") and is_past_input("past.0.key") and is_past_input("key_cache.1")
    assert not is_past_input("input_ids") and not is_past_input("attention_mask")
    assert is_decoder(KV)  # a KV cache input alone decides
    assert is_decoder({**NO_CACHE, "position_ids": (["batch", "seq"], np.int64)})
    assert not is_decoder(NO_CACHE)  # ambiguous without outputs: the encoder protocol
    assert is_decoder(NO_CACHE, LOGITS)  # a [batch, seq, vocab] logits output
    assert not is_decoder(NO_CACHE, {"last_hidden_state": (["batch", "seq", 64], np.float32)})
    assert not is_decoder(BERT, LOGITS)  # token_type_ids: an encoder (masked LM)
    assert not is_decoder({"pixel_values": ([1, 3, 8, 8], np.float32)}, LOGITS)


def test_proto_io_specs_of_the_exports(tiny_decoders):
    ins, outs = proto_io_specs(onnx.load(str(tiny_decoders["plain"])))
    assert list(ins) == ["input_ids", "attention_mask"] and outs["logits"][0][2] == 256
    assert is_decoder(ins, outs)
    ins, outs = proto_io_specs(onnx.load(str(tiny_decoders["kv"])))
    assert "past_key_values.1.value" in ins and is_decoder(ins)


# ---------------------------------------------------------------------------------------------- feeds
def test_feeds_with_an_empty_kv_cache():
    w = token_windows(np.arange(30), 6, 3)
    feeds = decoder_feeds(w, KV)
    assert len(feeds) == 3
    for i, f in enumerate(feeds):
        assert set(f) == set(KV)
        np.testing.assert_array_equal(f["input_ids"], w[i : i + 1])
        assert f["input_ids"].dtype == np.int64
        assert f["attention_mask"].shape == (1, 6) and f["attention_mask"].dtype == np.int64
        assert (f["attention_mask"] == 1).all()
        for k in ("past_key_values.0.key", "past_key_values.0.value"):
            assert f[k].shape == (1, 2, 0, 16) and f[k].dtype == np.float32


def test_feeds_position_ids_dtypes_and_fp16_cache():
    specs = {"input_ids": (["b", "s"], np.int32), "attention_mask": (["b", "t"], np.float32),
             "position_ids": (["b", "s"], np.int64),
             "past.0.key": (["b", 4, "past_sequence_length", 8], np.float16)}
    f = decoder_feeds(token_windows(np.arange(12), 4, 2), specs)[1]
    np.testing.assert_array_equal(f["input_ids"], [[4, 5, 6, 7]])
    assert f["input_ids"].dtype == np.int32 and f["attention_mask"].dtype == np.float32
    np.testing.assert_array_equal(f["position_ids"], [[0, 1, 2, 3]])
    assert f["position_ids"].dtype == np.int64
    assert f["past.0.key"].shape == (1, 4, 0, 8) and f["past.0.key"].dtype == np.float16


def test_feeds_refuse_what_cannot_be_built():
    w = token_windows(np.arange(12), 4)
    with pytest.raises(OnnxflexError, match="'pixel_values'"):
        decoder_feeds(w, {**NO_CACHE, "pixel_values": ([1, 3], np.float32)})
    with pytest.raises(OnnxflexError, match="dynamic dim 1"):  # kv_heads unknown: no empty past shape
        decoder_feeds(w, {**NO_CACHE, "past_key_values.0.key": (["batch", "heads", "past_seq", 16], np.float32)})
    with pytest.raises(OnnxflexError, match="use --seq-len 8"):
        decoder_feeds(w, {"input_ids": ([1, 8], np.int64)})


def test_feeds_for_both_exports_run(tiny_decoders):
    from onnxflex.runtime.session import input_specs, make_session

    w = token_windows(np.arange(3, 35), 16)
    outs = {}
    for kind in ("plain", "kv"):
        sess = make_session(tiny_decoders[kind])
        specs = input_specs(sess)
        feeds = decoder_feeds(w, specs)
        if kind == "kv":
            assert feeds[0]["past_key_values.0.key"].shape == (1, 2, 0, 16)
            assert feeds[0]["past_key_values.0.key"].dtype == np.float32
        outs[kind] = [sess.run(["logits"], f)[0] for f in feeds]
        assert outs[kind][0].shape == (1, 16, 256)
    for a, b in zip(outs["plain"], outs["kv"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- calibration
def test_load_calibration_routes_a_decoder_to_windows(tmp_path, tok_dir):
    corpus = corpus_file(tmp_path / "c.txt", 100)
    cs = load_calibration(corpus, KV, tokenizer=tok_dir, seq_len=16, size=4)
    ids = tokenize_stream(read_text_stream(corpus), tok_dir)
    assert ids.size == 100  # one token per byte: the file is one stream, newlines included
    assert cs.num_samples == 4 and cs.token_mask is None
    for i, s in enumerate(cs.samples):
        np.testing.assert_array_equal(s["input_ids"][0], ids[16 * i : 16 * (i + 1)])
    b = next(cs.batches(4))  # samples batch together, the empty past included
    assert b["input_ids"].shape == (4, 16) and b["past_key_values.0.key"].shape == (4, 2, 0, 16)


def test_load_calibration_short_corpus_and_forced_protocol(tmp_path, tok_dir):
    corpus = corpus_file(tmp_path / "c.txt", 100)
    with pytest.warns(UserWarning, match=r"6 full window"):
        cs = load_calibration(corpus, KV, tokenizer=tok_dir, seq_len=16, size=10)
    assert cs.num_samples == 6
    with pytest.raises(OnnxflexError, match=r"100 token\(s\).*--seq-len 100"):
        load_calibration(corpus, KV, tokenizer=tok_dir, seq_len=128, size=4)
    # input_ids/attention_mask only: lines + padding, unless forced
    enc = load_calibration(corpus, NO_CACHE, tokenizer=tok_dir, size=3)
    assert enc.token_mask is not None and enc.num_samples == 3
    dec = load_calibration(corpus, NO_CACHE, tokenizer=tok_dir, size=3, seq_len=32, decoder=True)
    assert dec.token_mask is None and dec.samples[0]["input_ids"].shape == (1, 32)
    with pytest.raises(OnnxflexError, match="--tokenizer"):
        load_calibration(corpus, KV, tokenizer=None, seq_len=16)


# ---------------------------------------------------------------------------------------------- perplexity
def test_uniform_logits_have_perplexity_vocab_size(tmp_path):
    model = const_lm(tmp_path / "u.onnx", np.zeros(256))
    res = perplexity(model, np.arange(200) % 256, seq_len=20)
    assert res.windows == 10 and res.tokens == 10 * 19 and res.seq_len == 20
    assert res.perplexity == pytest.approx(256.0, rel=1e-9)
    assert res.ref is None and res.kl is None and res.agreement is None


def test_constant_distribution_perplexity_is_exp_entropy(tmp_path):
    p = np.array([0.5, 0.25, 0.125, 0.125])
    model = const_lm(tmp_path / "p.onnx", np.log(p) + 3.0, kv=True)  # any shift: softmax is the same
    window = [3, 0, 0, 0, 0, 1, 1, 2, 3]  # targets 1..8 have exactly the frequencies p
    res = perplexity(model, np.tile(window, 5), seq_len=9)
    entropy = -(p * np.log(p)).sum()
    assert res.windows == 5 and res.tokens == 40
    assert res.nll == pytest.approx(entropy, rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(entropy), rel=1e-6) == pytest.approx(2 ** 1.75, rel=1e-6)


def test_ref_kl_and_agreement(tmp_path):
    p = np.array([0.5, 0.25, 0.125, 0.125])
    q = np.array([0.4, 0.3, 0.2, 0.1])
    a = const_lm(tmp_path / "a.onnx", np.log(p))
    b = const_lm(tmp_path / "b.onnx", np.log(q), kv=True)
    ids = np.arange(40) % 4
    same = perplexity(a, ids, seq_len=10, ref=a)
    assert same.kl == 0.0 and same.agreement == 1.0 and same.ref_perplexity == same.perplexity
    vs = perplexity(a, ids, seq_len=10, ref=b)  # KL(ref=q || model=p)
    assert vs.kl == pytest.approx(float((q * np.log(q / p)).sum()), rel=1e-6)
    assert vs.agreement == 1.0  # both argmax 0
    c = const_lm(tmp_path / "c.onnx", np.log(p[::-1]))
    assert perplexity(c, ids, seq_len=10, ref=a).agreement == 0.0


def test_perplexity_matches_torch_on_the_tiny_llama(tiny_decoders):
    import torch

    model = tiny_decoders["model"]
    ids = tokenize_stream(read_text_stream(tiny_decoders["corpus"]), tiny_decoders["tok"])
    w = token_windows(ids, 64)
    with torch.no_grad():  # transformers' shifted cross-entropy: tokens 1..N-1 from 0..N-2, per window
        losses = [model(input_ids=torch.as_tensor(x[None]), labels=torch.as_tensor(x[None])).loss.item() for x in w]
    want = math.exp(float(np.mean(losses)))
    for kind in ("plain", "kv"):
        res = perplexity(tiny_decoders[kind], tiny_decoders["corpus"], tiny_decoders["tok"], seq_len=64,
                         ref=tiny_decoders["plain"])
        assert res.windows == len(w) == 15 and res.tokens == 15 * 63
        assert res.perplexity == pytest.approx(want, rel=1e-4)
        assert res.kl == pytest.approx(0.0, abs=1e-6) and res.agreement == 1.0


def test_perplexity_errors(tmp_path, tok_dir):
    lm = const_lm(tmp_path / "u.onnx", np.zeros(8))
    with pytest.raises(OnnxflexError, match="--tokenizer"):
        perplexity(lm, "some text here", None)
    with pytest.raises(OnnxflexError, match=r"has 3 token\(s\)"):
        perplexity(lm, [1, 2, 3], seq_len=8)
    with pytest.raises(OnnxflexError, match="outside the model's vocabulary of 8"):
        perplexity(lm, np.arange(32), seq_len=16)
    enc = const_lm(tmp_path / "e.onnx", np.zeros(8), extra_input="token_type_ids")
    with pytest.raises(OnnxflexError, match="not a decoder"):
        perplexity(enc, np.zeros(32, np.int64), seq_len=16)
    hid = const_lm(tmp_path / "h.onnx", np.zeros(8), name="last_hidden_state")
    with pytest.raises(OnnxflexError, match="not a decoder"):
        perplexity(hid, np.zeros(32, np.int64), seq_len=16)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_eval_perplexity(tiny_decoders):
    d = tiny_decoders
    res = _invoke(["eval", str(d["kv"]), "--data", str(d["corpus"]), "--tokenizer", str(d["tok"]), "--perplexity",
                   "--seq-len", "64", "--ref", str(d["plain"])])
    assert res.exit_code == 0, res.output
    for word in ("windows", "15 x 64", "perplexity", "KL(ref||model)", "top-1 agreement", "100.00 %"):
        assert word in res.output, res.output
    res = _invoke(["eval", str(d["plain"]), "--data", str(d["corpus"]), "--tokenizer", str(d["tok"]), "--perplexity",
                   "--seq-len", "64", "--limit", "2", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["windows"] == 2 and rep["tokens"] == 126 and rep["perplexity"] > 1 and rep["kl"] is None


def test_cli_eval_perplexity_user_errors(tiny_decoders, tmp_path):
    d = tiny_decoders
    base = ["eval", str(d["plain"]), "--data", str(d["corpus"]), "--perplexity"]
    _user_error(_invoke(base), "--tokenizer")
    _user_error(_invoke(base + ["--tokenizer", str(tmp_path / "nope")]), "does not exist")
    _user_error(_invoke(base + ["--tokenizer", str(d["tok"]), "--seq-len", "4096"]), "1000 token(s)", "--seq-len 1000")
    enc = const_lm(tmp_path / "e.onnx", np.zeros(8), extra_input="token_type_ids")
    _user_error(_invoke(["eval", str(enc), "--data", str(d["corpus"]), "--tokenizer", str(d["tok"]), "--perplexity",
                         "--seq-len", "16"]), "not a decoder")
    _user_error(_invoke(["eval", str(d["plain"]), "--data", str(d["tok"]), "--tokenizer", str(d["tok"]), "--perplexity"]),
                "--perplexity needs a .txt")


def test_cli_quantize_decoder_with_text_windows(tiny_decoders, tmp_path):
    d = tiny_decoders
    out = tmp_path / "out.onnx"
    res = _invoke(["quantize", str(d["plain"]), "--calib", str(d["corpus"]), "--tokenizer", str(d["tok"]),
                   "--seq-len", "16", "--calib-size", "4", "--method", "rtn", "--act-bits", "0", "--weight-bits", "4",
                   "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads(out.with_suffix(".report.json").read_text())["summary"]
    assert summary["calibration_samples"] == 4
    ppl = perplexity(out, d["corpus"], d["tok"], seq_len=64, ref=d["plain"])
    assert math.isfinite(ppl.perplexity) and ppl.agreement > 0.5
