"""Activation-aware weight scaling (--awq): which MatMul inputs it finds in a decoder, that the rescaled
model is the same function, that no group rounds worse than before, that it helps where one input channel
carries outsized activations, and that it is off unless asked for."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from models import decoder
from onnxflex import QuantConfig, quantize
from onnxflex.calib.windows import decoder_feeds, proto_io_specs, token_windows
from onnxflex.graph import Graph
from onnxflex.passes.awq_scale import choose_scales, find_groups, rtn_quantizer
from onnxflex.passes.prepare import PreparePass, load_model
from onnxflex.runtime.metrics import sqnr_db
from onnxflex.runtime.session import make_session


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    path = tmp_path_factory.mktemp("awq") / "tiny.onnx"
    return decoder.export_decoder(decoder.tiny_llama(seed=0, layers=2), str(path), kv_cache=False)


def _windows(path, n=12, seq=32):
    ids = np.random.default_rng(0).integers(0, 256, n * seq)
    return decoder_feeds(token_windows(ids, seq, n), proto_io_specs(onnx.load(path))[0])


def test_finds_the_norm_gains_and_up_projections_of_each_layer(tiny):
    graph = Graph(PreparePass().prepare(load_model(tiny)))
    groups = find_groups(graph)
    kinds = [(g.kind, sorted(r.split("/")[-2] for r in g.readers)) for g in groups]
    layer = [("gain", ["k_proj", "q_proj", "v_proj"]), ("gain", ["gate_proj", "up_proj"]), ("product", ["down_proj"])]
    # two layers, then the final norm -> LM head; the o projection (reads attention, no gain) is not a group
    assert kinds[:6] == layer * 2, kinds
    assert kinds[6:] == [("gain", ["lm_head"])], kinds
    for g in groups:
        if g.kind == "product":  # 1/s goes into the up projection's columns, which feed only this Mul
            assert graph.array(g.source).shape[1] == g.channels


def test_rescaled_model_is_the_same_function_and_rounds_no_worse(tiny, tmp_path):
    feeds = _windows(tiny)
    res = quantize(tiny, tmp_path / "q.onnx", feeds, QuantConfig(method="rtn", weight_bits=4, act_bits=0, block_size=32,
                                                                 awq=True, progress=False))
    info = res.summary["awq"]
    assert info["groups"] == 7 and info["scaled"] >= 1
    assert info["fp32_change_sqnr_db"] > 100  # float rounding only
    assert all(g["error_ratio"] <= 1.0 for g in info["per_group"])  # alpha = 0 is on the grid
    assert any(g["error_ratio"] < 0.999 for g in info["per_group"])
    # the quantized model differs from the one without scaling (the scales reached the weights)
    plain = quantize(tiny, tmp_path / "p.onnx", feeds, QuantConfig(method="rtn", weight_bits=4, act_bits=0,
                                                                   block_size=32, awq=False, progress=False))
    assert "awq" not in plain.summary
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "p.onnx")).graph.initializer}
    assert any(k in b and a[k].shape == b[k].shape and not np.array_equal(a[k], b[k]) for k in a)


def _outlier_model(path, k=64, n=48):
    """x -> Mul(gain) -> MatMul(W): input channel 0 carries 30x the activations of the others."""
    rng = np.random.default_rng(0)
    gain = np.ones(k, np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    nodes = [helper.make_node("Mul", ["x", "gain"], ["h"], name="norm"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="proj")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
                          [numpy_helper.from_array(gain, "gain"), numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    x = rng.standard_normal((256, k)).astype(np.float32)
    x[:, :4] *= 30.0
    return x


def test_outlier_channels_round_better_scaled(tmp_path):
    """Block-16 W4 RTN of a MatMul whose input has 4 loud channels: scaling those rows up before rounding
    (and the gain down) lowers the output error on held-out inputs (22.7 -> 25.2 dB when written)."""
    path = tmp_path / "outlier.onnx"
    x = _outlier_model(path)
    ref = make_session(str(path), optimization="disable").run(None, {"x": x[192:]})[0]
    got = {}
    for awq in (False, True):
        out = tmp_path / f"q{int(awq)}.onnx"
        res = quantize(str(path), out, [{"x": x[:192]}], QuantConfig(method="rtn", weight_bits=4, act_bits=0,
                                                                     block_size=16, first_last_bits=None, awq=awq,
                                                                     progress=False))
        got[awq] = sqnr_db(ref, make_session(str(out), optimization="disable").run(None, {"x": x[192:]})[0])
    assert res.summary["awq"]["scaled"] == 1 and res.summary["awq"]["per_group"][0]["alpha"] > 0
    assert got[True] > got[False] + 1.5, got


def test_choose_scales_keeps_one_when_scaling_does_not_help():
    """Equal activations on every channel: every alpha gives s = 1, so nothing changes."""
    w = torch.randn(32, 16).numpy()
    gram = torch.eye(32, dtype=torch.float64)
    alpha, s, ratio = choose_scales([(w, rtn_quantizer(4, 0, "narrow"))], gram, torch.ones(32, dtype=torch.float64))
    assert alpha == 0.0 and ratio == 1.0 and torch.equal(s, torch.ones(32))


def test_off_unless_asked_for_on_the_command_line(tmp_path):
    """Off by default (it raised SmolLM2's RTN perplexity); --awq turns it on."""
    from click.testing import CliRunner

    from onnxflex.cli import main

    assert not QuantConfig(weight_bits=4, act_bits=0).resolved().awq
    path = tmp_path / "outlier.onnx"
    x = _outlier_model(path)
    np.save(tmp_path / "x.npy", x[:64])
    for flag, expect in (([], False), (["--awq"], True)):
        out = tmp_path / f"q{len(flag)}.onnx"
        r = CliRunner().invoke(main, ["quantize", str(path), "--calib", str(tmp_path / "x.npy"), "-o", str(out),
                                      "--method", "rtn", "--weight-bits", "4", "--act-bits", "0", "-q", *flag])
        assert r.exit_code == 0, r.output
        import json

        summary = json.loads(out.with_suffix(".report.json").read_text())["summary"]
        assert ("awq" in summary) is expect


def test_model_without_groups_is_unchanged_and_says_so(tmp_path):
    rng = np.random.default_rng(0)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
                          [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")])
    path = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    res = quantize(str(path), tmp_path / "q.onnx", [{"x": rng.standard_normal((16, 8)).astype(np.float32)}],
                   QuantConfig(method="rtn", weight_bits=4, act_bits=0, awq=True, progress=False))
    assert res.summary["awq"] == dict(groups=0)
    assert any("--awq: no MatMul input" in n for n in res.summary["notes"])
