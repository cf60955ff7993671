"""End-to-end quantize() on a tiny synthetic CNN: QDQ numerics, write-back round trip, determinism."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxflex import QuantConfig, quantize
from onnxflex.runtime.session import make_session


def _run(path, x):
    sess = make_session(str(path), optimization="disable")  # Q/DQ as written, not ORT-CPU's fused int8 kernels
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _cfg(**kw):
    base = dict(progress=False, batch_size=16, calib_size=48)
    base.update(kw)
    return QuantConfig(**base)


def test_rtn_w8a8_qdq_layout(tiny_cnn, tiny_calib, tmp_path):
    out = tmp_path / "q.onnx"
    res = quantize(str(tiny_cnn), out, [{"input": tiny_calib}], _cfg(method="rtn"))
    m = onnx.load(str(out))
    inits = _inits(m)
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(dqs) == 6  # stem, grouped, c1, dw, c2, fc
    for n in dqs:
        q = inits[n.input[0]]
        assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
        assert not inits[n.input[2]].any()  # zero point 0
        scale = inits[n.input[1]]
        consumer = next(c for c in m.graph.node if n.output[0] in c.input)
        if consumer.op_type == "Conv":
            assert scale.shape == (q.shape[0],)  # per output channel, axis 0
    # no Q/DQ on graph outputs, activation Q/DQ on both residual Add inputs
    producers = {o: n for n in m.graph.node for o in n.output}
    assert producers["logits"].op_type not in ("QuantizeLinear", "DequantizeLinear")
    add = next(n for n in m.graph.node if n.op_type == "Add")
    assert all(producers[i].op_type == "DequantizeLinear" for i in add.input)
    assert res.summary["rule_violations"] == 0
    # runs in ORT and stays close to FP32
    assert res.summary["calib_output_sqnr_db"] > 20


def test_rtn_integers_match_numpy_reference(tiny_cnn, tiny_calib, tmp_path):
    """Integer round trip: written q equals clip(round(W / s)) for the written scale."""
    out = tmp_path / "q.onnx"
    quantize(str(tiny_cnn), out, [{"input": tiny_calib}], _cfg(method="rtn", act_bits=0))
    from onnxflex.passes.prepare import PreparePass, load_model

    fp = _inits(PreparePass().prepare(load_model(str(tiny_cnn))))
    m = onnx.load(str(out))
    inits = _inits(m)
    checked = 0
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        q, s = inits[n.input[0]].astype(np.int32), inits[n.input[1]]
        w_name = n.input[0][: -len("_quantized")]
        w = fp[w_name]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        shape[axis] = -1
        ref = np.clip(np.round(w / s.reshape(shape)), -127, 127)
        np.testing.assert_array_equal(q, ref)
        checked += 1
    assert checked == 6
    # weight-only: no activation QuantizeLinear
    assert not any(n.op_type == "QuantizeLinear" for n in m.graph.node)


def test_qdq_output_matches_numpy_fake_quant_reference(tmp_path):
    """A Gemm/MatMul-only model: ORT on the QDQ model equals numpy fake-quant arithmetic."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)  # Gemm transB=1: [N, K]
    w2 = rng.standard_normal((16, 4)).astype(np.float32)  # MatMul B: [K, N]
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1, name="gemm"),
         helper.make_node("Relu", ["h"], ["hr"], name="relu"),
         helper.make_node("MatMul", ["hr", "w2"], ["y"], name="mm")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    x = rng.standard_normal((32, 8)).astype(np.float32)
    out = tmp_path / "q.onnx"
    quantize(model, out, [{"x": x}], _cfg(method="rtn", calib_size=32))
    m = onnx.load(str(out))
    inits = _inits(m)

    def fq(v, s):
        return np.clip(np.round(v / s), -128, 127) * s

    def act_scale(t):
        return float(inits[f"{t}_act_scale"])

    wq1 = inits["w1_quantized"].astype(np.float32) * inits["w1_scale"][:, None]
    wq2 = inits["w2_quantized"].astype(np.float32) * inits["w2_scale"][None, :]
    h = np.maximum(fq(x, act_scale("x")) @ wq1.T, 0)
    ref = fq(h, act_scale("hr")) @ wq2
    np.testing.assert_allclose(_run(out, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["flexround", "adaround"])
def test_learned_writeback_matches_torch(tiny_cnn, tiny_calib, tmp_path, method):
    """The written model, run in ORT, reproduces the learned torch model; learning beats RTN."""
    out = tmp_path / "q.onnx"
    # without the GPTQ candidate, which wins every region of this tiny CNN: the learned rounding is written
    res = quantize(str(tiny_cnn), out, [{"input": tiny_calib}],
                   _cfg(method=method, weight_bits=4, first_last_bits=None, iters=60, gptq_candidate=False))
    assert res.summary["torch_vs_ort_sqnr_db"] > 40
    learned = [r for r in res.regions if r.rtn_mse is not None]
    assert learned and all(r.final_mse <= r.rtn_mse + 1e-12 for r in learned)
    if method == "flexround":
        assert any(r.status == "learned" and r.final_mse < 0.9 * r.rtn_mse for r in learned)
    report = json.loads(res.report_path.read_text())
    assert len(report["regions"]) == len(res.regions)
    m = onnx.load(str(out))
    q4 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert q4, "4-bit weights must be stored as INT4"
    assert m.opset_import[0].version >= 21


def test_gptq_candidate_with_searched_grids_writes_back_what_torch_ran(tiny_cnn, tiny_calib, tmp_path):
    """The default judge keeps GPTQ where it wins; its per-channel grids, searched away from the initial
    scale, are the ones written: ORT reproduces the torch model, and the scales differ from RTN's."""
    runs = {}
    for search in (True, False):
        out = tmp_path / f"q{search}.onnx"
        res = quantize(str(tiny_cnn), out, [{"input": tiny_calib}],
                       _cfg(weight_bits=4, first_last_bits=None, iters=20, gptq_grid_search=search))
        assert res.summary["torch_vs_ort_sqnr_db"] > 40
        assert any(r.status.startswith("kept gptq") for r in res.regions)
        runs[search] = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
                        if t.name.endswith("_scale") and t.dims}
    assert runs[True].keys() == runs[False].keys()
    assert any(not np.array_equal(runs[True][k], runs[False][k]) for k in runs[True])


def test_deterministic_output(tiny_cnn, tiny_calib, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for p in (a, b):
        quantize(str(tiny_cnn), p, [{"input": tiny_calib}], _cfg(weight_bits=4, iters=30, seed=3))
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("mode", ["layer", "block"])
def test_region_modes(tiny_cnn, tiny_calib, tmp_path, mode):
    out = tmp_path / "q.onnx"
    res = quantize(str(tiny_cnn), out, [{"input": tiny_calib}], _cfg(regions=mode, weight_bits=4, iters=20))
    forms = {r.loss_form for r in res.regions if r.weights}
    if mode == "layer":
        assert "gram" in forms and all(len(r.weights) <= 1 for r in res.regions)
    else:
        assert any(len(r.weights) > 1 for r in res.regions)
    assert res.summary["torch_vs_ort_sqnr_db"] > 40


def test_ort_cpu_target_runs_as_integer_kernels_in_onnxruntime(tiny_cnn, tiny_calib, tmp_path):
    """The point of the ort-cpu layout: onnxruntime's default optimisations turn every quantized
    Conv and the residual Add into integer kernels (the TensorRT layout gets none)."""
    import collections

    import onnxruntime as ort

    def optimised_ops(path):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(path) + ".opt.onnx"
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)

    for target in ("ort-cpu", "tensorrt"):
        out = tmp_path / f"{target}.onnx"
        res = quantize(str(tiny_cnn), out, [{"input": tiny_calib}], _cfg(method="flexround", iters=20, target=target))
        ops = optimised_ops(out)
        if target == "ort-cpu":
            assert ops["QLinearConv"] == 5 and ops["QLinearAdd"] == 1 and ops["Conv"] == 0, ops
            assert res.summary["calib_output_sqnr_db"] > 20
        else:  # only the Conv whose output the residual Add's Q reads happens to fuse
            assert ops["QLinearConv"] <= 1 and ops["FusedConv"] + ops["Conv"] >= 4, ops


def test_gptq_solves_each_one_op_region_in_closed_form_and_beats_rtn(tiny_cnn, tiny_calib, tmp_path):
    rtn = quantize(str(tiny_cnn), tmp_path / "rtn.onnx", [{"input": tiny_calib}], _cfg(method="rtn", weight_bits=4))
    res = quantize(str(tiny_cnn), tmp_path / "gptq.onnx", [{"input": tiny_calib}], _cfg(method="gptq", weight_bits=4))
    assert res.summary["region_mode"] == "auto:layer" and res.summary["iters"] == 0
    solved = [r for r in res.regions if r.loss_form.startswith("closed-form")]  # with or without input correction
    assert solved and all(r.status in ("learned", "kept rtn: loss above rtn") for r in solved)
    assert any(r.status == "learned" and r.learned_mse < r.rtn_mse for r in solved)
    assert res.summary["calib_output_sqnr_db"] > rtn.summary["calib_output_sqnr_db"]
    assert res.summary["rule_violations"] == 0


def test_ablation_switches_judge_and_row_guard(tiny_cnn, tiny_calib, tmp_path):
    """8 images cannot pin down the FC (the row guard keeps it RTN) and the judge keeps RTN where the
    learned weights lose held out; --no-row-guard --no-judge learns and keeps every region."""
    few = [{"input": tiny_calib[:8]}]
    guarded = quantize(str(tiny_cnn), tmp_path / "g.onnx", few,
                       _cfg(method="flexround", iters=20, calib_size=8, gptq_candidate=False))
    status = [r.status for r in guarded.regions]
    assert "rtn: too few calibration rows to learn" in status and "kept rtn: loss above rtn" in status, status
    free = quantize(str(tiny_cnn), tmp_path / "f.onnx", few,
                    _cfg(method="flexround", iters=20, calib_size=8, row_guard=False, judge=False))
    assert [r.status for r in free.regions] == ["learned"] * len(free.regions)


def test_judge_weighs_gptq_for_one_op_regions(tiny_cnn, tiny_calib, tmp_path):
    """Each one-op region gets GPTQ's rounding as a third candidate: its held-out error is reported and
    the deployed error is the lowest of the three; --no-gptq-candidate leaves it out."""
    calib = [{"input": tiny_calib}]
    res = quantize(str(tiny_cnn), tmp_path / "c.onnx", calib, _cfg(method="flexround", weight_bits=4, iters=20,
                                                                   bias_correction=True))
    gram = [r for r in res.regions if r.loss_form == "gram" and r.learned_mse is not None]
    assert gram and all(r.gptq_mse is not None for r in gram)
    for r in gram:
        best = min(r.rtn_mse, r.learned_mse, r.gptq_mse)
        # the corrected bias is deployed only below the best of the three
        assert r.final_mse == (r.bias_mse if r.bias_corrected else best), r
        assert not r.bias_corrected or r.bias_mse < best
        assert (r.status == "kept gptq: loss below learned") == (best == r.gptq_mse < min(r.rtn_mse, r.learned_mse))
    kept = sum(r.status.startswith("kept gptq") for r in res.regions)
    assert res.summary["region_outcomes"].get("gptq", 0) == kept
    assert sum(res.summary["region_outcomes"].values()) == len(res.regions)
    off = quantize(str(tiny_cnn), tmp_path / "o.onnx", calib,
                   _cfg(method="flexround", weight_bits=4, iters=20, gptq_candidate=False))
    assert all(r.gptq_mse is None and not r.status.startswith("kept gptq") for r in off.regions)


def test_bias_correction_is_judged_and_written(tiny_cnn, tiny_calib, tmp_path):
    """A corrected bias is deployed only where it lowers the held-out error below every rounding
    candidate, it is what the written model holds (onnxruntime reproduces the torch model that used
    it), and --no-bias-correction leaves every bias as the model has it."""
    from onnxflex.graph import Graph

    calib = [{"input": tiny_calib}]
    out = tmp_path / "b.onnx"
    res = quantize(str(tiny_cnn), out, calib, _cfg(method="flexround", weight_bits=4, iters=20, bias_correction=True))
    assert res.summary["torch_vs_ort_sqnr_db"] > 40
    corrected = [r for r in res.regions if r.bias_corrected]
    assert corrected and res.summary["bias_corrected"] == len(corrected)
    for r in corrected:
        assert r.bias_mse == r.final_mse < min(r.rtn_mse, r.learned_mse, r.gptq_mse)
    for r in res.regions:
        if r.bias_mse is not None and not r.bias_corrected:
            assert r.bias_mse >= r.final_mse
    fp = Graph(onnx.load(str(tiny_cnn)))
    q = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}

    def biases(model_inits, names):
        return {n: model_inits[fp.node_by_name[n].input[2]] for n in names}

    names = {r.weights[0] for r in corrected}
    fixed = biases(q, names)
    orig = {n: fp.array(fp.node_by_name[n].input[2]) for n in names}
    assert all(not np.array_equal(fixed[n], orig[n]) for n in names)
    off = tmp_path / "o.onnx"
    res_off = quantize(str(tiny_cnn), off, calib, _cfg(method="flexround", weight_bits=4, iters=20))
    assert not any(r.bias_corrected or r.bias_mse is not None for r in res_off.regions)
    q_off = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(off)).graph.initializer}
    assert all(np.array_equal(biases(q_off, names)[n], orig[n]) for n in names)


def _positive_matmul(path, rng):
    """x [n, 64] @ W [64, 16] with W > 0: with positive inputs every u8 x s8 product pair is large."""
    from onnx import TensorProto, helper

    w = (np.abs(rng.standard_normal((64, 16))) + 1.0).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
                              [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_reduce_range_makes_ort_cpu_int8_kernels_compute_what_the_qdq_model_says(tmp_path):
    """On x86 without VNNI onnxruntime's fused u8 x s8 MatMul adds product pairs in a saturating int16
    (2 x 255 x 127 > 32767), so full-range int8 weights give other values than their own QDQ
    arithmetic; 7-bit weights give the same values on every CPU."""
    from onnxflex.runtime.cpu import int8_kernels_saturate

    rng = np.random.default_rng(0)
    model = _positive_matmul(tmp_path / "mm.onnx", rng)
    x = rng.uniform(0.5, 1.0, (48, 64)).astype(np.float32)
    errors = {}
    for reduce_range in (True, False):
        out = tmp_path / f"mm_{reduce_range}.onnx"
        res = quantize(str(model), out, [{"x": x}], _cfg(method="rtn", target="ort-cpu", reduce_range=reduce_range))
        assert res.config.reduce_range is reduce_range
        q = next(a for n, a in _inits(onnx.load(str(out))).items() if a.dtype == np.int8 and a.ndim == 2)
        assert np.abs(q).max() == (63 if reduce_range else 127)
        fused = make_session(str(out), optimization="all").run(None, {"x": x})[0]
        qdq = _run(out, x)
        errors[reduce_range] = float(np.abs(fused - qdq).max() / np.abs(qdq).max())
    assert errors[True] < 1e-5, errors
    assert (errors[False] > 1e-2) == int8_kernels_saturate(), errors  # the premise, on this machine


def test_reduce_range_is_for_ort_cpu_with_int8_activations_and_defaults_to_this_cpu(monkeypatch):
    from onnxflex import config as config_module
    from onnxflex.errors import OnnxflexError

    with pytest.raises(OnnxflexError, match="--reduce-range is for --target ort-cpu"):
        QuantConfig(reduce_range=True).resolved()  # TensorRT: its int8 kernels do not saturate
    with pytest.raises(OnnxflexError, match="--reduce-range is for --target ort-cpu"):
        QuantConfig(reduce_range=True, target="ort-cpu", act_bits=0, weight_bits=4).resolved()
    for saturate in (True, False):
        monkeypatch.setattr(config_module, "int8_kernels_saturate", lambda s=saturate: s)
        assert QuantConfig(target="ort-cpu").resolved().reduce_range is saturate
        assert QuantConfig(target="ort-cpu", reduce_range=False).resolved().reduce_range is False
        assert QuantConfig(target="tensorrt").resolved().reduce_range is False


@pytest.mark.parametrize("target", ["tensorrt", "ort-cpu"])
def test_int3_weights_beside_int8_activations_use_the_whole_int4_grid(tiny_cnn, tiny_calib, tmp_path, target):
    """W3A8 weights are stored as INT4 like weight-only ones, so they get the grid's 8th level: TensorRT's
    full grid [-4, 3] with positive scales, onnxruntime's per-channel signed scales (each channel's largest
    magnitude on -4), which its CPU provider runs as written."""
    import ml_dtypes

    out = tmp_path / "q.onnx"
    res = quantize(str(tiny_cnn), out, [{"input": tiny_calib}], _cfg(method="rtn", weight_bits=3, target=target))
    m = onnx.load(str(out))
    inits = _inits(m)
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
           and inits[n.input[0]].dtype == ml_dtypes.int4]
    assert len(dqs) == 4  # the first and last weighted ops stay 8-bit
    ints = [inits[n.input[0]].astype(np.int8) for n in dqs]
    assert min(int(q.min()) for q in ints) == -4 and max(int(q.max()) for q in ints) <= 3
    negative = sum(int((inits[n.input[1]] < 0).sum()) for n in dqs)
    assert (negative > 0) == (target == "ort-cpu"), negative  # TensorRT wants scales > 0
    assert res.summary["rule_violations"] == 0
    x = tiny_calib[:16]
    fused = make_session(str(out), optimization="all").run(None, {"input": x})[0]
    assert float(np.linalg.norm(fused - _run(out, x)) / np.linalg.norm(_run(out, x))) < 1e-2
