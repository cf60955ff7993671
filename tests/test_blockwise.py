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

from onnxflex.checks.tensorrt import check_qdq_model
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


@pytest.mark.parametrize("grid", ["narrow", "full", "signed", "asymmetric"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bits", [4, 3, 8])
def test_flexround_at_init_equals_blockwise_rtn(layout, bits, grid):
    rtn, fr = _quantizer("rtn", layout, bits, grid=grid), _quantizer("flexround", layout, bits, grid=grid)
    assert torch.equal(rtn.integers(), fr.integers())
    assert torch.equal(rtn.scale(), fr.scale())
    assert torch.equal(rtn(), fr())


@pytest.mark.parametrize("grid", ["narrow", "signed", "asymmetric"])
@pytest.mark.parametrize("method", ["rtn", "flexround", "adaround"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_blockwise_forward_equals_integers_times_expanded_scale(method, layout, grid):
    q = _quantizer(method, layout, grid=grid)
    if method == "flexround":  # move away from init so the check is not trivial
        with torch.no_grad():
            for p in (q.log_s1, q.log_S2, q.log_s3):
                p.add_(torch.randn_like(p) * 0.05)
    q.freeze()
    assert torch.equal(q(), q.deployed_weight())
    lo, hi = {"narrow": (-7, 7), "signed": (-8, 7), "asymmetric": (0, 15)}[grid]
    stored = q.stored_integers()
    assert lo <= int(stored.min()) and int(stored.max()) <= hi
    z = q.expand_blocks(q.zero_point().reshape(q._scale_shape()).float())
    assert torch.equal(q(), (stored - z) * q.expand_scale(q.scale()))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_asymmetric_grid_spans_each_blocks_min_to_max(layout):
    """minmax: [0, 15] covers exactly [min(w, 0), max(w, 0)] of each block with an integer zero point;
    on blocks shifted off zero it beats every symmetric grid."""
    shape, _, in_axis = LAYOUTS[layout]
    q = _quantizer("rtn", layout, scale_method="minmax", grid="asymmetric")
    w = q.weight.movedim(in_axis, 1)
    blocks = [w[:, i:i + 32] for i in range(0, 80, 32)]
    lo = torch.stack([b.amin(1).clamp(max=0) for b in blocks], 1)
    hi = torch.stack([b.amax(1).clamp(min=0) for b in blocks], 1)
    s, z = q.scale().movedim(in_axis, 1), q.zero_point().movedim(in_axis, 1)
    torch.testing.assert_close(s, (hi - lo) / 15)
    assert torch.equal(z, torch.round(-lo / s).to(torch.int32))
    shifted = _weight(shape).abs() + 0.3
    err = {g: float((get_method("rtn").make_quantizer(shifted, 4, LAYOUTS[layout][1], in_axis, block_size=32, grid=g)()
                     - shifted).pow(2).sum()) for g in ("narrow", "signed", "asymmetric")}
    assert err["asymmetric"] < 0.5 * min(err["narrow"], err["signed"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_full_and_signed_grids_use_the_extra_level(layout):
    """Full grid: the minmax scale clips neither side of [-8, 7]. Signed grid: each block's largest
    magnitude lands exactly on -8 (the scale takes the opposite sign), so every block gets the 1/8 step."""
    shape, _, in_axis = LAYOUTS[layout]
    full = _quantizer("rtn", layout, scale_method="minmax", grid="full")
    w = full.weight.movedim(in_axis, 1)
    blocks = [w[:, i:i + 32] for i in range(0, 80, 32)]
    expect = torch.stack([torch.maximum((-b).clamp(min=0).amax(1) / 8, b.clamp(min=0).amax(1) / 7) for b in blocks], 1)
    torch.testing.assert_close(full.scale().movedim(in_axis, 1), expect)
    signed = _quantizer("rtn", layout, scale_method="minmax", grid="signed")
    s = signed.scale().movedim(in_axis, 1)
    peaks = torch.stack([b.gather(1, b.abs().argmax(1, keepdim=True))[:, 0] for b in blocks], 1)
    sign = -torch.sign(peaks)
    # the other side of an oriented block may still need more than 7 steps of |peak| / 8
    others = torch.stack([(b * g[:, None]).amax(1) for b, g in zip(blocks, sign.unbind(1))], 1)
    torch.testing.assert_close(s, sign * torch.maximum(peaks.abs() / 8, others / 7))
    q = signed.integers().movedim(in_axis, 1)
    at_peak = torch.stack([q[:, i:i + 32].gather(1, b.abs().argmax(1, keepdim=True))[:, 0]
                           for i, b in zip(range(0, 80, 32), blocks)], 1)
    lands = peaks.abs() / 8 >= others / 7
    assert bool(lands.any()) and bool((at_peak[lands] == -8).all())
    narrow = _quantizer("rtn", layout)
    err = {g: float((_quantizer("rtn", layout, grid=g)() - narrow.weight).pow(2).sum()) for g in ("full", "signed")}
    err["narrow"] = float((narrow() - narrow.weight).pow(2).sum())
    assert err["signed"] < err["full"] <= err["narrow"]


def test_weight_grid_follows_the_target_and_the_bits():
    from onnxflex.targets import get_target

    trt, cpu = get_target("tensorrt"), get_target("ort-cpu")
    assert trt.weight_grid(8, 8) == "narrow" and cpu.weight_grid(0, 8) == "narrow"  # int8 stays in [-127, 127]
    assert trt.weight_grid(8, 7) == "narrow"  # --reduce-range's [-63, 63]
    assert trt.weight_grid(8, 4) == "narrow" and cpu.weight_grid(8, 4) == "narrow"  # W4A8: measured lower top-1
    assert trt.weight_grid(8, 3) == "full" and cpu.weight_grid(8, 3) == "signed"  # W3A8 gets INT4's -4
    assert trt.weight_grid(0, 4) == "full" and trt.weight_grid(0, 3) == "full"  # TensorRT wants scales > 0
    assert cpu.weight_grid(0, 4) == "signed" and cpu.weight_grid(0, 3) == "signed"
    assert cpu.weight_grid(0, 4, asymmetric=True) == "asymmetric" and cpu.weight_grid(0, 8, asymmetric=True) == "asymmetric"
    for bad, match in ((dict(act_bits=8), "weight-only"), (dict(target="tensorrt"), "zero points")):
        with pytest.raises(OnnxflexError, match=match):
            QuantConfig(**{**dict(asymmetric=True, act_bits=0, target="ort-cpu", weight_bits=4), **bad}).resolved()


def test_flexround_blockwise_learns_one_s1_per_block():
    q = _quantizer("flexround", "matmul_kn")
    loss = (q() - q.weight).pow(2).sum()
    loss.backward()
    assert q.log_s1.shape == (3, 24) and q.log_s1.grad is not None and q.log_s1.grad.abs().sum() > 0


def test_blockwise_needs_a_2d_weight():
    for method in ("rtn", "gptq"):
        with pytest.raises(ValueError):
            get_method(method).make_quantizer(torch.randn(8, 4, 3, 3), 4, 0, 1, block_size=32)
    for bad in (8, 48, -32):
        with pytest.raises(OnnxflexError, match="block-size"):
            QuantConfig(block_size=bad).resolved()
    assert QuantConfig(block_size=32, method="gptq", asymmetric=True, act_bits=0, target="ort-cpu").resolved().block_size == 32
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


@pytest.mark.parametrize("bits,grid", [(4, "narrow"), (8, "narrow"), (4, "signed"), (4, "asymmetric")])
def test_blocked_write_back_round_trips_and_onnxruntime_fuses_matmulnbits(bits, grid, tmp_path, monkeypatch):
    q = _quantizer("flexround", "matmul_kn", bits=bits, grid=grid)
    with torch.no_grad():
        q.log_S2.add_(torch.randn_like(q.log_S2) * 0.1)
    q.freeze()
    w = q.weight.numpy()
    asym = grid == "asymmetric"
    res = WeightResult(WeightSpec("mm", "MatMul", "w", None, "x", 1, 0), q.stored_integers().numpy().astype(np.int32),
                       q.scale().numpy().astype(np.float32), bits, q.block_size,
                       q.zero_point().numpy() if asym else None)
    out = write_qdq(_matmul_model(w), {"mm": res}, {}, 0)
    onnx.checker.check_model(out)
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 32}
    ints = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}[dq.input[0]]
    assert ints.dtype == (ml_dtypes.uint4 if asym else ml_dtypes.int4 if bits == 4 else np.int8)
    zeros = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}[dq.input[2]]
    assert zeros.dtype == ints.dtype and (bool(zeros.astype(np.int32).any()) == asym)
    # the rule check: onnxruntime takes every grid; TensorRT refuses zero points and negative scales
    assert [v for v in check_qdq_model(out, "ort-cpu") if v.severity == "error"] == []
    trt = {v.rule for v in check_qdq_model(out, "tensorrt") if v.severity == "error"}
    assert trt == {"narrow": set(), "signed": {"scale"}, "asymmetric": {"qdq-dtype", "zero-point"}}[grid]
    x = np.random.default_rng(0).standard_normal((5, 80)).astype(np.float32)
    want = x @ q.deployed_weight().numpy()
    y = make_session(out.SerializeToString(), ["CPUExecutionProvider"], optimization="disable").run(None, {"x": x})[0]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # a big model's session shares its float weights and keeps the int4 ones inline: same result
    import onnxflex.runtime.session as S

    monkeypatch.setattr(S, "WEIGHTLESS_ABOVE_BYTES", 0)
    monkeypatch.setattr("onnxflex.onnx_facts.WEIGHT_MIN_BYTES", 0)
    y2 = make_session(out, ["CPUExecutionProvider"], optimization="disable").run(None, {"x": x})[0]
    np.testing.assert_array_equal(y2, y)
    monkeypatch.undo()
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
