"""RegionModule replays a multi-node ONNX region exactly and wires quantizers where asked."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from onnxflex.lift import RegionModule, unsupported_ops

OPSET = 17
RNG = np.random.default_rng(1)

# ONNX-exporter style names: they contain '/', '.', ':' and cannot be torch attribute names
W1, B1, W2, B2, W3, B3 = "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc.weight", "onnx::Gemm_7"
RELU = "/relu/Relu_output_0"


def _weights():
    r = lambda *s: (RNG.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    return {W1: r(4, 3, 3, 3), B1: r(4), W2: r(4, 4, 3, 3), B2: r(4), W3: r(5, 4), B3: r(5),
            "axes0": np.array([0], np.int64), "idx0": np.array(0, np.int64)}


WEIGHTS = _weights()


def _nodes(insert_after_relu_for_conv2=False):
    """Conv -> Relu -> Conv -> Add(residual) -> GAP -> Flatten -> Gemm, plus a Reshape whose
    target shape is computed with Shape/Gather/Unsqueeze/Concat and a Constant node."""
    conv2_in = RELU
    nodes = [
        oh.make_node("Conv", ["x", W1, B1], ["/conv1/Conv_output_0"], name="/conv1/Conv", pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["/conv1/Conv_output_0"], [RELU], name="/relu/Relu"),
    ]
    if insert_after_relu_for_conv2:  # reference for act_quant: conv2 alone sees relu + 1
        nodes.append(oh.make_node("Add", [RELU, "one"], ["relu_q"], name="fake_q"))
        conv2_in = "relu_q"
    nodes += [
        oh.make_node("Conv", [conv2_in, W2, B2], ["/conv2/Conv_output_0"], name="/conv2/Conv", pads=[1, 1, 1, 1]),
        oh.make_node("Add", [RELU, "/conv2/Conv_output_0"], ["/add/Add_output_0"], name="/add/Add"),
        oh.make_node("GlobalAveragePool", ["/add/Add_output_0"], ["gap"], name="/gap"),
        oh.make_node("Flatten", ["gap"], ["flat"], name="/flatten"),
        oh.make_node("Gemm", ["flat", W3, B3], ["logits"], name="/fc/Gemm", transB=1),
        oh.make_node("Shape", ["/add/Add_output_0"], ["shp"], name="/Shape"),
        oh.make_node("Gather", ["shp", "idx0"], ["n"], name="/Gather", axis=0),
        oh.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="/Unsqueeze"),
        oh.make_node("Constant", [], ["minus1"], name="/Constant",
                     value=numpy_helper.from_array(np.array([-1], np.int64))),
        oh.make_node("Concat", ["n1", "minus1"], ["newshape"], name="/Concat", axis=0),
        oh.make_node("Reshape", ["/add/Add_output_0", "newshape"], ["reshaped"], name="/Reshape"),
    ]
    return nodes


def _ort(nodes, inits, feeds, outputs=("logits", "reshaped")):
    graph = oh.make_graph(
        nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [onnx.ValueInfoProto(name=o) for o in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", OPSET)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(list(outputs), feeds)


def _x(n=2):
    return RNG.standard_normal((n, 3, 8, 8)).astype(np.float32)


def _close(a, b, tol=1e-4):
    return np.abs(a.detach().numpy() - b).max() <= tol


def test_region_matches_ort():
    x = _x()
    ref = _ort(_nodes(), WEIGHTS, {"x": x})
    region = RegionModule(_nodes(), WEIGHTS, ["x"], ["logits", "reshaped"], OPSET)
    out = region(torch.from_numpy(x))
    assert set(out) == {"logits", "reshaped"}
    assert _close(out["logits"], ref[0]) and _close(out["reshaped"], ref[1])
    assert out["reshaped"].shape == (2, 4 * 8 * 8)
    by_name = region(**{"x": torch.from_numpy(x).double()})  # float64 input computed in float32
    assert by_name["logits"].dtype == torch.float32 and _close(by_name["logits"], ref[0])


def test_constants_are_sanitised_buffers():
    extra = dict(WEIGHTS, unused=np.zeros(3, np.float32), dbl=np.ones(2, np.float64))
    region = RegionModule(_nodes(), extra, ["x"], ["logits"], OPSET)
    assert list(region.parameters()) == []
    assert "unused" not in region.const_keys  # only what the nodes read
    for onnx_name in (W1, B3, "axes0", "minus1"):
        key = region.const_keys[onnx_name]
        assert key.isidentifier()
        assert f"consts.{key}" in region.state_dict()
    assert region.constant("axes0").dtype == torch.int64
    assert region.constant("minus1").dtype == torch.int64  # Constant node folded to a buffer
    assert region.constant(W1).dtype == torch.float32
    region.to("meta")
    assert all(b.is_meta for b in region.buffers())


class ScaledWeight(nn.Module):
    """Stand-in weight quantizer: returns ``w * s`` with a trainable ``s``."""

    def __init__(self, w: np.ndarray, s: float):
        super().__init__()
        self.register_buffer("w", torch.from_numpy(w))
        self.s = nn.Parameter(torch.tensor(s))

    def forward(self):
        return self.w * self.s


def test_weight_override_replaces_constant_and_trains():
    x = _x()
    zero_w2 = dict(WEIGHTS, **{W2: np.zeros_like(WEIGHTS[W2])})
    ref = _ort(_nodes(), zero_w2, {"x": x})
    q = ScaledWeight(WEIGHTS[W2], 0.0)
    region = RegionModule(_nodes(), WEIGHTS, ["x"], ["logits", "reshaped"], OPSET, weight_overrides={W2: q})
    assert any(p is q.s for p in region.parameters())
    out = region(torch.from_numpy(x))
    assert _close(out["logits"], ref[0]) and _close(out["reshaped"], ref[1])
    out["logits"].square().sum().backward()
    assert q.s.grad is not None and q.s.grad.abs() > 0


class CountingShift(nn.Module):
    """Stand-in activation quantizer: adds 1 and counts calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + 1.0


def test_act_quant_only_for_listed_consumers():
    x = _x()
    one = {"one": np.array(1.0, np.float32)}
    ref = _ort(_nodes(insert_after_relu_for_conv2=True), dict(WEIGHTS, **one), {"x": x})
    aq = CountingShift()
    region = RegionModule(_nodes(), WEIGHTS, ["x"], ["logits", "reshaped"], OPSET,
                          act_quant={RELU: aq}, act_consumers={RELU: {"/conv2/Conv"}})
    out = region(torch.from_numpy(x))
    assert _close(out["logits"], ref[0]) and _close(out["reshaped"], ref[1])
    assert aq.calls == 1


def test_act_quant_all_consumers_computed_once_and_outputs_raw():
    x = _x()
    aq = CountingShift()
    region = RegionModule(_nodes(), WEIGHTS, ["x"], ["logits", RELU], OPSET, act_quant={RELU: aq})
    out = region(torch.from_numpy(x))
    assert aq.calls == 1  # read by conv2 and add, quantized once
    ref_relu = _ort(_nodes(), WEIGHTS, {"x": x}, outputs=(RELU,))[0]
    assert _close(out[RELU], ref_relu)  # region output is the raw tensor
    # both consumers read relu + 1: emulate with ORT by shifting both reads
    nodes = _nodes()
    nodes.insert(2, oh.make_node("Add", [RELU, "one"], ["relu_q"], name="q"))
    for n in nodes[3:5]:
        n.input[:] = ["relu_q" if i == RELU else i for i in n.input]
    ref = _ort(nodes, dict(WEIGHTS, one=np.array(1.0, np.float32)), {"x": x})
    assert _close(out["logits"], ref[0])


def test_unnamed_nodes_and_multi_output_ops():
    nodes = [
        oh.make_node("Split", ["x"], ["a", "b"], axis=1),  # equal split, sizes from #outputs
        oh.make_node("Mul", ["a", "b"], ["y"]),
        oh.make_node("Dropout", ["y"], ["z", ""]),
    ]
    x = RNG.standard_normal((2, 6)).astype(np.float32)
    region = RegionModule(nodes, {}, ["x"], ["z"], 13, act_quant={"a": CountingShift()},
                          act_consumers={"a": {"named"}})
    out = region(torch.from_numpy(x))["z"]
    assert torch.allclose(out, torch.from_numpy(x[:, :3] * x[:, 3:]))


def test_unsupported_op_raises():
    nodes = _nodes() + [oh.make_node("NonMaxSuppression", ["logits"], ["nms"], name="/nms")]
    with pytest.raises(NotImplementedError, match=r"op NonMaxSuppression \(node /nms\)"):
        RegionModule(nodes, WEIGHTS, ["x"], ["nms"], OPSET)
    fused = oh.make_node("FusedConv", ["x"], ["y"], name="fc", domain="com.microsoft")
    assert unsupported_ops(nodes + [nodes[-1], fused]) == ["NonMaxSuppression", "com.microsoft.FusedConv"]
    assert unsupported_ops(_nodes()) == []


def test_unresolvable_input_raises():
    with pytest.raises(ValueError, match="not region inputs"):
        RegionModule(_nodes()[1:], WEIGHTS, ["x"], ["logits"], OPSET)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_region_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x = _x()
    ref = _ort(_nodes(), WEIGHTS, {"x": x})
    q = ScaledWeight(WEIGHTS[W2], 1.0)
    region = RegionModule(_nodes(), WEIGHTS, ["x"], ["logits", "reshaped"], OPSET,
                          weight_overrides={W2: q}, act_quant={RELU: nn.Identity()}).to("cuda")
    out = region(torch.from_numpy(x).cuda())
    assert out["logits"].is_cuda
    assert _close(out["logits"].cpu(), ref[0]) and _close(out["reshaped"].cpu(), ref[1])
    out["logits"].sum().backward()
    assert q.s.grad is not None
