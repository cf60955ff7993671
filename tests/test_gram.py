"""The Gram-form loss must equal the direct MSE of the op (value and gradient), for every layout."""
import pytest
import torch
import torch.nn.functional as F

from onnxflex.quantizers.gram import GramStats, conv_gram, gram_loss, gram_mse, gram_sample_loss, linear_gram

CONV_CASES = {
    # name: (N, Cin, H, W, Cout, k, stride, padding(F.pad l,r,t,b or int), dilation, groups)
    "regular": (4, 8, 10, 10, 12, 3, 1, 1, 1, 1),
    "strided_padded_asym": (3, 6, 11, 9, 10, 3, 2, (0, 1, 1, 0), 1, 1),
    "grouped": (2, 8, 9, 9, 12, 3, 1, 1, 1, 4),
    "depthwise": (3, 16, 8, 8, 16, 3, 1, 1, 1, 16),
    "depthwise_mult2_strided": (2, 8, 9, 9, 16, 3, 2, 1, 1, 8),
    "dilated": (2, 5, 12, 12, 7, 3, 1, 2, 2, 1),
    "pointwise": (4, 16, 6, 6, 8, 1, 1, 0, 1, 1),
    "rect_kernel": (2, 4, 10, 8, 6, (3, 1), 1, (0, 0, 1, 1), 1, 1),
    "pointwise_strided": (3, 6, 9, 9, 5, 1, 2, 0, 1, 1),
    "dilated_strided": (2, 4, 13, 12, 6, 3, 2, 2, 2, 1),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def _perturb(w, gen):
    return (w + 0.05 * torch.randn(w.shape, generator=gen)).detach()


def _check(stats, direct_fn, w, w_hat):
    dW = (w_hat - w).clone().requires_grad_(True)
    gm = gram_mse(stats, dW)
    gm.backward()
    dW2 = (w_hat - w).clone().requires_grad_(True)
    dm = direct_fn(w + dW2)
    dm.backward()
    assert _rel(gm.detach(), dm.detach()) < 1e-5, (gm.item(), dm.item())
    assert _rel(dW.grad, dW2.grad) < 1e-4
    # the sum form is the mean times the element count
    assert _rel(gram_loss(stats, dW.detach()), dm.detach() * stats.count) < 1e-5
    assert _rel(gram_sample_loss(stats, dW.detach()), dm.detach() * stats.count / stats.samples) < 1e-5


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_gram_matches_direct(name):
    N, cin, H, W, cout, k, stride, pad, dil, g = CONV_CASES[name]
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    x_fp = torch.randn(N, cin, H, W, generator=gen)
    x_q = (x_fp / 0.1).round() * 0.1  # the inputs differ from the ones that made the target
    w = torch.randn(cout, cin // g, kh, kw, generator=gen) * 0.3
    b = torch.randn(cout, generator=gen)
    p4 = (pad,) * 4 if isinstance(pad, int) else pad

    def conv(x, ww, bb):
        return F.conv2d(F.pad(x, p4), ww, bb, stride=stride, dilation=dil, groups=g)

    y = conv(x_fp, w, b) + 0.01 * torch.randn(conv(x_fp, w, b).shape, generator=gen)
    stats = conv_gram(x_q, w, b, y, stride, pad, dil, g)
    K = cin // g * kh * kw
    assert stats.G.shape == (g, K, K) and stats.C.shape == (cout, K)
    assert stats.count == y.numel() and stats.samples == N
    _check(stats, lambda ww: F.mse_loss(conv(x_q, ww, b), y), w, _perturb(w, gen))


def test_conv_gram_symmetric_padding_pair_and_no_bias():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 9, 7, generator=gen)
    w = torch.randn(5, 4, 3, 5, generator=gen)
    y = F.conv2d(x, w, None, padding=(1, 2)) + 0.1
    stats = conv_gram(x, w, None, y, 1, (1, 2), 1, 1)
    _check(stats, lambda ww: F.mse_loss(F.conv2d(x, ww, None, padding=(1, 2)), y), w, _perturb(w, gen))


def test_conv1d_gram():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 20, generator=gen)
    w = torch.randn(8, 3, 5, generator=gen)
    b = torch.randn(8, generator=gen)

    def conv(xx, ww):
        return F.conv1d(F.pad(xx, (2, 1)), ww, b, stride=2, groups=2)

    y = conv(x, w) * 1.01
    stats = conv_gram(x, w, b, y, 2, (2, 1), 1, 2)
    _check(stats, lambda ww: F.mse_loss(conv(x, ww), y), w, _perturb(w, gen))


@pytest.mark.parametrize("shape", [(64, 24), (3, 7, 24)])
def test_linear_gram_matches_direct(shape):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=gen)
    w = torch.randn(10, 24, generator=gen) * 0.2  # [N, K] (Gemm transB=1 layout)
    b = torch.randn(10, generator=gen)
    y = F.linear(x + 0.05 * torch.randn(x.shape, generator=gen), w, b)
    stats = linear_gram(x, w, b, y)
    assert stats.G.shape == (1, 24, 24) and stats.C.shape == (10, 24)
    _check(stats, lambda ww: F.mse_loss(F.linear(x, ww, b), y), w, _perturb(w, gen))


def test_matmul_layout_weight():
    """MatMul B is [K, N]: the caller hands linear_gram its transpose and transposes dW likewise."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, 12, generator=gen)
    B = torch.randn(12, 20, generator=gen) * 0.3
    y = torch.matmul(x * 1.02, B)
    stats = linear_gram(x, B.T, None, y)
    B_hat = _perturb(B, gen)
    dB = (B_hat - B).clone().requires_grad_(True)
    gm = gram_mse(stats, dB.T)
    gm.backward()
    dB2 = (B_hat - B).clone().requires_grad_(True)
    dm = F.mse_loss(torch.matmul(x, B + dB2), y)
    dm.backward()
    assert _rel(gm.detach(), dm.detach()) < 1e-5
    assert _rel(dB.grad, dB2.grad) < 1e-4
    # the same weight handed over as it is, [K, N] with out_axis=1: no transpose, the same loss and gradient
    dB3 = (B_hat - B).clone().requires_grad_(True)
    g3 = gram_mse(stats, dB3, out_axis=1)
    g3.backward()
    assert _rel(g3.detach(), dm.detach()) < 1e-5
    assert _rel(dB3.grad, dB2.grad) < 1e-4


def test_merged_batches_and_float64_storage():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(6, 4, 3, 3, generator=gen)
    xs = [torch.randn(2, 4, 7, 7, generator=gen) for _ in range(3)]
    ys = [F.conv2d(x, w, padding=1) + 0.1 * torch.randn(2, 6, 7, 7, generator=gen) for x in xs]
    stats = [conv_gram(x, w, None, y, 1, 1, dtype=torch.float64) for x, y in zip(xs, ys)]
    merged = stats[0] + stats[1] + stats[2]
    assert isinstance(merged, GramStats) and merged.G.dtype == torch.float64
    assert merged.samples == 6 and merged.count == 6 * 6 * 7 * 7
    w_hat = _perturb(w, gen)
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    direct = F.mse_loss(F.conv2d(x_all.double(), w_hat.double(), padding=1), y_all.double())
    assert _rel(gram_mse(merged, w_hat - w), direct) < 1e-10


def test_chunked_accumulation(monkeypatch):
    """Tiny chunk budget forces the batch loop; the statistics must not change."""
    import onnxflex.quantizers.gram as gram

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 3, 8, 8, generator=gen)
    w = torch.randn(4, 3, 3, 3, generator=gen)
    y = F.conv2d(x, w, padding=1) + 1.0
    full = conv_gram(x, w, None, y, 1, 1)
    xl, wl = torch.randn(37, 9, generator=gen), torch.randn(5, 9, generator=gen)
    yl = xl @ wl.T + 0.5
    full_l = linear_gram(xl, wl, None, yl)
    monkeypatch.setattr(gram, "_CHUNK_BYTES", 1)
    small = conv_gram(x, w, None, y, 1, 1)
    small_l = linear_gram(xl, wl, None, yl)
    for a, b in ((full, small), (full_l, small_l)):
        assert torch.allclose(a.G, b.G, rtol=1e-6) and torch.allclose(a.C, b.C, rtol=1e-6, atol=1e-6)
        assert a.count == b.count and torch.allclose(a.r2, b.r2, rtol=1e-6)


@pytest.mark.parametrize("name", ["regular", "depthwise_mult2_strided", "strided_padded_asym"])
def test_bias_shift_is_the_mean_residual_and_the_best_bias(name):
    """bias_shift(stats, dW) equals the per-channel mean of Y - op(X, W + dW) - b, computed directly,
    and no other bias (a perturbed one, the original) gives a lower loss for that dW."""
    from onnxflex.quantizers.gram import bias_shift

    N, cin, H, W, cout, k, stride, pad, dil, g = CONV_CASES[name]
    gen = torch.Generator().manual_seed(11)
    x = torch.relu(torch.randn(N, cin, H, W, generator=gen)) + 0.5  # a mean the rounding error carries
    w = torch.randn(cout, cin // g, k, k, generator=gen) * 0.3
    b = torch.randn(cout, generator=gen)
    p4 = (pad,) * 4 if isinstance(pad, int) else pad

    def conv(ww, bb):
        return F.conv2d(F.pad(x, p4), ww, bb, stride=stride, dilation=dil, groups=g)

    y = conv(w, b) + 0.02 * torch.randn(conv(w, b).shape, generator=gen)
    stats = conv_gram(x, w, b, y, stride, pad, dil, g, dtype=torch.float64)
    w_hat = (w / 0.1).round() * 0.1 + 0.01  # rounding with a systematic error
    shift = bias_shift(stats, w_hat - w)
    direct = (y - conv(w_hat, b)).double().mean((0, 2, 3))
    assert _rel(shift, direct) < 1e-6
    best = F.mse_loss(conv(w_hat, b + shift.float()), y)
    assert best < F.mse_loss(conv(w_hat, b), y)
    for _ in range(3):
        other = b + shift.float() + 0.01 * torch.randn(cout, generator=gen)
        assert best < F.mse_loss(conv(w_hat, other), y)
    # a linear layer ([N, K] weight, rows of tokens), and merged mini-batches keep the sums
    xl = torch.randn(2, 30, 12, generator=gen) + 1.0
    wl, bl = torch.randn(7, 12, generator=gen), torch.randn(7, generator=gen)
    yl = F.linear(xl, wl, bl)
    st = linear_gram(xl[:1], wl, bl, yl[:1]) + linear_gram(xl[1:], wl, bl, yl[1:])
    wl_hat = wl + 0.05
    assert _rel(bias_shift(st, wl_hat - wl), (yl - F.linear(xl, wl_hat, bl)).double().mean((0, 1))) < 1e-5


def test_linear_gram_float32_statistics_without_a_residual_pass():
    """In float32 (what the reconstruct pass accumulates in) the statistics stay close to a float64
    residual's, with outlier channels, for large, small and zero residuals (the first quantized layer)."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(8192, 96, generator=gen)
    x[:, :3] *= 30  # the outlier channels of a decoder's activations
    x += 0.5
    w, b = torch.randn(40, 96, generator=gen) * 0.05, torch.randn(40, generator=gen)
    y = F.linear(x, w, b)
    for noise in (1e-1, 1e-3, 0.0):
        xq = x + noise * x.std() * torch.randn(x.shape, generator=gen)
        st = linear_gram(xq, w, b, y, accum_dtype=torch.float32)
        xd = xq.double()
        r = y.double() - F.linear(xd, w.double(), b.double())
        scale = (y.double().T @ xd).norm()
        assert (st.C.double() - r.T @ xd).norm() / scale < 1e-6, noise
        if noise:  # formed from R, C's error scales with R itself (the expansion YᵀX - W G measured 3e-2 at 1e-3)
            assert _rel(st.C.double(), r.T @ xd) < 2e-3, noise
        assert (st.G[0].double() - xd.T @ xd).norm() / (xd.T @ xd).norm() < 1e-5
        assert (st.r_sum.double() - r.sum(0)).norm() / y.double().abs().sum(0).norm() < 1e-5
        assert abs(st.r2.item() - (r * r).sum().item()) < 1e-5 * (y.double() ** 2).sum().item()
