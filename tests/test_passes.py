"""Each pass on its own, on tiny onnx.helper graphs: the pass contract, select, analyze, partition,
calibrate (placement and ranges per target), qdq zero points, and the method registry."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxflex.config import QuantConfig
from onnxflex.context import ActPoint, Context
from onnxflex.errors import InternalError, OnnxflexError
from onnxflex.graph import Graph
from onnxflex.methods import METHODS, get_method
from onnxflex.passes.analyze import AnalyzePass
from onnxflex.passes.base import Pass, Sequential
from onnxflex.passes.calibrate import calibrate_points, qparams
from onnxflex.passes.partition import PartitionPass
from onnxflex.passes.qdq import write_qdq
from onnxflex.passes.select import SelectPass
from onnxflex.quantizers.activation import ActQuantizer
from onnxflex.runtime.session import make_session
from onnxflex.targets import PlacementOptions, get_target
from onnxflex.traits import ModelTraits

pytestmark = pytest.mark.usefixtures("one_thread")


def _w(name, shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.3, name)


def _model(nodes, inits, inputs, outputs, opset=13):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def _resblock():
    """x -> stem Conv -> Relu -> [Conv -> Relu -> Conv] -> Add -> Relu -> Conv -> y: a residual block."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 6, 6])
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["r0", "c2"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3"),
    ]
    weights = [_w("w0", (4, 4, 1, 1), 4), _w("w1", (4, 4, 3, 3), 1), _w("w2", (4, 4, 3, 3), 2), _w("w3", (2, 4, 1, 1), 3)]
    return _model(nodes, weights, [x], [y])


def _ctx(**cfg):
    c = QuantConfig(progress=False, **cfg).resolved()
    return Context(c, get_target(c.target), get_method(c.method))


# ----------------------------------------------------------------------------- the contract

class _Boom(Pass):
    name = "boom"

    def __init__(self, exc):
        self.exc = exc

    def run(self, graph, ctx):
        raise self.exc


class _Mark(Pass):
    name = "mark"

    def run(self, graph, ctx):
        ctx.region_mode = "marked"
        return graph


def test_sequential_runs_in_order_and_times_each_pass():
    ctx = _ctx()
    g = Graph(_resblock())
    assert Sequential(_Mark(), AnalyzePass()).run(g, ctx) is g
    assert ctx.region_mode == "marked" and set(ctx.pass_seconds) == {"mark", "analyze"}


def test_sequential_names_the_failing_pass_for_bugs_but_passes_user_errors_through():
    g = Graph(_resblock())
    with pytest.raises(InternalError, match=r"internal error in the boom pass: KeyError"):
        Sequential(_Mark(), _Boom(KeyError("x"))).run(g, _ctx())
    with pytest.raises(OnnxflexError, match="^bad input$"):
        Sequential(_Boom(OnnxflexError("bad input"))).run(g, _ctx())


# ----------------------------------------------------------------------------- select / analyze

def test_select_refuses_quantized_and_weightless_models_with_the_reason():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    relu = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], [], [x], [y])
    with pytest.raises(OnnxflexError, match="nothing to quantize"):
        SelectPass().run(Graph(relu), _ctx())
    q = numpy_helper.from_array(np.ones((4, 4), np.int8), "wq")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "ws")
    dq = _model([helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="dq"),
                 helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [q, s], [x], [y])
    with pytest.raises(OnnxflexError, match="already quantized .*DequantizeLinear"):
        SelectPass().run(Graph(dq), _ctx())
    with pytest.raises(OnnxflexError, match="--exclude names nodes not in the model: nope"):
        SelectPass().run(Graph(_resblock()), _ctx(exclude=["nope"]))
    ctx = _ctx(exclude=["conv3"])
    SelectPass().run(Graph(_resblock()), ctx)
    assert ctx.quantize_nodes == {"conv0", "conv1", "conv2"}


def test_traits_attention_static_batch_and_kv_cache():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, [2, 3, 4])
    y = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, None)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["q"], name="proj"),
             helper.make_node("Transpose", ["past_key_values.0.key"], ["kt"], name="t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["present.0.key"], name="scores")]
    t = ModelTraits.of(Graph(_model(nodes, [_w("w", (4, 4))], [x, past], [y])))
    assert t.attention and t.static_batch == {"x": 2, "past_key_values.0.key": 2}
    assert t.kv_cache_inputs == ["past_key_values.0.key"] and t.kv_cache_outputs == ["present.0.key"]
    assert not ModelTraits.of(Graph(_resblock())).attention


# ----------------------------------------------------------------------------- partition

@pytest.mark.parametrize("method,regions,expect", [("flexround", "auto", "layer"), ("gptq", "auto", "layer"),
                                                   ("flexround", "block", "block")])
def test_partition_mode_follows_config_method_and_model(method, regions, expect):
    ctx = _ctx(method=method, regions=regions)
    g = Graph(_resblock())
    Sequential(AnalyzePass(), SelectPass(), PartitionPass()).run(g, ctx)
    assert ctx.region_mode == expect
    assert sum(len(r.weights) for r in ctx.regions) == 4
    if expect == "layer":
        assert len(ctx.regions) == 4


def test_auto_regions_of_gptq_are_layers_even_for_attention():
    from onnxflex.passes.partition import auto_mode

    assert auto_mode("cpu", attention=True) == "block"
    assert auto_mode("cpu", attention=True, method_mode=get_method("gptq").region_mode) == "layer"
    assert auto_mode("cpu", attention=True, decoder=True) == "layer" and auto_mode("cuda", True, decoder=True) == "block"


# ----------------------------------------------------------------------------- placement per target

def _points(target, **opts):
    g = Graph(_resblock())
    return get_target(target).act_points(g, ModelTraits.of(g), {"conv0", "conv1", "conv2", "conv3"},
                                         PlacementOptions(**opts), 8)


def test_tensorrt_places_weighted_inputs_and_residual_add_inputs_only():
    pts = _points("tensorrt")
    assert set(pts) == {"x", "r0", "r1", "c2", "r2"}
    assert pts["r0"].consumers == {"conv1", "add"} and pts["c2"].consumers == {"add"}
    assert all(p.dtype == "int8" for p in pts.values())


def test_ort_cpu_quantizes_outputs_after_their_relu_so_ort_fuses_dq_op_q():
    pts = _points("ort-cpu")
    # conv1's output is read through its ReLU (onnxruntime folds the ReLU into the Q), the Add's
    # output likewise; conv3 writes the graph output, which stays float
    assert set(pts) == {"x", "r0", "r1", "c2", "r2"}
    assert "c0" not in pts and "c1" not in pts and "s" not in pts and "y" not in pts
    assert pts["r2"].consumers == {"conv3"}
    no_residual = _points("ort-cpu", quantize_residual=False)
    assert "c2" in no_residual  # the Add is an int8 op on ORT-CPU when its inputs are quantized: conv2 writes Q


# ----------------------------------------------------------------------------- ranges

def test_qparams_symmetric_and_asymmetric():
    assert qparams(-1.0, 2.0, "int8", True) == (2.0 / 127, 0)
    s, z = qparams(0.0, 2.55, "uint8", False)
    assert z == 0 and s == pytest.approx(0.01)
    s, z = qparams(0.0, 2.55, "int8", False)  # a ReLU output on an int8 grid: zero at -128
    assert z == -128 and s == pytest.approx(0.01)
    s, z = qparams(-1.0, 3.0, "int8", False)
    assert -128 <= z <= 127 and abs((-128 - z) * s - -1.0) < s and abs((127 - z) * s - 3.0) < s
    s, z = qparams(0.5, 2.0, "int8", False)  # the range always holds zero exactly
    assert z == -128 and s == pytest.approx(2.0 / 255)


def test_calibrate_asymmetric_relu_output_uses_the_whole_grid():
    m = _resblock()
    feeds = [{"x": np.random.default_rng(0).standard_normal((8, 4, 6, 6)).astype(np.float32)}]
    pts = {"r1": ActPoint("r1", {"conv2"}), "x": ActPoint("x", {"conv0"})}
    calibrate_points(m, pts, feeds, "minmax", symmetric=False)
    assert pts["r1"].low == 0.0 and pts["r1"].zero_point == -128
    r1 = make_session(_with_output(m, "r1")).run(["r1"], feeds[0])[0]
    assert pts["r1"].scale == pytest.approx(r1.max() / 255)
    assert pts["x"].low < 0 < pts["x"].high and -128 < pts["x"].zero_point < 127


def _with_output(m, name):
    from onnxflex.graph import with_float_outputs

    return with_float_outputs(m, [name])


@pytest.mark.parametrize("dtype,zp", [("int8", 0), ("int8", -37), ("uint8", 0), ("uint8", 121)])
def test_act_quantizer_with_zero_point_matches_onnxruntime_qdq(dtype, zp):
    x = np.random.default_rng(1).standard_normal((2, 3, 50)).astype(np.float32) * 2
    s = np.float32(0.013)
    q = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
                helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")],
               [numpy_helper.from_array(np.array(s), "s"), numpy_helper.from_array(np.array(zp, dtype), "z")],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    ref = make_session(q, optimization="disable").run(["y"], {"x": x})[0]
    aq = ActQuantizer(float(s), 8, learn=False, zero_point=zp, signed=dtype == "int8")
    np.testing.assert_array_equal(aq(torch.from_numpy(x)).numpy(), ref)


def test_qdq_writes_each_points_dtype_and_zero_point():
    m = _resblock()
    pts = {"r1": ActPoint("r1", {"conv2"}, dtype="uint8", scale=0.02, zero_point=3)}
    out = write_qdq(m, {}, pts, 8)
    z = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}["r1_act_zero_point"]
    assert z.dtype == np.uint8 and int(z) == 3
    onnx.checker.check_model(out)


# ----------------------------------------------------------------------------- methods

def test_method_registry_entries_are_complete():
    assert {"rtn", "flexround", "adaround", "gptq"} <= set(METHODS)
    w = torch.randn(6, 5)
    for name, m in METHODS.items():
        q = m.make_quantizer(w, 4, 0, 1)
        assert q.integers().shape == w.shape, name
        assert (m.fit == "adam") == (m.lr is not None), name
    assert QuantConfig(method="gptq").resolved().iters == 0
    assert QuantConfig(method="adaround").resolved().lr == 1e-3
    assert QuantConfig(method="flexround").resolved().lr == 3e-3
    with pytest.raises(OnnxflexError, match="unknown method"):
        QuantConfig(method="nope").resolved()
    with pytest.raises(OnnxflexError, match="unknown target"):
        QuantConfig(target="nope").resolved()


def test_ort_cpu_keeps_matmul_outputs_float_and_limits_clipped_ranges():
    """MatMul with a float output becomes MatMulIntegerToFloat (a Q there only costs accuracy); a Q
    after Clip(0, 6) must not reach past 6, or onnxruntime keeps the Clip and the Conv in float."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    six = numpy_helper.from_array(np.array(6.0, np.float32), "six")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    shape = numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"),
             helper.make_node("Clip", ["c0", "zero", "six"], ["r0"], name="relu6"),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1"),
             helper.make_node("GlobalAveragePool", ["c1"], ["p"], name="gap"),
             helper.make_node("Reshape", ["p", "shape"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "w2"], ["m"], name="fc1"),
             helper.make_node("Relu", ["m"], ["mr"], name="relu"),
             helper.make_node("MatMul", ["mr", "w3"], ["y"], name="fc2")]
    m = _model(nodes, [_w("w0", (4, 4, 1, 1)), _w("w1", (4, 4, 1, 1)), _w("w2", (4, 4)), _w("w3", (4, 3)),
                       six, zero, shape], [x], [y])
    g = Graph(m)
    pts = get_target("ort-cpu").act_points(g, ModelTraits.of(g), {"conv0", "conv1", "fc1", "fc2"},
                                           PlacementOptions(), 8)
    assert pts["r0"].high_limit == 6.0 and pts["r0"].dtype == "uint8"
    assert "c1" in pts and "p" in pts  # conv1 -> Q; GAP reads DQ and writes Q (QLinearGlobalAveragePool)
    assert "m" not in pts and "mr" in pts and "y" not in pts  # fc1 output float; fc2's input quantized
    feeds = [{"x": (np.random.default_rng(0).standard_normal((8, 4, 6, 6)) * 50).astype(np.float32)}]
    calibrate_points(m, pts, feeds, "minmax", symmetric=False)
    assert pts["r0"].zero_point == 0 and 255 * pts["r0"].scale <= 6.0 + 1e-6
    from onnxflex.passes.reconstruct import max_scale

    assert max_scale(pts["r0"], 8) == pytest.approx(6.0 / 255)
    assert ActQuantizer(1.0, 8, signed=False, max_scale=6.0 / 255).scale() == pytest.approx(6.0 / 255)


def test_ort_cpu_shares_qparams_through_reshape_and_writes_an_int32_gemm_bias():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    shape = numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")
    bias = numpy_helper.from_array(np.array([0.5, -0.25, 1.0], np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("GlobalAveragePool", ["r0"], ["p"], name="gap"),
             helper.make_node("Reshape", ["p", "shape"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w1", "b"], ["y"], name="fc", transB=1)]
    m = _model(nodes, [_w("w0", (4, 4, 1, 1)), _w("w1", (3, 4)), shape, bias], [x], [y])
    g = Graph(m)
    pts = get_target("ort-cpu").act_points(g, ModelTraits.of(g), {"conv0", "fc"}, PlacementOptions(), 8)
    assert pts["f"].same_as == "p" and pts["f"].consumers == {"fc"}
    feeds = [{"x": np.random.default_rng(0).standard_normal((8, 4, 6, 6)).astype(np.float32)}]
    calibrate_points(m, pts, feeds, "minmax", symmetric=False)
    assert (pts["f"].scale, pts["f"].zero_point) == (pts["p"].scale, pts["p"].zero_point)
    from onnxflex.context import WeightResult

    spec = g.weight_spec(g.node_by_name["fc"])
    w_scale = np.full(3, 0.01, np.float32)
    res = {"fc": WeightResult(spec, np.ones((3, 4), np.int32), w_scale, 8)}
    out = write_qdq(m, res, pts, 8, int32_bias=True)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    b_q = next(v for k, v in inits.items() if k.endswith("bias_quantized"))
    assert b_q.dtype == np.int32
    np.testing.assert_allclose(b_q * pts["f"].scale * w_scale, [0.5, -0.25, 1.0], atol=pts["f"].scale * 0.01)
    fc = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert fc.input[2].endswith("bias_dequantized")
    onnx.checker.check_model(out)


def test_ort_cpu_stores_embedding_tables_as_int8_rows():
    from onnxflex.passes.qdq import table_results

    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 16])
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32), "emb")
    m = _model([helper.make_node("Gather", ["emb", "ids"], ["y"], name="lookup")], [table], [ids], [y])
    g = Graph(m)
    res = table_results(g)
    assert list(res) == ["lookup"] and res["lookup"].scale.shape == (100,)
    out = write_qdq(m, res, {}, 8)
    assert {t.name: t.data_type for t in out.graph.initializer}["emb_quantized"] == TensorProto.INT8
    feed = {"ids": np.array([[0, 5, 99, 3, 3]], np.int64)}
    ref = make_session(m).run(["y"], feed)[0]
    got = make_session(out).run(["y"], feed)[0]
    step = numpy_helper.to_array(table).__abs__().max(axis=1)[[0, 5, 99, 3, 3]] / 127
    assert np.all(np.abs(got - ref) <= step[None, :, None] / 2 + 1e-6)
