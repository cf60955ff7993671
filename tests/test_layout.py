"""Batch layouts (onnxflex/layout.py): graphs that do not keep the batch on axis 0 still quantize, with
every sample where it belongs (synthetic tiny models; the real ones are in tests/realworld/)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from onnxflex.api import quantize
from onnxflex.calib import load_calibration
from onnxflex.calib.dataset import batch_axes
from onnxflex.config import QuantConfig
from onnxflex.graph import model_input_specs
from onnxflex.layout import BATCH0, SHARED, Layout, classify, probe_calibration

from .conftest import export


def _cfg(**kw):
    return QuantConfig(**{"method": "rtn", "weight_bits": 8, "act_bits": 8, "progress": False, **kw})


def _run(path, feed):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _sqnr(ref, x):
    return 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(np.sum((ref - x).astype(np.float64) ** 2), 1e-30))


def test_layout_take_slice_join_round_trip():
    lay = Layout(1, 3)  # [1, n*3, 2]: a Reshape merged the batch into axis 1
    parts = [np.full((1, 3, 2), i, np.float32) for i in range(4)]
    joined = lay.join(parts)
    assert joined.shape == (1, 12, 2)
    assert np.array_equal(lay.slice(joined, 1, 3), np.concatenate(parts[1:3], axis=1))
    assert np.array_equal(lay.take(joined, np.array([0, 3])), np.concatenate([parts[0], parts[3]], axis=1))
    t = lay.take(torch.from_numpy(joined), np.array([2]))
    assert torch.equal(t, torch.from_numpy(parts[2]))
    assert lay.count(joined) == 4
    assert SHARED.join([np.arange(8), np.arange(8)]).shape == (8,)
    stacked = Layout(None, stacked=True, unit=1)
    st = stacked.join([np.zeros((5, 2)), np.ones((5, 2))])
    assert st.shape == (2, 5, 2) and np.array_equal(stacked.take(st, np.array([1])), np.ones((5, 2)))


def test_classify_tells_batch_axis_merged_axis_shared_and_mixing():
    a1, a2 = np.zeros((2, 1, 4)), np.zeros((2, 2, 4))
    assert classify(a1, a2, 1) == Layout(1, 1)
    assert classify(np.zeros((1, 10, 6)), np.zeros((1, 20, 6)), 1) == Layout(1, 10)
    assert classify(np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1]), 1) == SHARED
    assert classify(np.array([1.0]), np.array([2.0]), 1) is None  # same shape, other value: mixes samples
    assert classify(np.zeros((3, 5)), np.zeros((4, 5)), 1) is None  # data-dependent length


def test_batch_axes_follow_names_then_sizes():
    named = {"x": (["batch", 16], np.float32), "state": ([2, "batch", 8], np.float32), "sr": ([], np.int64)}
    assert batch_axes(named) == {"x": 0, "state": 1, "sr": None}
    unnamed = {"x": ([None, None], np.float32), "state": ([2, None, 8], np.float32)}
    assert batch_axes(unnamed) == {"x": 0, "state": 1}
    static = {"x": ([1, 16], np.float32), "state": ([2, 1, 8], np.float32)}
    assert batch_axes(static) == {"x": 0, "state": 1}


class _StateNet(torch.nn.Module):
    """A VAD-like step: audio [B, 16], a recurrent state [2, B, 8] and a rank-0 sample rate."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Linear(16, 8)
        self.mix = torch.nn.Linear(8, 8)

    def forward(self, x, state, sr):
        h = torch.relu(self.enc(x)) * (sr.float() / 16000.0)
        new = torch.tanh(self.mix(h + state[0]) + state[1])
        return torch.sigmoid(new.sum(-1, keepdim=True)), torch.stack([new, h])


@pytest.mark.parametrize("method", ["rtn", "flexround"])
def test_state_on_axis_1_and_scalar_input_quantize(tmp_path, method):
    path = export(_StateNet(), (torch.zeros(1, 16), torch.zeros(2, 1, 8), torch.tensor(16000)), tmp_path / "vad.onnx",
                  ["input", "state", "sr"], ["prob", "new_state"],
                  dynamic_axes={"input": {0: "batch"}, "state": {1: "batch"}, "prob": {0: "batch"}, "new_state": {1: "batch"}})
    rng = np.random.default_rng(0)
    files = []
    for i in range(12):  # one sample per file, with its batch dim where the model has it
        f = tmp_path / f"s{i}.npz"
        np.savez(f, input=rng.uniform(-1, 1, (1, 16)).astype(np.float32),
                 state=rng.normal(0, 0.5, (2, 1, 8)).astype(np.float32), sr=np.array(16000, np.int64))
        files.append(f)
    cal = load_calibration(files, model_input_specs(onnx.load(str(path))), size=None)
    assert cal.stacked()["state"].shape == (2, 12, 8) and cal.stacked()["sr"].shape == ()
    out = tmp_path / "vad.qdq.onnx"
    quantize(str(path), str(out), files, _cfg(method=method, iters=20, regions="block"))
    feed = {"input": rng.uniform(-1, 1, (5, 16)).astype(np.float32),
            "state": rng.normal(0, 0.5, (2, 5, 8)).astype(np.float32), "sr": np.array(16000, np.int64)}
    ref, got = _run(path, feed), _run(out, feed)
    assert got[1].shape == (2, 5, 8)
    assert all(_sqnr(r, g) > 25 for r, g in zip(ref, got))


class _PadNet(torch.nn.Module):
    """TF-port 'same' padding: F.pad with pads computed from the input's shape (shape arithmetic)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.c2 = torch.nn.Conv2d(8, 8, 3, stride=2)
        self.fc = torch.nn.Linear(8, 4)

    @staticmethod
    def same(x, k, s):
        ih, iw = x.shape[-2:]
        ph = max((-(-ih // s) - 1) * s + k - ih, 0)
        pw = max((-(-iw // s) - 1) * s + k - iw, 0)
        return torch.nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])

    def forward(self, x):
        x = torch.relu(self.c1(self.same(x, 3, 2)))
        x = torch.relu(self.c2(self.same(x, 3, 2)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["rtn", "flexround"])
def test_shape_arithmetic_pads_are_shared_by_every_batch(tmp_path, method):
    path = export(_PadNet(), (torch.zeros(1, 3, 17, 17),), tmp_path / "pad.onnx", ["x"], ["y"],
                  dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b"}})
    x = np.random.default_rng(0).normal(size=(40, 3, 17, 17)).astype(np.float32)  # more than one run batch
    out = tmp_path / "pad.qdq.onnx"
    quantize(str(path), str(out), x, _cfg(batch_size=8, method=method, iters=20, regions="block"))
    assert _sqnr(_run(path, {"x": x[:6]})[0], _run(out, {"x": x[:6]})[0]) > 25


def _reshape_head(batch_dim, fixed: bool):
    """Conv -> Reshape to [1, -1, 4] (batch folded into axis 1), or to [1, 36] (fixed: batch 1 only)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], np.random.default_rng(1).normal(size=12).tolist())
    shape = helper.make_tensor("shape", TensorProto.INT64, [2] if fixed else [3], [1, 36] if fixed else [1, -1, 4])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1], name="tr"),
             helper.make_node("Reshape", ["t", "shape"], ["y"], name="reshape")]
    g = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 3, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 36] if fixed else [1, None, 4])], [w, shape])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("method", ["rtn", "flexround"])
@pytest.mark.parametrize("fixed", [False, True], ids=["batch-in-axis-1", "batch-1-only"])
def test_static_batch_heads_keep_samples_apart(tmp_path, fixed, method):
    model = _reshape_head(1, fixed)
    path = tmp_path / "head.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(0).normal(size=(20, 3, 3, 3)).astype(np.float32)
    cal = load_calibration(x, model_input_specs(model), size=None)
    batching = probe_calibration(model, cal)
    if fixed:
        assert batching.locked_unit == 1
    else:
        assert batching.locked_unit is None and batching.layout("y") == Layout(1, 9) and batching.layout("c") == BATCH0
    out = tmp_path / "head.qdq.onnx"
    quantize(str(path), str(out), x, _cfg(method=method, iters=20, regions="block"))
    for i in (0, 7):
        ref, got = _run(path, {"x": x[i:i + 1]})[0], _run(out, {"x": x[i:i + 1]})[0]
        assert got.shape == ref.shape and _sqnr(ref, got) > 25


def _if_model(weights_inside_only: bool):
    """Conv (unless weights_inside_only) -> If(flag) whose branches read the outer tensor and scale it
    (a MatMul with a weight in the then-branch)."""
    rng = np.random.default_rng(2)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], rng.normal(size=12).tolist())
    m = helper.make_tensor("m", TensorProto.FLOAT, [3, 3], rng.normal(size=9).tolist())
    src = "x" if weights_inside_only else "c"
    then = helper.make_graph([helper.make_node("MatMul", [src, "m"], ["t_out"], name="inner_mm")], "then", [],
                             [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)], [m])
    other = helper.make_graph([helper.make_node("Relu", [src], ["e_out"], name="inner_relu")], "else", [],
                              [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes = [] if weights_inside_only else [helper.make_node("Conv", ["x", "w"], ["c"], name="conv")]
    nodes.append(helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=then, else_branch=other))
    g = helper.make_graph(nodes, "cf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 3, 3]),
                                        helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [] if weights_inside_only else [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_if_reading_outer_tensors_stays_fp32_and_the_rest_quantizes(tmp_path):
    path, out = tmp_path / "if.onnx", tmp_path / "if.qdq.onnx"
    onnx.save(_if_model(False), str(path))
    x = np.random.default_rng(0).normal(size=(8, 3, 3, 3)).astype(np.float32)
    res = quantize(str(path), str(out), [{"x": x, "flag": np.array(True)}], _cfg())
    assert any("If 'branch'" in n and "control flow" in n for n in res.summary["notes"])
    assert "conv" in {r for reg in res.regions for r in reg.weights}
    feed = {"x": x[:2], "flag": np.array(True)}
    assert _sqnr(_run(path, feed)[0], _run(out, feed)[0]) > 25


def test_weights_only_inside_control_flow_is_one_error_line(tmp_path):
    from click.testing import CliRunner

    from onnxflex.cli import main

    path = tmp_path / "if_only.onnx"
    onnx.save(_if_model(True), str(path))
    np.savez(tmp_path / "s.npz", x=np.zeros((1, 3, 3, 3), np.float32), flag=np.array(True))
    r = CliRunner().invoke(main, ["quantize", str(path), "--calib", str(tmp_path / "s.npz"), "-o", str(tmp_path / "o.onnx"), "-q"])
    assert r.exit_code == 2, r.output
    assert "inside control flow" in r.output and "If 'branch'" in r.output and "Traceback" not in r.output


class _Recurrent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(6, 8)
        self.lstm = torch.nn.LSTM(8, 8)  # [seq, batch, feature]: the batch is on axis 1 of every tensor
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.lstm(torch.relu(self.inp(x)))
        return self.out(y)


def test_lstm_stays_fp32_with_a_note_and_batch_on_axis_1(tmp_path):
    path = export(_Recurrent(), (torch.zeros(5, 1, 6),), tmp_path / "lstm.onnx", ["x"], ["y"],
                  dynamic_axes={"x": {1: "batch"}, "y": {1: "batch"}})
    x = np.random.default_rng(0).normal(size=(5, 12, 6)).astype(np.float32)
    samples = [{"x": x[:, i:i + 1]} for i in range(12)]
    out = tmp_path / "lstm.qdq.onnx"
    res = quantize(str(path), str(out), samples, _cfg())
    assert any(n.startswith("LSTM") and "recurrent" in n for n in res.summary["notes"])
    assert "locked_batch" not in res.summary
    assert _sqnr(_run(path, {"x": x[:, :4]})[0], _run(out, {"x": x[:, :4]})[0]) > 20


def test_region_whose_lifting_disagrees_with_onnxruntime_stays_fp32(tmp_path, monkeypatch):
    from onnxflex.lift.ops import core

    monkeypatch.setitem(core.OPS, "Transpose", lambda inputs, attrs, opset: [inputs[0].permute(0, 2, 3, 1) * 1.5])
    model = _reshape_head(None, False)
    path, out = tmp_path / "h.onnx", tmp_path / "h.qdq.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(0).normal(size=(8, 3, 3, 3)).astype(np.float32)
    res = quantize(str(path), str(out), x, _cfg())
    (reg,) = res.regions
    assert reg.status.startswith("fp32: lifted region differs from onnxruntime")
    ref, got = _run(path, {"x": x[:2]})[0], _run(out, {"x": x[:2]})[0]
    assert np.allclose(ref, got, atol=1e-6)  # left as it was: FP32 weights, no activation Q/DQ


def test_sequence_model_without_a_batch_takes_each_file_as_one_feed(tmp_path):
    """x [time, 4] with a fixed [1, 1, 4] state: axis 0 of x is time, so each .npz is one sample."""
    rng = np.random.default_rng(3)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], rng.normal(size=16).tolist())
    flat = helper.make_tensor("flat", TensorProto.INT64, [2], [1, 4])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Reshape", ["h", "flat"], ["h2"], name="r"),
             helper.make_node("Add", ["m", "h2"], ["a"], name="add"),
             helper.make_node("ReduceMean", ["a"], ["y"], keepdims=1, axes=[0], name="mean")]  # mixes the time steps
    g = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", 4]),
                                         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, flat])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path, out = tmp_path / "seq.onnx", tmp_path / "seq.qdq.onnx"
    onnx.save(model, str(path))
    files = []
    for i in range(6):
        f = tmp_path / f"f{i}.npz"
        np.savez(f, x=rng.normal(size=(7, 4)).astype(np.float32), h=rng.normal(size=(1, 1, 4)).astype(np.float32))
        files.append(f)
    cal = load_calibration(files, model_input_specs(model), size=None)
    assert cal.num_samples == 6 and cal.samples[0]["x"].shape == (7, 4)
    res = quantize(str(path), str(out), files, _cfg())
    assert "locked_batch" in res.summary
    feed = {"x": rng.normal(size=(7, 4)).astype(np.float32), "h": np.zeros((1, 1, 4), np.float32)}
    assert _sqnr(_run(path, feed)[0], _run(out, feed)[0]) > 25


@pytest.mark.parametrize("fixed", [False, True], ids=["batch-in-axis-1", "batch-1-only"])
def test_probe_in_small_groups_reads_the_same_layouts(monkeypatch, fixed):
    """The probe fetches intermediates a group at a time, one session per group over shared weights
    (onnxruntime keeps every graph output of a run alive); the grouping must not change what it reads."""
    import onnxflex.layout as L
    from onnxflex.runtime.session import SharedWeights

    model = onnx.shape_inference.infer_shapes(_reshape_head(1, fixed))  # typed intermediates, as prepared
    x = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    cal = load_calibration(x, model_input_specs(model), size=None)
    whole = probe_calibration(model, cal)
    sessions = []
    real = SharedWeights.session
    monkeypatch.setattr(SharedWeights, "session", lambda self, *a, **k: sessions.append(1) or real(self, *a, **k))
    monkeypatch.setattr(L, "PROBE_BYTES", 1)  # one tensor per group
    monkeypatch.setattr(L, "_FIRST_GROUP", 1)
    monkeypatch.setattr(L, "_MIN_GROUP", 1)
    grouped = probe_calibration(model, cal)
    assert len(sessions) >= 3  # x, c, t, y: one session per tensor
    assert grouped.layouts == whole.layouts and grouped.shapes == whole.shapes
    assert grouped.locked_unit == whole.locked_unit == (1 if fixed else None)


def test_pruned_probe_session_holds_only_what_its_outputs_need():
    """A probe group's session keeps only the nodes (and weights) its outputs depend on, so the early
    groups run a prefix of the graph; the values fetched are the same as from the whole graph."""
    from onnxflex.runtime.session import SharedWeights, needed_nodes

    rng = np.random.default_rng(0)
    w1, w2 = (helper.make_tensor(n, TensorProto.FLOAT, [4, 4], rng.normal(size=16).astype(np.float32)) for n in ("w1", "w2"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="m1"), helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["x", "w2"], ["b"], name="m2"), helper.make_node("Add", ["r", "b"], ["y"], name="add")]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None)  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                                                [vi("y")], initializer=[w1, w2]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert [n.name for n in needed_nodes(model.graph, {"r"})] == ["m1", "relu"]
    assert [n.name for n in needed_nodes(model.graph, {"y"})] == ["m1", "relu", "m2", "add"]
    weights = SharedWeights(model)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    pruned = weights.session([vi("r")], prune=True)
    whole = weights.session([vi("r"), vi("y")])
    np.testing.assert_array_equal(pruned.run(["r"], {"x": x})[0], whole.run(["r"], {"x": x})[0])
