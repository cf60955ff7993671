"""Weight quantizers (RTN, FlexRound, AdaRound, GPTQ) and activation fake quant: grids, invariants, learning."""
import math

import pytest
import torch
import torch.nn.functional as F

from onnxflex.errors import OnnxflexError
from onnxflex.methods import METHODS as METHOD_REGISTRY, get_method
from onnxflex.quantizers import (ActQuantizer, AdaRoundQuantizer, FlexRoundQuantizer, RTNQuantizer, act_qrange,
                                 init_weight_scale, quantize_weight, round_ste, weight_qrange)


def make_weight_quantizer(method, w, bits, out_axis, in_axis, **kwargs):
    return get_method(method).make_quantizer(w, bits, out_axis, in_axis, **kwargs)

# name: (shape, out_axis, in_axis)
LAYOUTS = {
    "conv": ((8, 4, 3, 3), 0, 1),
    "depthwise": ((6, 1, 3, 3), 0, 1),
    "gemm_nk": ((10, 12), 0, 1),
    "matmul_kn": ((12, 10), 1, 0),
}
METHODS = tuple(METHOD_REGISTRY)  # every registered method builds a quantizer with the same interface


pytestmark = pytest.mark.usefixtures("one_thread")


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.2


def _bshape(q):
    return q._scale_shape()


def test_ranges():
    assert weight_qrange(8) == (-127, 127)
    assert weight_qrange(4) == (-7, 7)
    assert weight_qrange(3) == (-3, 3)
    assert weight_qrange(2) == (-1, 1)
    assert weight_qrange(4, "full") == weight_qrange(4, "signed") == (-8, 7)
    assert weight_qrange(8, "full") == (-128, 127)
    with pytest.raises(ValueError):
        weight_qrange(4, "wide")
    assert act_qrange(8) == (-128, 127)
    assert act_qrange(16) == (-32768, 32767)
    with pytest.raises(ValueError):
        weight_qrange(1)


def test_round_ste_exact_and_identity_grad():
    x = (torch.randn(1000) * 10).requires_grad_(True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.round(torch.tensor(2.5)) == 2.0  # half to even, like ONNX QuantizeLinear


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_flexround_at_init_equals_rtn(layout, per_channel, bits):
    shape, oa, ia = LAYOUTS[layout]
    w = _weight(shape, seed=bits)
    rtn = RTNQuantizer(w, bits, oa, ia, per_channel=per_channel)
    fr = FlexRoundQuantizer(w, bits, oa, ia, per_channel=per_channel)
    assert torch.equal(rtn.scale(), fr.scale())
    assert torch.equal(rtn.integers(), fr.integers())
    assert torch.equal(rtn(), fr().detach())
    # and both agree with the plain helper on the same scale
    q, w_hat = quantize_weight(w, rtn.scale_broadcast(), bits)
    assert torch.equal(q, rtn.integers()) and torch.equal(w_hat, rtn())


def test_flexround_gradients_reach_all_parameters():
    w = _weight((8, 4, 3, 3))
    fr = FlexRoundQuantizer(w, 4, 0, 1)
    assert fr.log_s4 is not None and fr.log_s4.shape == (1, 4, 1, 1)
    assert fr.log_s3.shape == (8, 1, 1, 1) and fr.log_S2.shape == w.shape and fr.log_s1.shape == (8, 1, 1, 1)
    target = torch.randn_like(w)
    ((fr() - target) ** 2).sum().backward()
    for name in ("log_s1", "log_S2", "log_s3", "log_s4"):
        g = getattr(fr, name).grad
        assert g is not None and g.abs().sum() > 0, name


def _flexround_by_autograd(fr):
    """The FlexRound formula as plain autograd ops: the reference for the fused forward and backward."""
    t = fr.expand_blocks(fr.log_s1) + fr.log_S2
    for extra in (fr.log_s3, fr.log_s4):
        if extra is not None:
            t = t + extra
    w = fr.weight if fr.w_signed is None else fr.w_signed
    return fr.scale_broadcast() * torch.clamp(round_ste(w / torch.exp(t)), fr.qmin, fr.qmax)


@pytest.mark.parametrize("shape,out_axis,in_axis,block,grid", [
    ((8, 4, 3, 3), 0, 1, 0, "narrow"), ((24, 10), 1, 0, 8, "signed"), ((20, 12), 1, 0, 8, "asymmetric"),
    ((10, 12), 0, 1, 0, "full")])
def test_flexround_fused_step_equals_autograd_of_the_formula(shape, out_axis, in_axis, block, grid):
    """The hand-written backward (straight-through round, no gradient where clamped) against autograd's,
    with parameters moved far enough that some integers clamp; block sizes that do not divide K."""
    fr = FlexRoundQuantizer(_weight(shape), 3, out_axis, in_axis, block_size=block, grid=grid)
    _scramble(fr)
    target = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ((fr() - target) ** 2).sum().backward()
    fused = {n: p.grad.clone() for n, p in fr.named_parameters()}
    fr.zero_grad()
    ref = _flexround_by_autograd(fr)
    ((ref - target) ** 2).sum().backward()
    assert torch.equal(fr().detach(), ref.detach())
    q = torch.round(ref.detach() / fr.scale_broadcast().detach())
    assert ((q <= fr.qmin) | (q >= fr.qmax)).any()  # the clamp is exercised
    for n, p in fr.named_parameters():
        assert torch.allclose(fused[n], p.grad, rtol=1e-4, atol=1e-6), n


def test_flexround_linear_has_no_s4_and_per_tensor_shapes():
    w = _weight((10, 12))
    fr = FlexRoundQuantizer(w, 4, 0, 1, per_channel=False)
    assert fr.log_s4 is None
    assert fr.log_s1.shape == (1, 1) and fr.log_s3.shape == (10, 1)
    assert fr.scale().shape == ()
    frk = FlexRoundQuantizer(_weight((12, 10)), 4, 1, 0)
    assert frk.log_s3.shape == (1, 10) and frk.scale().shape == (10,)
    dw = FlexRoundQuantizer(_weight((6, 1, 3, 3)), 4, 0, 1)  # depthwise: s4 of size 1
    assert dw.log_s4.shape == (1, 1, 1, 1)


def _scramble(q, seed=0):
    """Move the learnable parameters somewhere non-trivial, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("per_channel", [True, False])
def test_integers_scale_and_frozen_forward(method, layout, per_channel):
    shape, oa, ia = LAYOUTS[layout]
    w = _weight(shape, seed=3)
    w.view(-1)[0] = 5.0  # an outlier so clipping happens at 4 bits
    q = make_weight_quantizer(method, w, 4, oa, ia, per_channel=per_channel)
    _scramble(q)
    q.freeze()
    ints = q.integers()
    assert ints.dtype == torch.int32 and ints.shape == w.shape
    assert int(ints.min()) >= -7 and int(ints.max()) <= 7
    s = q.scale()
    assert s.dtype == torch.float32
    assert s.shape == ((shape[oa],) if per_channel else ())
    assert bool((s > 0).all())
    expect = ints.to(torch.float32) * s.reshape(_bshape(q))
    assert torch.equal(q().detach(), expect)
    assert torch.equal(q.deployed_weight(), expect)


def test_matmul_layout_gives_per_column_scales():
    w = _weight((12, 10))
    w[:, 3] *= 10  # one loud output column
    q = RTNQuantizer(w, 8, 1, 0, scale_method="minmax")
    s = q.scale()
    assert s.shape == (10,)
    torch.testing.assert_close(s, w.abs().amax(dim=0) / 127, rtol=1e-6, atol=0)
    assert s[3] > 5 * s[2]


def test_zero_channel_is_safe():
    w = _weight((4, 6))
    w[1] = 0
    for method in METHODS:
        q = make_weight_quantizer(method, w, 4, 0, 1)
        assert torch.isfinite(q.scale()).all() and bool((q.scale() > 0).all())
        assert (q.integers()[1] == 0).all()
        assert torch.isfinite(q()).all()


def test_init_scale_argument_and_factory_errors():
    w = _weight((4, 6))
    q = make_weight_quantizer("rtn", w, 8, 0, 1, init_scale=torch.full((4,), 0.01))
    torch.testing.assert_close(q.scale(), torch.full((4,), 0.01))
    with pytest.raises(OnnxflexError, match="unknown method 'nope'"):
        make_weight_quantizer("nope", w, 4, 0, 1)


@pytest.mark.parametrize("grid,block", [("narrow", 0), ("signed", 16), ("asymmetric", 0), ("asymmetric", 16)])
def test_initial_grid_handed_on_is_the_same_grid(grid, block, monkeypatch):
    """A quantizer built from another's initial_grid() starts on the same scales (and zero points) bit
    for bit, without searching the range again."""
    import onnxflex.quantizers.grid as grid_mod

    w = _weight((40, 24), seed=3)
    first = make_weight_quantizer("rtn", w, 4, 1, 0, block_size=block, grid=grid)

    def no_search(*a, **k):
        raise AssertionError("the range was searched again")
    monkeypatch.setattr(grid_mod, "init_weight_scale", no_search)
    monkeypatch.setattr(grid_mod, "init_weight_zero_scale", no_search)
    for method in ("flexround", "gptq", "rtn"):
        q = make_weight_quantizer(method, w, 4, 1, 0, block_size=block, grid=grid, init_scale=first.initial_grid())
        assert torch.equal(q.log_s_init, first.log_s_init) and torch.equal(q.scale_sign, first.scale_sign)
        assert torch.equal(q.zero, first.zero)
        assert torch.equal(q.integers(), first.integers()) and torch.equal(q.scale(), first.scale())
    if grid == "asymmetric":
        with pytest.raises(ValueError, match="zero point"):
            make_weight_quantizer("rtn", w, 4, 1, 0, block_size=block, grid=grid, init_scale=first.initial_grid()[0])


def test_lp_init_beats_minmax_with_outliers():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g)
    idx = torch.randint(0, 256, (32, 2), generator=g)
    w.scatter_(1, idx, 8.0 * torch.sign(torch.randn(32, 2, generator=g)))

    def lp_err(s):
        _, w_hat = quantize_weight(w, s, 4)
        return (w - w_hat).abs().pow(2.4).sum(dim=1)

    s_lp = init_weight_scale(w, 4, 0, "lp")
    s_mm = init_weight_scale(w, 4, 0, "minmax")
    assert s_lp.shape == (32, 1) and s_mm.shape == (32, 1)
    e_lp, e_mm = lp_err(s_lp), lp_err(s_mm)
    assert bool((e_lp <= e_mm * (1 + 1e-6)).all())
    assert e_lp.sum() < 0.9 * e_mm.sum()
    s_t = init_weight_scale(w, 4, None, "lp")
    assert s_t.shape == (1, 1)


def _correlated_linear(seed=0, K=64, N=32, M=512):
    """Correlated inputs (as in real networks) so that choosing the rounding can beat nearest."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, K, generator=g) / math.sqrt(K) + 0.5 / math.sqrt(K)
    x = torch.randn(M, K, generator=g) @ A
    w = torch.randn(N, K, generator=g) * 0.1
    return x, w, x @ w.T


def test_flexround_training_beats_rtn():
    torch.manual_seed(0)
    x, w, y = _correlated_linear()
    rtn = F.mse_loss(x @ RTNQuantizer(w, 4, 0, 1)().T, y).item()
    q = FlexRoundQuantizer(w, 4, 0, 1)
    steps = 300
    opt = torch.optim.Adam(q.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0.0)
    for i in range(steps):
        q.set_progress(i / steps)
        loss = F.mse_loss(x @ q().T, y) + q.regularizer()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    q.freeze()
    w_dep = q.deployed_weight()
    flex = F.mse_loss(x @ w_dep.T, y).item()
    assert flex < 0.85 * rtn, (flex, rtn)


def test_adaround_training_beats_rtn_and_hardens():
    torch.manual_seed(0)
    x, w, y = _correlated_linear(seed=1)
    rtn = F.mse_loss(x @ RTNQuantizer(w, 4, 0, 1)().T, y).item()
    q = AdaRoundQuantizer(w, 4, 0, 1)
    # soft init reproduces W (h = fractional part) wherever the lp scale does not clip
    inside = (w / q.s).abs() <= 7
    assert inside.float().mean() > 0.9
    assert (q().detach() - w)[inside].abs().max() < 1e-6
    steps = 600
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    for i in range(steps):
        q.set_progress(i / steps)
        if i < 0.2 * steps:
            assert q.regularizer().item() == 0.0  # warm-up
        # AdaRound/BRECQ loss scale: squared error summed over features, averaged over the batch
        loss = ((x @ q().T - y) ** 2).sum(dim=1).mean() + q.regularizer()
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.set_progress(1.0)
    assert q.beta() == pytest.approx(2.0)
    h = q.h().detach()
    undecided = ((h > 0.05) & (h < 0.95)).float().mean().item()
    assert undecided < 0.03, undecided
    q.freeze()
    ada = F.mse_loss(x @ q().T, y).item()
    assert ada < 0.85 * rtn, (ada, rtn)
    assert q.regularizer().item() == 0.0


def test_adaround_beta_schedule():
    q = AdaRoundQuantizer(_weight((4, 6)), 4, 0, 1)
    q.set_progress(0.1)
    assert q.regularizer().item() == 0.0 and q.beta() == 20.0
    q.set_progress(0.6)
    assert q.beta() == pytest.approx(11.0)
    assert q.regularizer().item() > 0.0


def test_act_quantizer_forward_and_lsq_gradient():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 8, 5, 5, generator=g) * 3).requires_grad_(True)
    s = 0.02
    aq = ActQuantizer(s, 8)
    y = aq(x)
    st = torch.tensor(s, dtype=torch.float32)
    ref = torch.clamp(torch.round(x.detach() / st), -128, 127) * st
    assert torch.equal(y.detach(), ref)
    y.sum().backward()
    # LSQ: d/ds = round(x/s) - x/s inside the range, qmin/qmax where clipped, times 1/sqrt(numel*qmax)
    z = x.detach() / st
    inside = (z >= -128) & (z <= 127)
    expect = torch.where(inside, torch.round(z) - z, torch.clamp(torch.round(z), -128, 127)).sum()
    expect = expect / math.sqrt(x.numel() * 127)
    assert aq.step.grad is not None and aq.step.grad.abs() > 0
    # the sum cancels heavily (clipped +-128 terms), so compare against the magnitude of its terms
    mag = torch.where(inside, torch.round(z) - z, torch.clamp(torch.round(z), -128, 127)).abs().sum()
    assert (aq.step.grad - expect).abs() < 1e-4 * mag / math.sqrt(x.numel() * 127)
    # input gradient: straight through inside the range, zero where clipped
    assert torch.equal(x.grad, inside.float())
    assert aq.scale() == pytest.approx(s)


def test_act_quantizer_disabled_fixed_and_int16():
    x = torch.randn(100) * 4
    aq = ActQuantizer(0.1, 8, learn=False)
    assert not list(aq.parameters())
    aq.enabled = False
    assert aq(x) is x
    a16 = ActQuantizer(1e-3, 16)
    y = a16(x)
    ref = torch.clamp(torch.round(x / torch.tensor(1e-3)), -32768, 32767) * torch.tensor(1e-3)
    assert torch.equal(y.detach(), ref)
    with pytest.raises(ValueError):
        ActQuantizer(0.0, 8)
