"""Block-wise (group) weight quantization: one scale per block of K rows per output channel.

The scales are written as a blocked DequantizeLinear (opset 21) which onnxruntime's CPU provider turns
into MatMulNBits; the learned integers must survive that write-back bit for bit.
"""
from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxflex.config import QuantConfig
from onnxflex.context import WeightResult
from onnxflex.errors import OnnxflexError
from onnxflex.graph import WeightSpec
from onnxflex.methods import get_method
from onnxflex.passes.qdq import write_qdq
from onnxflex.runtime.session import make_session

pytestmark = pytest.mark.usefixtures("one_thread")

# name: (shape, out_axis, in_axis); K = 80 is not a multiple of 32, so the last block is partial
LAYOUTS = {"matmul_kn": ((80, 24), 1, 0), "gemm_nk": ((24, 80), 0, 1)}


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.2
    w.view(-1)[::37] *= 6.0  # outliers, so blocks get different scales
    return w


def _quantizer(method, layout, bits=4, block=32, **kw):
    shape, out_axis, in_axis = LAYOUTS[layout]
    return get_method(method).make_quantizer(_weight(shape), bits, out_axis, in_axis, block_size=block, **kw)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_block_scales_have_onnx_blocked_shape_and_per_block_ranges(layout):
    q = _quantizer("rtn", layout)
    shape, _, in_axis = LAYOUTS[layout]
    s = q.scale()
    want = list(shape)
    want[in_axis] = 3  # ceil(80 / 32)
    assert list(s.shape) == want
    # each block's scale comes from that block alone: the minmax scale of one block is its own max / qmax
    mm = _quantizer("rtn", layout, scale_method="minmax")
    w = mm.weight.movedim(in_axis, 1)
    blocks = [w[:, i:i + 32] for i in range(0, 80, 32)]
    expect = torch.stack([b.abs().amax(dim=1) / 7.0 for b in blocks], dim=1)  # [Cout, nblocks]
    got = mm.scale().movedim(in_axis, 1)
    torch.testing.assert_close(got, expect)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bits", [4, 3, 8])
def test_flexround_at_init_equals_blockwise_rtn(layout, bits):
    rtn, fr = _quantizer("rtn", layout, bits), _quantizer("flexround", layout, bits)
    assert torch.equal(rtn.integers(), fr.integers())
    assert torch.equal(rtn.scale(), fr.scale())
    assert torch.equal(rtn(), fr())


@pytest.mark.parametrize("method", ["rtn", "flexround", "adaround"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_blockwise_forward_equals_integers_times_expanded_scale(method, layout):
    q = _quantizer(method, layout)
    if method == "flexround":  # move away from init so the check is not trivial
        with torch.no_grad():
            for p in (q.log_s1, q.log_S2, q.log_s3):
                p.add_(torch.randn_like(p) * 0.05)
    q.freeze()
    assert torch.equal(q(), q.deployed_weight())
    assert int(q.integers().abs().max()) <= 7


def test_flexround_blockwise_learns_one_s1_per_block():
    q = _quantizer("flexround", "matmul_kn")
    loss = (q() - q.weight).pow(2).sum()
    loss.backward()
    assert q.log_s1.shape == (3, 24) and q.log_s1.grad is not None and q.log_s1.grad.abs().sum() > 0


def test_blockwise_needs_a_2d_weight_and_gptq_refuses():
    with pytest.raises(ValueError):
        get_method("rtn").make_quantizer(torch.randn(8, 4, 3, 3), 4, 0, 1, block_size=32)
    with pytest.raises(ValueError):
        get_method("gptq").make_quantizer(torch.randn(64, 8), 4, 1, 0, block_size=32)
    for bad in (8, 48, -32):
        with pytest.raises(OnnxflexError, match="block-size"):
            QuantConfig(block_size=bad).resolved()
    with pytest.raises(OnnxflexError, match="gptq"):
        QuantConfig(block_size=32, method="gptq").resolved()
    with pytest.raises(OnnxflexError, match="granularity"):
        QuantConfig(block_size=32, granularity="tensor").resolved()


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m


@pytest.mark.parametrize("bits", [4, 8])
def test_blocked_write_back_round_trips_and_onnxruntime_fuses_matmulnbits(bits, tmp_path):
    q = _quantizer("flexround", "matmul_kn", bits=bits)
    with torch.no_grad():
        q.log_S2.add_(torch.randn_like(q.log_S2) * 0.1)
    q.freeze()
    w = q.weight.numpy()
    res = WeightResult(WeightSpec("mm", "MatMul", "w", None, "x", 1, 0), q.integers().numpy().astype(np.int32),
                       q.scale().numpy().astype(np.float32), bits, q.block_size)
    out = write_qdq(_matmul_model(w), {"mm": res}, {}, 0)
    onnx.checker.check_model(out)
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 32}
    ints = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}[dq.input[0]]
    assert ints.dtype == (ml_dtypes.int4 if bits == 4 else np.int8)
    x = np.random.default_rng(0).standard_normal((5, 80)).astype(np.float32)
    want = x @ q.deployed_weight().numpy()
    y = make_session(out.SerializeToString(), ["CPUExecutionProvider"], optimization="disable").run(None, {"x": x})[0]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    if bits == 4:  # the deployment form onnxruntime runs: DequantizeLinear + MatMul fused into MatMulNBits
        # (its default accuracy level 4 rounds the activations to int8 per block: close, not exact)
        y = make_session(out.SerializeToString(), ["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert np.abs(y - want).max() < 0.02 * np.abs(want).max()
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
        assert ops["MatMulNBits"] == 1 and ops["DequantizeLinear"] == 0
