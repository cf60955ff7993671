"""Cross-layer equalization (--cle): which chains it finds, that Relu chains keep the function, that the
ranges end up equal, what it does to a ReLU6, and that it helps a per-tensor weight grid."""
from __future__ import annotations

import numpy as np
import onnx
import torch

from onnxflex import QuantConfig, quantize
from onnxflex.graph import Graph
from onnxflex.passes.equalize import MARGIN, clip_input_maxima, equalize, equalized_model, find_chains
from onnxflex.passes.prepare import PreparePass, load_model
from onnxflex.runtime.session import make_session
from tests.conftest import export


class Chain(torch.nn.Module):
    """conv -> relu -> depthwise -> (relu | relu6) -> conv, with channel ranges 100x apart."""

    def __init__(self, relu6: bool):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.relu6 = relu6
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b = torch.nn.Conv2d(8, 6, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            spread = torch.logspace(-1, 1, 8)  # channel c of `a` is 100x wider than channel 0
            self.a.weight.mul_(spread.view(-1, 1, 1, 1))
            self.a.bias.mul_(spread)
            self.dw.weight.mul_(spread.flip(0).view(-1, 1, 1, 1))

    def forward(self, x):
        x = self.dw(torch.relu(self.a(x)))
        x = torch.nn.functional.relu6(x) if self.relu6 else torch.relu(x)
        return self.b(x)


def _prepared(tmp_path, relu6):
    path = export(Chain(relu6), torch.zeros(1, 3, 12, 12), tmp_path / f"chain{int(relu6)}.onnx", ["input"], ["out"],
                  {"input": {0: "n"}, "out": {0: "n"}})
    return path, Graph(PreparePass().prepare(load_model(str(path))))


def _x(n=24):
    return np.random.default_rng(0).standard_normal((n, 3, 12, 12)).astype(np.float32)


def test_finds_both_chains_and_equalizes_ranges(tmp_path):
    _, graph = _prepared(tmp_path, relu6=False)
    chains = find_chains(graph)
    assert [(c1.op_type, a.op_type if a else None, c2.op_type) for c1, a, c2 in chains] == [
        ("Conv", "Relu", "Conv"), ("Conv", "Relu", "Conv")]
    arrays = equalize(graph, chains)
    (a, _, dw), (_, _, b) = chains
    wa, wdw, wb = (arrays[n.input[1]] for n in (a, dw, b))
    # a's rows vs dw's filters, dw's filters vs b's columns: each channel's ranges meet
    ra, rdw = np.abs(wa).reshape(8, -1).max(1), np.abs(wdw).reshape(8, -1).max(1)
    rb = np.abs(wb).transpose(1, 0, 2, 3).reshape(8, -1).max(1)
    np.testing.assert_allclose(ra, rdw, rtol=1e-3)
    np.testing.assert_allclose(rdw, rb, rtol=1e-3)
    before = np.abs(graph.array(a.input[1])).reshape(8, -1).max(1)
    assert before.max() / before.min() > 30 and ra.max() / ra.min() < before.max() / before.min() / 3


def test_relu_chains_keep_the_function(tmp_path):
    path, graph = _prepared(tmp_path, relu6=False)
    out = tmp_path / "q.onnx"
    res = quantize(str(path), out, [{"input": _x()}], QuantConfig(method="rtn", weight_bits=8, act_bits=0, cle=True,
                                                                   progress=False))
    cle = res.summary["cle"]
    assert cle["pairs"] == 2 and cle["clip_pairs"] == 0 and not cle.get("kept_original")
    assert cle["spread_after"] < cle["spread_before"] / 2
    m = equalized_model(graph)
    x = _x(8)
    ref = make_session(graph.model, optimization="disable").run(None, {"input": x})[0]
    got = make_session(m, optimization="disable").run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_relu6_chain_rescales_only_where_the_clip_stays_exact(tmp_path):
    """Inputs x2 push some depthwise channels past 6: those keep s = 1, the others only shrink while
    their largest pre-activation stays inside the clip, so the model computes the same outputs."""
    path, graph = _prepared(tmp_path, relu6=True)
    chains = find_chains(graph)
    clip_chain = next(c for c in chains if c[1] is not None and c[1].op_type == "Clip")
    dw = clip_chain[0]
    # data-free: a Clip chain is left alone
    assert np.array_equal(equalize(graph, [clip_chain])[dw.input[1]], graph.array(dw.input[1]))
    x = _x() * 2
    from onnxflex.calib.dataset import CalibrationSet

    calib = CalibrationSet([{"input": x[i:i + 1]} for i in range(len(x))], ["input"])
    maxima = clip_input_maxima(graph, chains, calib)
    m = maxima[clip_chain[1].name]
    assert (m * MARGIN > 6).any() and (m * MARGIN <= 6).any()  # both kinds of channel are present
    arrays = equalize(graph, chains, maxima)
    r_before = np.abs(graph.array(dw.input[1])).reshape(8, -1).max(1)
    r_after = np.abs(arrays[dw.input[1]]).reshape(8, -1).max(1)
    a = chains[0][0].input[1]  # a's rows shrink by s_a, dw's filters grow by s_a, then shrink by dw's own S
    s_a = np.abs(graph.array(a)).reshape(8, -1).max(1) / np.abs(arrays[a]).reshape(8, -1).max(1)
    s = (r_before / r_after) * s_a  # S: dw's pre-activation is divided by it
    np.testing.assert_allclose(s[m * MARGIN > 6], 1.0, rtol=1e-5)  # saturating channels untouched
    free = m * MARGIN <= 6
    assert np.all(m[free] * MARGIN / s[free] <= 6 * (1 + 1e-5))  # the rest stay inside the clip
    assert np.abs(np.log(s[free])).max() > 0.1  # and did move
    out = tmp_path / "q.onnx"
    res = quantize(str(path), out, [{"input": x}], QuantConfig(method="rtn", weight_bits=8, act_bits=0, cle=True, progress=False))
    cle = res.summary["cle"]
    assert cle["clip_pairs"] == 1 and not cle.get("kept_original")
    assert cle["fp32_change_sqnr_db"] is None or cle["fp32_change_sqnr_db"] > 60
    assert any(n.op_type == "Clip" for n in onnx.load(str(out)).graph.node)  # the ReLU6 is still a ReLU6


def test_cle_helps_a_per_tensor_weight_grid(tmp_path):
    """One per-tensor step for channels 100x apart rounds the narrow ones to zero; equalized, they survive."""
    path, graph = _prepared(tmp_path, relu6=False)
    x = _x(8)
    ref = make_session(graph.model, optimization="disable").run(None, {"input": x})[0]
    errs = {}
    for cle in (False, True):
        out = tmp_path / f"q{int(cle)}.onnx"
        quantize(str(path), out, [{"input": _x()}], QuantConfig(method="rtn", weight_bits=4, act_bits=0, granularity="tensor",
                                                                first_last_bits=None, cle=cle, progress=False))
        got = make_session(str(out), optimization="disable").run(None, {"input": x})[0]
        errs[cle] = float(np.mean((got - ref) ** 2))
    assert errs[True] < 0.5 * errs[False], errs


def test_tiny_resnet_chains(tiny_cnn):
    """tiny_cnn: the grouped conv output is also the residual and the stem feeds a 2-group conv, so only
    c1 -> relu -> dw and dw -> relu6 -> c2 chain (the second only when ReLU6 may become Relu)."""
    graph = Graph(PreparePass().prepare(load_model(str(tiny_cnn))))
    assert len(find_chains(graph)) == 2
    assert find_chains(graph, relu6=False) and len(find_chains(graph, relu6=False)) == 1


def test_no_chain_leaves_the_model_and_says_so(tmp_path):
    """Conv -> Sigmoid -> Conv is not homogeneous: nothing to equalize, a note, the same integers as without."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (4, 3, 3, 3)), ("w2", (5, 4, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["a"], ["s"], name="sig"),
             helper.make_node("Conv", ["s", "w2"], ["y"], name="c2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, 8, 8])], inits)
    path = tmp_path / "sig.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    x = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    outs = {}
    for cle in (False, True):
        res = quantize(str(path), tmp_path / f"q{int(cle)}.onnx", [{"x": x}],
                       QuantConfig(method="rtn", weight_bits=8, act_bits=0, cle=cle, progress=False))
        outs[cle] = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / f"q{int(cle)}.onnx")).graph.initializer}
    assert res.summary["cle"] == dict(pairs=0, clip_pairs=0)
    assert any("no Conv -> Relu/ReLU6 -> Conv chain" in n for n in res.summary["notes"])
    assert outs[True].keys() == outs[False].keys()
    for k in outs[True]:
        np.testing.assert_array_equal(outs[True][k], outs[False][k])


def test_fixed_batch_model(tmp_path):
    """A model exported with batch 1 gets its calibration maxima and the check one sample at a time."""
    path = export(Chain(relu6=True), torch.zeros(1, 3, 12, 12), tmp_path / "fixed.onnx", ["input"], ["out"])
    res = quantize(str(path), tmp_path / "q.onnx", [{"input": _x()[i:i + 1]} for i in range(20)],
                   QuantConfig(method="rtn", weight_bits=8, act_bits=0, cle=True, progress=False))
    assert res.summary["cle"]["pairs"] == 2 and not res.summary["cle"].get("kept_original")


def test_clip_bounds_read_every_form():
    """Graph.clip_bounds (shared with the targets' Q-range limit): attributes, constant inputs, absent and
    run-time bounds."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["a"], name="inputs"),
             helper.make_node("Clip", ["a", "", "hi"], ["b"], name="no_min"),
             helper.make_node("Clip", ["b", "x0"], ["c"], name="runtime_min")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                       helper.make_tensor_value_info("x0", TensorProto.FLOAT, [])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])],
                          [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")])
    graph = Graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    by = graph.node_by_name
    assert graph.clip_bounds(by["inputs"]) == (0.0, 6.0)
    assert graph.clip_bounds(by["no_min"]) == (float("-inf"), 6.0)
    assert graph.clip_bounds(by["runtime_min"]) == (None, float("inf"))
    old = helper.make_node("Clip", ["x"], ["y"], name="v6", min=0.0, max=6.0)  # opset < 11 attributes
    assert graph.clip_bounds(old) == (0.0, 6.0)
