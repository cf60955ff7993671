"""GPTQ on the Gram statistics: beats RTN on correlated inputs, stays on the grid, reduces to RTN when
nothing can be compensated, handles groups, input-error correction and dead inputs."""
import pytest
import torch
import torch.nn.functional as F

from onnxflex.quantizers.gptq import GPTQQuantizer, gptq_integers
from onnxflex.quantizers.gram import GramStats, conv_gram, gram_mse, linear_gram
from onnxflex.quantizers.rtn import RTNQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _correlated(m, k, gen):
    """Rows of Z @ A: inputs with a random, strongly non-diagonal covariance."""
    return torch.randn(m, k, generator=gen) @ (torch.randn(k, k, generator=gen) / k ** 0.5)


def _linear_case(seed=0, K=64, N=32, M=2048):
    gen = _gen(seed)
    x = _correlated(M, K, gen)
    w = torch.randn(N, K, generator=gen) * 0.1
    b = torch.randn(N, generator=gen)
    return x, w, b, F.linear(x, w, b)


def _smooth_images(n, c, hw, gen):
    """Spatially smooth, channel-mixed feature maps (image-like correlations between patch entries)."""
    z = torch.randn(n, c, hw + 2, hw + 2, generator=gen)
    z = F.avg_pool2d(z, 3, stride=1)
    return torch.einsum("nchw,cd->ndhw", z, torch.randn(c, c, generator=gen) / c ** 0.5 + torch.eye(c))


def _ratio(stats, w, gptq, rtn):
    return gram_mse(stats, gptq() - w).item() / gram_mse(stats, rtn() - w).item()


@pytest.mark.parametrize("bits", [4, 8])
def test_linear_beats_rtn(bits):
    x, w, b, y = _linear_case()
    st = linear_gram(x, w, b, y)
    rtn = RTNQuantizer(w, bits, 0, 1)
    q = GPTQQuantizer(w, bits, 0, 1).solve(st)
    assert torch.equal(q.scale(), rtn.scale())  # same grid, only the integers differ
    ratio = _ratio(st, w, q, rtn)
    print(f"linear {bits}-bit GPTQ/RTN loss ratio {ratio:.3f}")
    assert ratio < 0.8


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,out_axis,in_axis", [((8, 4, 3, 3), 0, 1), ((6, 1, 3, 3), 0, 1),
                                                     ((10, 12), 0, 1), ((12, 10), 1, 0)])
def test_on_grid_and_exact_dequant(bits, shape, out_axis, in_axis):
    gen = _gen(1)
    w = torch.randn(shape, generator=gen) * 0.2
    q = GPTQQuantizer(w, bits, out_axis, in_axis)
    w2d = q.out_by_in(w)
    cout, K = w2d.shape
    groups = cout if shape[1] == 1 and len(shape) == 4 else 1
    x = _correlated(256, K * groups, gen).reshape(256, groups, K).transpose(0, 1)  # [g, M, K]
    G = torch.bmm(x.transpose(1, 2), x)
    q.solve(GramStats(G, torch.zeros(cout, K), torch.zeros(()), 256 * cout, 256))
    ints = q.integers()
    assert ints.dtype == torch.int32 and ints.shape == w.shape
    assert int(ints.min()) >= q.qmin and int(ints.max()) <= q.qmax
    assert torch.equal(q(), q.deployed_weight())
    assert torch.equal(q(), q.s * ints.to(torch.float32))
    assert list(q.parameters()) == []
    assert torch.equal(q.from_out_by_in(w2d), w)


@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_is_rtn(act_order):
    gen = _gen(2)
    w = torch.randn(24, 40, generator=gen) * 0.3
    rtn = RTNQuantizer(w, 4, 0, 1)
    ints = gptq_integers(w, torch.eye(40), rtn.scale(), rtn.qmin, rtn.qmax, act_order=act_order, block=16)
    assert torch.equal(ints, rtn.integers())
    # a diagonal (non-identity) H decouples the columns just the same
    ints = gptq_integers(w, torch.diag(torch.rand(40, generator=gen) + 0.1), rtn.scale(), rtn.qmin, rtn.qmax,
                         act_order=act_order, block=16)
    assert torch.equal(ints, rtn.integers())
    assert torch.equal(GPTQQuantizer(w, 4, 0, 1).integers(), rtn.integers())  # before solve: RTN


def test_block_size_does_not_change_the_result():
    """Lazy block updates are a reordering of the same arithmetic (float64 to make it exact enough)."""
    x, w, b, y = _linear_case(seed=3, K=48, N=16, M=512)
    st = linear_gram(x.double(), w.double(), b.double(), y.double(), dtype=torch.float64)
    s = RTNQuantizer(w, 4, 0, 1).scale().double()
    ref = gptq_integers(w.double(), st.G, s, -7, 7, block=1)
    for blk in (5, 16, 48, 128):
        assert torch.equal(gptq_integers(w.double(), st.G, s, -7, 7, block=blk), ref)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cin,cout,groups", [(8, 16, 1), (16, 16, 16), (8, 12, 2)])
def test_conv_beats_rtn(bits, cin, cout, groups):
    gen = _gen(4)
    x = _smooth_images(16, cin, 10, gen)
    w = torch.randn(cout, cin // groups, 3, 3, generator=gen) * 0.2
    b = torch.randn(cout, generator=gen)
    y = F.conv2d(x, w, b, padding=1, groups=groups)
    st = conv_gram(x, w, b, y, padding=1, groups=groups)
    assert st.groups == groups
    rtn = RTNQuantizer(w, bits, 0, 1)
    q = GPTQQuantizer(w, bits, 0, 1).solve(st)
    ratio = _ratio(st, w, q, rtn)
    print(f"conv cin={cin} cout={cout} g={groups} {bits}-bit GPTQ/RTN loss ratio {ratio:.3f}")
    assert ratio < 0.8
    # the gram loss is the true conv loss: check GPTQ's win directly too
    direct = F.mse_loss(F.conv2d(x, q(), b, padding=1, groups=groups), y)
    assert abs(direct.item() - gram_mse(st, q() - w).item()) < 1e-4 * direct.item() + 1e-9


def test_grouped_equals_per_group_gptq():
    """The batched grouped solve is exactly GPTQ run on each group on its own."""
    gen = _gen(5)
    x = _smooth_images(8, 6, 8, gen)
    w = torch.randn(12, 2, 3, 3, generator=gen) * 0.2
    y = F.conv2d(x, w, None, padding=1, groups=3) + 0.05 * torch.randn(8, 12, 8, 8, generator=gen)
    st = conv_gram(x, w, None, y, padding=1, groups=3)
    s = RTNQuantizer(w, 4, 0, 1).scale()
    w2d = w.reshape(12, -1)
    both = gptq_integers(w2d, st.G, s, -7, 7, correction=st.C)
    for j in range(3):
        rows = slice(4 * j, 4 * j + 4)
        alone = gptq_integers(w2d[rows], st.G[j], s[rows], -7, 7, correction=st.C[rows])
        assert torch.equal(both[rows], alone)


@pytest.mark.parametrize("bits", [4, 8])
def test_input_error_correction(bits):
    """Quantized inputs, float target: quantizing around W* = W + C G^-1 lowers the true loss."""
    gen = _gen(6)
    x_fp, w, b, y = _linear_case(seed=6)
    x_q = x_fp + 0.1 * x_fp.std() * torch.randn(x_fp.shape, generator=gen)
    st = linear_gram(x_q, w, b, y)
    assert st.C.abs().max() > 0
    plain = GPTQQuantizer(w, bits, 0, 1).solve(st, correct_inputs=False)
    corr = GPTQQuantizer(w, bits, 0, 1).solve(st)
    rtn = RTNQuantizer(w, bits, 0, 1)

    def true_loss(qz):
        return F.mse_loss(F.linear(x_q, qz(), b), y).item()

    lp, lc, lr = true_loss(plain), true_loss(corr), true_loss(rtn)
    print(f"{bits}-bit true loss: rtn {lr:.4g} gptq {lp:.4g} gptq+C {lc:.4g} (ratio C/plain {lc / lp:.3f})")
    assert lc < 0.8 * lp
    assert abs(lc - gram_mse(st, corr() - w).item()) < 1e-4 * lc


def test_dead_input_column():
    x, w, b, _ = _linear_case(seed=7)
    x[:, [3, 17]] = 0.0
    y = F.linear(x, w, b)
    st = linear_gram(x, w, b, y)
    assert st.G[0, 3, 3] == 0
    rtn = RTNQuantizer(w, 4, 0, 1)
    q = GPTQQuantizer(w, 4, 0, 1).solve(st)
    assert torch.isfinite(q()).all()
    assert torch.equal(q.integers()[:, [3, 17]], rtn.integers()[:, [3, 17]])  # kept, not zeroed
    assert _ratio(st, w, q, rtn) < 0.8
    # a fully dead group of a depthwise conv
    gen = _gen(8)
    xc = _smooth_images(4, 4, 6, gen)
    xc[:, 1] = 0.0
    wc = torch.randn(4, 1, 3, 3, generator=gen)
    stc = conv_gram(xc, wc, None, F.conv2d(xc, wc, None, padding=1, groups=4), padding=1, groups=4)
    qc = GPTQQuantizer(wc, 4, 0, 1).solve(stc)
    assert torch.isfinite(qc()).all()
    assert torch.equal(qc.integers()[1], RTNQuantizer(wc, 4, 0, 1).integers()[1])


def test_matmul_layout_and_merged_stats():
    """MatMul weight [K, N] (out_axis 1) is transposed to [N, K] and back; stats from two batches add up."""
    x, w, b, y = _linear_case(seed=9, K=32, N=20, M=1024)
    gen = _gen(9)
    xq = x + 0.05 * torch.randn(x.shape, generator=gen)
    st = linear_gram(xq[:512], w, b, y[:512]) + linear_gram(xq[512:], w, b, y[512:])
    q = GPTQQuantizer(w.t().contiguous(), 4, 1, 0).solve(st)
    s = RTNQuantizer(w, 4, 0, 1).scale()
    assert torch.equal(q.scale(), s)
    ref = gptq_integers(w, st.G, s, -7, 7, correction=st.C)
    assert torch.equal(q.integers(), ref.t())
    with pytest.raises(ValueError):
        GPTQQuantizer(w, 4, 1, 0).solve(st)  # wrong layout for these stats


@pytest.mark.parametrize("grid", ["signed", "asymmetric"])
def test_blockwise_gptq_keeps_each_blocks_grid_and_beats_rtn(grid):
    """Static groups: the block scales (and zero points) are RTN's, fixed before the sweep; GPTQ only
    picks integers inside each block's [qmin, qmax]. Identity H gives RTN's integers exactly."""
    x, w, b, y = _linear_case(K=96, N=16)
    wt = w.T.contiguous()  # MatMul layout [K, N]: out axis 1, in axis 0
    st = linear_gram(x, w, b, y)
    rtn = RTNQuantizer(wt, 4, 1, 0, block_size=32, grid=grid)
    q = GPTQQuantizer(wt, 4, 1, 0, block_size=32, grid=grid).solve(st)
    assert torch.equal(q.scale(), rtn.scale()) and torch.equal(q.zero_point(), rtn.zero_point())
    ints = q.integers()
    assert bool((ints >= q.qmin).all()) and bool((ints <= q.qmax).all())
    assert torch.equal(q(), q.deployed_weight())
    assert gram_mse(st, (q() - wt).T).item() < 0.8 * gram_mse(st, (rtn() - wt).T).item()
    eye = GramStats(torch.eye(96).unsqueeze(0), torch.zeros(16, 96), torch.zeros(()), 16 * 96)
    assert torch.equal(GPTQQuantizer(wt, 4, 1, 0, block_size=32, grid=grid).solve(eye, correct_inputs=False).integers(),
                       rtn.integers())


@pytest.mark.parametrize("groups", [1, 4])
def test_grid_search_keeps_each_rows_best_ratio(groups):
    """Rows are independent GPTQ problems on one H: the searched solve equals, row by row, a plain solve on
    that row's chosen grid, and no row's true loss is above its ratio-1 loss."""
    gen = _gen(11)
    cin, cout = 8, 8
    x_fp = _smooth_images(6, cin, 10, gen)
    x_q = x_fp + 0.05 * x_fp.std() * torch.randn(x_fp.shape, generator=gen)
    w = torch.randn(cout, cin // groups, 3, 3, generator=gen) * 0.3
    b = torch.randn(cout, generator=gen)
    y = F.conv2d(x_fp, w, b, padding=1, groups=groups)
    st = conv_gram(x_q, w, b, y, padding=(1, 1, 1, 1), groups=groups)
    ratios = (1.0, 0.8, 0.9, 1.1)
    searched = GPTQQuantizer(w, 3, 0, 1).solve(st, ratios=ratios)
    chosen = (searched.scale() / searched.s_base.reshape(-1))
    assert all(min(abs(c - r) for r in ratios) < 1e-6 for c in chosen.tolist())
    assert (chosen != 1).any()  # the search moved some grid (else this test checks nothing)

    def row_losses(q):
        d = (q() - w).reshape(cout, -1).double()
        G = st.G.double().repeat_interleave(cout // st.G.shape[0], dim=0)
        return torch.einsum("ok,okl,ol->o", d, G, d) - 2 * (d * st.C.double()).sum(1)

    plain = GPTQQuantizer(w, 3, 0, 1).solve(st)
    assert torch.all(row_losses(searched) <= row_losses(plain) + 1e-6 * row_losses(plain).abs().max())
    for r in ratios:
        one = GPTQQuantizer(w, 3, 0, 1)
        one.s_base.mul_(r)
        one.solve(st)
        rows = torch.isclose(chosen, torch.tensor(r), atol=1e-6)
        assert torch.equal(one.integers().reshape(cout, -1)[rows], searched.integers().reshape(cout, -1)[rows])
    # re-solving starts from the initial grid again, not from the last search's
    again = searched.solve(st, ratios=ratios)
    assert torch.equal(again.scale(), searched.scale())
    assert torch.equal(GPTQQuantizer(w, 3, 0, 1).solve(st).scale(), GPTQQuantizer(w, 3, 0, 1).scale())


def test_damping_is_a_ridge_towards_rtn():
    """--gptq-damp adds damp * mean(diag G) to G's diagonal: GPTQ's usual 0.01 moves integers away from RTN's,
    a huge damping leaves nothing to compensate and gives RTN's integers (the correction shift vanishes too)."""
    x, w, b, y = _linear_case(seed=3)
    st = linear_gram(x + 0.05 * torch.randn(x.shape, generator=_gen(4)), w, b, y)  # quantized-looking inputs
    rtn = RTNQuantizer(w, 4, 0, 1)
    usual = GPTQQuantizer(w, 4, 0, 1).solve(st, 0.01)
    assert not torch.equal(usual.integers(), rtn.integers())
    assert torch.equal(GPTQQuantizer(w, 4, 0, 1).solve(st, 1e6).integers(), rtn.integers())
    mid = GPTQQuantizer(w, 4, 0, 1).solve(st, 1.0)

    def moved(q):
        return int((q.integers() != rtn.integers()).sum())

    assert 0 < moved(mid) < moved(usual)


def test_gptq_damp_must_be_positive():
    from onnxflex.config import QuantConfig
    from onnxflex.errors import OnnxflexError

    assert QuantConfig(gptq_damp=0.1).resolved().gptq_damp == 0.1
    with pytest.raises(OnnxflexError, match="--gptq-damp"):
        QuantConfig(gptq_damp=0).resolved()
