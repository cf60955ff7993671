"""Tests for onnxflex.checks.tensorrt: clean QDQ models pass, each rule is caught."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxflex.checks.tensorrt import RULES, Violation, check_qdq_model, format_violations
from onnxflex.errors import OnnxflexError

RNG = np.random.default_rng(0)
F, I8, U8, I4 = TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4


# ----------------------------------------------------------------------------- builders


def _t(name, arr, dtype=None):
    """Initializer; dtype INT4/UINT4 goes through make_tensor (numpy has no int4)."""
    arr = np.asarray(arr)
    if dtype in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, dtype, list(arr.shape), arr.ravel().tolist())
    return numpy_helper.from_array(arr, name)


def _scalar(v, dt=np.float32):
    return np.array(v, dtype=dt)


def _q(name, x, y, s, zp=None, **attrs):
    return helper.make_node("QuantizeLinear", [x, s] + ([zp] if zp else []), [y], name=name,
                            **attrs)


def _dq(name, x, y, s, zp=None, **attrs):
    return helper.make_node("DequantizeLinear", [x, s] + ([zp] if zp else []), [y],
                            name=name, **attrs)


def _model(nodes, inputs, outputs, inits, opset=13):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10 if opset >= 21 else 8
    return m


def _vi(name, shape, dt=F):
    return helper.make_tensor_value_info(name, dt, shape)


def _act_qdq(x, out, prefix, scale=0.05, zp_val=0, zp_dtype=np.int8):
    """QuantizeLinear/DequantizeLinear pair on an activation, plus its initializers."""
    inits = [_t(f"{prefix}_s", _scalar(scale)), _t(f"{prefix}_zp", _scalar(zp_val, zp_dtype))]
    nodes = [_q(f"{prefix}_Q", x, f"{prefix}_q", f"{prefix}_s", f"{prefix}_zp"),
             _dq(f"{prefix}_DQ", f"{prefix}_q", out, f"{prefix}_s", f"{prefix}_zp")]
    return nodes, inits


def _int_weights(shape, axis, qmax=127, dt=np.int8):
    w = RNG.integers(-qmax, qmax + 1, size=shape).astype(dt)
    s = RNG.uniform(0.005, 0.02, size=shape[axis]).astype(np.float32)
    return w, s


def conv_model(*, w_override=None, axis=0, zp_act=0, act_zp_dtype=np.int8, w_zp=None,
               scale_override=None):
    """x → Q/DQ → Conv(DQ(int8 per-channel w), b) → Relu → y."""
    nodes, inits = _act_qdq("x", "xd", "in", zp_val=zp_act, zp_dtype=act_zp_dtype)
    w, s = _int_weights((4, 3, 3, 3), 0)
    if w_override is not None:
        w = w_override
    if scale_override is not None:
        s = scale_override
    inits += [_t("w_q", w), _t("w_s", s), _t("b", RNG.standard_normal(4).astype(np.float32))]
    dq_in = ["w_q", "w_s"]
    if w_zp is not None:
        inits.append(_t("w_zp", w_zp))
        dq_in.append("w_zp")
    nodes += [helper.make_node("DequantizeLinear", dq_in, ["w"], name="w_DQ", axis=axis),
              helper.make_node("Conv", ["xd", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return _model(nodes, [_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 4, 8, 8])], inits)


def residual_model(quantize_skip=True):
    """x → Q/DQ → xd; Conv(xd) → Q/DQ → cd; Add(cd, xd or raw x)."""
    nodes, inits = _act_qdq("x", "xd", "in")
    w, s = _int_weights((3, 3, 1, 1), 0)
    inits += [_t("w_q", w), _t("w_s", s)]
    n2, i2 = _act_qdq("c", "cd", "mid")
    nodes += [_dq("w_DQ", "w_q", "w", "w_s", axis=0),
              helper.make_node("Conv", ["xd", "w"], ["c"], name="conv"), *n2,
              helper.make_node("Add", ["cd", "xd" if quantize_skip else "x"], ["y"], name="add")]
    return _model(nodes, [_vi("x", ["N", 3, 4, 4])], [_vi("y", ["N", 3, 4, 4])], inits + i2)


def matmul_model(axis=1, k=8, n=6):
    """x[N,5,K] → Q/DQ → MatMul(DQ(B int8 [K,N], axis 1)) → Add bias → y."""
    nodes, inits = _act_qdq("x", "xd", "in")
    w, s = _int_weights((k, n), 1)
    inits += [_t("B_q", w), _t("B_s", s), _t("bias", np.zeros(n, np.float32))]
    nodes += [_dq("B_DQ", "B_q", "B", "B_s", axis=axis),
              helper.make_node("MatMul", ["xd", "B"], ["m"], name="matmul"),
              helper.make_node("Add", ["m", "bias"], ["y"], name="bias_add")]
    return _model(nodes, [_vi("x", ["N", 5, k])], [_vi("y", ["N", 5, n])], inits)


def gemm_model(trans_b=1, axis=0):
    nodes, inits = _act_qdq("x", "xd", "in")
    shape = (6, 8) if trans_b else (8, 6)
    w, s = _int_weights(shape, 0 if trans_b else 1)
    inits += [_t("B_q", w), _t("B_s", s)]
    nodes += [_dq("B_DQ", "B_q", "B", "B_s", axis=axis),
              helper.make_node("Gemm", ["xd", "B"], ["y"], name="gemm", transB=trans_b)]
    return _model(nodes, [_vi("x", ["N", 8])], [_vi("y", ["N", 6])], inits)


def int4_model(block_axis=0, w_override=None):
    """Opset 21: Conv with INT4 per-channel weights and MatMul with INT4 blocked weights."""
    nodes, inits = _act_qdq("x", "xd", "in")
    wc, sc = _int_weights((4, 3, 1, 1), 0, qmax=7)
    if w_override is not None:
        wc = w_override
    wm = RNG.integers(-7, 8, size=(32, 8)).astype(np.int8)
    sm = RNG.uniform(0.01, 0.02, size=(2, 8)).astype(np.float32)  # 32 / block 16 on axis 0
    if block_axis != 0:
        sm = RNG.uniform(0.01, 0.02, size=(32, 1)).astype(np.float32)
    inits += [_t("wc_q", wc, I4), _t("wc_s", sc), _t("wm_q", wm, I4), _t("wm_s", sm)]
    n2, i2 = _act_qdq("r", "rd", "mid")
    nodes += [_dq("wc_DQ", "wc_q", "wc", "wc_s", axis=0),
              helper.make_node("Conv", ["xd", "wc"], ["c"], name="conv"),
              helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"), *n2,
              _dq("wm_DQ", "wm_q", "wm", "wm_s", axis=block_axis, block_size=16),
              helper.make_node("MatMul", ["rd", "wm"], ["y"], name="matmul")]
    inits += i2 + [_t("shape", np.array([-1, 32], np.int64))]
    return _model(nodes, [_vi("x", [2, 3, 4, 2])], [_vi("y", [2, 8])], inits, opset=21)


def _run_ort(model):
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in i.shape]
        feeds[i.name] = RNG.standard_normal(shape).astype(np.float32)
    return sess.run(None, feeds)


def _rules(violations, node=None):
    return {v.rule for v in violations if node is None or v.node == node}


# ----------------------------------------------------------------------------- clean models

CLEAN = {
    "conv": conv_model,
    "residual": residual_model,
    "matmul": matmul_model,
    "gemm_transB": lambda: gemm_model(1, 0),
    "gemm": lambda: gemm_model(0, 1),
    "int4": int4_model,
}


@pytest.mark.parametrize("name", list(CLEAN))
def test_clean_models_pass_and_run(name):
    model = CLEAN[name]()
    for target in ("tensorrt", "ort-cpu"):
        assert check_qdq_model(model, target) == [], format_violations(
            check_qdq_model(model, target))
    outs = _run_ort(model)
    assert all(np.isfinite(o).all() for o in outs)


def test_path_input_and_format(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(w_override=np.full((4, 3, 3, 3), -128, np.int8)), path)
    vs = check_qdq_model(str(path))
    assert _rules(vs, "w_DQ") == {"weight-range"}
    table = format_violations(vs)
    assert "weight-range" in table and "w_DQ" in table and "1 error(s)" in table
    assert format_violations([]) == "no violations"


def test_unknown_target():
    with pytest.raises(OnnxflexError, match="unknown check target"):
        check_qdq_model(conv_model(), "tpu")


# ----------------------------------------------------------------------------- one per rule


def test_opset_and_ir_version():
    m = conv_model()
    m.opset_import[0].version = 12
    m.ir_version = 11
    vs = check_qdq_model(m)
    assert _rules(vs, "<model>") == {"opset", "ir-version"}
    m.opset_import[0].version = 22
    assert "opset" in _rules(check_qdq_model(m))


def test_uint8_asymmetric_activation_tensorrt_vs_ort_cpu():
    m = conv_model(zp_act=128, act_zp_dtype=np.uint8)
    vs = check_qdq_model(m, "tensorrt")
    assert _rules(vs, "in_Q") == {"qdq-dtype", "zero-point"}
    assert _rules(vs, "in_DQ") == {"qdq-dtype", "zero-point"}
    assert check_qdq_model(m, "ort-cpu") == []
    _run_ort(m)


def test_quantize_without_zero_point_is_uint8():
    m = conv_model()
    q = next(n for n in m.graph.node if n.name == "in_Q")
    del q.input[2:]
    vs = check_qdq_model(m)
    assert "qdq-dtype" in _rules(vs, "in_Q")
    assert any("without a zero point" in v.message for v in vs)


def test_int8_activation_zero_point_nonzero():
    m = conv_model(zp_act=3)
    assert _rules(check_qdq_model(m), "in_Q") == {"zero-point"}
    assert check_qdq_model(m, "ort-cpu") == []


def test_weight_zero_point_nonzero_flagged_on_both_targets():
    m = conv_model(w_zp=np.array([0, 1, 0, 0], np.int8))
    for target in ("tensorrt", "ort-cpu"):
        assert _rules(check_qdq_model(m, target), "w_DQ") == {"zero-point"}


@pytest.mark.parametrize("bad", [0.0, -0.01, np.inf, np.nan])
def test_bad_scale(bad):
    s = np.full(4, 0.01, np.float32)
    s[2] = bad
    vs = check_qdq_model(conv_model(scale_override=s))
    assert _rules(vs, "w_DQ") == {"scale"}


def test_non_constant_scale():
    m = conv_model()
    m.graph.input.append(_vi("dyn_s", []))
    q = next(n for n in m.graph.node if n.name == "in_Q")
    q.input[1] = "dyn_s"
    assert "scale" in _rules(check_qdq_model(m), "in_Q")


def test_int8_weight_minus_128():
    w = RNG.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)
    w[1, 0, 0, 0] = -128
    vs = check_qdq_model(conv_model(w_override=w))
    assert _rules(vs) == {"weight-range"} and vs[0].node == "w_DQ"


def test_int4_weight_full_range_is_allowed():
    """Weight-only INT4 uses the whole signed range [-8, 7] (TensorRT's and onnxruntime's INT4)."""
    w = np.full((4, 3, 1, 1), 3, np.int8)
    w[0, 0, 0, 0] = -8
    assert _rules(check_qdq_model(int4_model(w_override=w))) == set()


def test_negative_weight_scale_only_for_onnxruntime():
    """A signed per-block weight scale is fine for onnxruntime but not for TensorRT."""
    m = int4_model()
    s = next(t for t in m.graph.initializer if t.name == "wm_s")
    arr = numpy_helper.to_array(s).copy()
    arr[0, 0] = -arr[0, 0]
    s.CopyFrom(numpy_helper.from_array(arr, "wm_s"))
    assert _rules(check_qdq_model(m, "tensorrt"), "wm_DQ") == {"scale"}
    assert "scale" not in _rules(check_qdq_model(m, "ort-cpu"), "wm_DQ")
    arr[0, 0] = 0.0
    s.CopyFrom(numpy_helper.from_array(arr, "wm_s"))
    assert "scale" in _rules(check_qdq_model(m, "ort-cpu"), "wm_DQ")


def test_conv_per_channel_wrong_axis():
    vs = check_qdq_model(conv_model(axis=1))  # ONNX default axis is 1: a common mistake
    assert _rules(vs, "w_DQ") == {"weight-axis"}


def test_per_channel_scale_length_mismatch():
    vs = check_qdq_model(conv_model(scale_override=np.full(3, 0.01, np.float32)))
    assert _rules(vs, "w_DQ") == {"weight-axis"}


def test_matmul_axis_0_flagged():
    vs = check_qdq_model(matmul_model(axis=0, k=6, n=6))
    assert _rules(vs, "B_DQ") == {"weight-axis"}


def test_gemm_axis_follows_transb():
    assert _rules(check_qdq_model(gemm_model(trans_b=1, axis=1)), "B_DQ") == {"weight-axis"}
    assert _rules(check_qdq_model(gemm_model(trans_b=0, axis=0)), "B_DQ") == {"weight-axis"}


def test_blocked_dq_on_output_axis():
    vs = check_qdq_model(int4_model(block_axis=1))
    assert _rules(vs, "wm_DQ") == {"weight-axis"}


def test_int4_activation():
    m = residual_model()
    for n in m.graph.initializer:
        if n.name == "mid_zp":
            n.CopyFrom(_t("mid_zp", np.array(0, np.int8), I4))
    m.opset_import[0].version = 21
    vs = check_qdq_model(m)
    assert _rules(vs, "mid_Q") == {"int4-activation"}
    assert _rules(vs, "mid_DQ") == {"int4-activation"}


def test_qdq_on_graph_output():
    m = conv_model()
    n2, i2 = _act_qdq("y0", "y", "out")
    for n in m.graph.node:
        if n.name == "relu":
            n.output[0] = "y0"
    m.graph.node.extend(n2)
    m.graph.initializer.extend(i2)
    vs = check_qdq_model(m)
    assert _rules(vs, "out_DQ") == {"qdq-on-output"}
    assert "out_Q" not in {v.node for v in vs}


def test_residual_add_one_side_quantized():
    m = residual_model(quantize_skip=False)
    vs = check_qdq_model(m)
    assert _rules(vs, "add") == {"residual-add"}
    assert "both inputs of a residual Add need Q/DQ" in vs[0].message
    assert check_qdq_model(m, "ort-cpu") == []
    _run_ort(m)


def test_add_with_constant_input_is_not_residual():
    assert check_qdq_model(matmul_model()) == []  # Add(m, bias): bias is constant


def test_qdq_mismatch():
    m = conv_model()
    m.graph.initializer.append(_t("other_s", _scalar(0.1)))
    dq = next(n for n in m.graph.node if n.name == "in_DQ")
    dq.input[1] = "other_s"
    assert _rules(check_qdq_model(m), "in_DQ") == {"qdq-mismatch"}


def test_redundant_dq_q_pair():
    m = conv_model()
    dq = next(n for n in m.graph.node if n.name == "in_DQ")
    dq.output[0] = "xd0"
    m.graph.node.extend([_q("again_Q", "xd0", "xq2", "in_s", "in_zp"),
                         _dq("again_DQ", "xq2", "xd", "in_s", "in_zp")])
    m.graph.node.sort(key=lambda n: ["in_Q", "in_DQ", "again_Q", "again_DQ"].index(n.name)
                      if n.name in ("in_Q", "in_DQ", "again_Q", "again_DQ") else 9)
    vs = check_qdq_model(m)
    assert _rules(vs) == {"redundant-qdq"} and vs[0].node == "again_Q"


def test_duplicate_quantize():
    m = residual_model()
    # quantize x a second time with the same parameters for the skip branch
    m.graph.node.extend([_q("in_Q2", "x", "in_q2", "in_s", "in_zp"),
                         _dq("in_DQ2", "in_q2", "xd2", "in_s", "in_zp")])
    add = next(n for n in m.graph.node if n.name == "add")
    add.input[1] = "xd2"
    m.graph.node.remove(add)
    m.graph.node.append(add)
    vs = check_qdq_model(m)
    assert _rules(vs) == {"duplicate-quantize"} and vs[0].node == "in_Q2"


def test_unquantized_weight_is_warning():
    m = conv_model()
    m.graph.initializer.append(_t("w_float", RNG.standard_normal((4, 3, 3, 3)).astype(
        np.float32)))
    conv = next(n for n in m.graph.node if n.name == "conv")
    conv.input[1] = "w_float"
    vs = check_qdq_model(m)
    assert [(v.rule, v.node, v.severity) for v in vs] == [
        ("unquantized-weight", "conv", "warning")]
    assert "mixed precision weighted op" in vs[0].message
    _run_ort(m)


def test_quantize_on_float_weight_is_warning():
    m = conv_model()
    m.graph.initializer.append(_t("w_float", RNG.standard_normal((4, 3, 3, 3)).astype(
        np.float32)))
    m.graph.initializer.append(_t("w_zp0", np.zeros(4, np.int8)))
    dq = next(n for n in m.graph.node if n.name == "w_DQ")
    dq.input[0] = "w_q2"
    m.graph.node.insert(0, helper.make_node("QuantizeLinear", ["w_float", "w_s", "w_zp0"],
                                            ["w_q2"], name="w_Q", axis=0))
    vs = check_qdq_model(m)
    assert [(v.rule, v.node, v.severity) for v in vs] == [
        ("quantize-on-weight", "w_Q", "warning")]


def test_contrib_domain_qdq():
    m = conv_model()
    next(n for n in m.graph.node if n.name == "in_DQ").domain = "com.microsoft"
    assert _rules(check_qdq_model(m), "in_DQ") == {"qdq-domain"}
    assert check_qdq_model(m, "ort-cpu") == []


def test_int32_bias_dq_tensorrt_only():
    m = conv_model()
    m.graph.initializer.append(_t("b_q", np.arange(4, dtype=np.int32)))
    m.graph.initializer.append(_t("b_s", np.full(4, 1e-4, np.float32)))
    m.graph.node.insert(0, _dq("b_DQ", "b_q", "b_deq", "b_s", axis=0))
    next(n for n in m.graph.node if n.name == "conv").input[2] = "b_deq"
    vs = check_qdq_model(m)
    assert _rules(vs, "b_DQ") == {"qdq-dtype"} and "float biases" in vs[0].message
    assert check_qdq_model(m, "ort-cpu") == []
    _run_ort(m)


def test_quantized_preactivation_is_warning():
    m = conv_model()
    relu = next(n for n in m.graph.node if n.name == "relu")
    relu.input[0] = "cd"
    n2, i2 = _act_qdq("c", "cd", "pre")
    m.graph.node.extend(n2)
    m.graph.initializer.extend(i2)
    m.graph.node.remove(relu)
    m.graph.node.append(relu)
    vs = check_qdq_model(m)
    assert [(v.rule, v.node, v.severity) for v in vs] == [
        ("quantized-preactivation", "pre_Q", "warning")]


def test_every_rule_documented():
    assert all(isinstance(v, str) and v for v in RULES.values())
    assert Violation("x", "n", "m").severity == "error"
