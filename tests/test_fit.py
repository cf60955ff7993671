"""The reconstruction loop's options (S2's own learning rate, early stopping on held-out error) and the
Gram statistics it trains on."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onnxflex.methods import get_method
from onnxflex.quantizers import FlexRoundQuantizer
from onnxflex.reconstruction.fit import fit


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g)
    w = torch.randn(8, 16, generator=g) * 0.1
    return x, w, x @ w.T


def _train(q, x, y, **kw):
    fit([q], [], lambda it: F.mse_loss(x @ q().T, y), 60, 3e-3, 0.0, "t", False, **kw)


def test_element_lr_zero_freezes_s2_only():
    x, w, y = _problem()
    q = FlexRoundQuantizer(w, 4, 0, 1)
    _train(q, x, y, element_lr=0.0)
    assert torch.equal(q.log_S2.detach(), torch.zeros_like(w))  # S2 never moved
    assert not torch.equal(q.log_s1.detach(), q.log_s_init)  # s1 did
    q2 = FlexRoundQuantizer(w, 4, 0, 1)
    _train(q2, x, y)
    assert q2.log_S2.detach().abs().max() > 0  # the default shares --lr with S2


def test_early_stopping_keeps_the_best_checked_parameters():
    x, w, y = _problem()
    # a held-out error that only grows: the parameters at the start (RTN) are the best seen
    calls = []

    def worse():
        calls.append(1)
        return float(len(calls))

    q = FlexRoundQuantizer(w, 4, 0, 1)
    start = [p.detach().clone() for p in q.parameters()]
    _train(q, x, y, holdout=worse, checks=4)
    assert len(calls) == 5  # once at the start, then at each of the 4 checks
    assert all(torch.equal(p.detach(), s) for p, s in zip(q.parameters(), start))

    # a held-out error that only falls: the end of the schedule is kept, as without checks
    calls.clear()

    def better():
        calls.append(1)
        return -float(len(calls))

    q_checked, q_plain = FlexRoundQuantizer(w, 4, 0, 1), FlexRoundQuantizer(w, 4, 0, 1)
    _train(q_checked, x, y, holdout=better, checks=3)
    _train(q_plain, x, y)
    assert all(torch.equal(a, b) for a, b in zip(q_checked.parameters(), q_plain.parameters()))


def test_only_hard_rounding_methods_are_checked_mid_schedule():
    assert get_method("flexround").checkable
    assert not get_method("adaround").checkable  # its training forward is soft rounding


def test_presets_set_s2_rate_and_checks_and_flags_override_them():
    import pytest

    from onnxflex import QuantConfig
    from onnxflex.errors import OnnxflexError

    fast, default = QuantConfig(preset="fast").resolved(), QuantConfig(preset="default").resolved()
    assert (fast.element_lr_scale, fast.checks) == (1.0, 0)
    assert (default.element_lr_scale, default.checks) == (0.3, 10)
    mine = QuantConfig(preset="default", element_lr_scale=1.0, checks=0).resolved()
    assert (mine.element_lr_scale, mine.checks) == (1.0, 0)
    with pytest.raises(OnnxflexError, match="--checks"):
        QuantConfig(checks=-1).resolved()


class _Layout:
    def take(self, arr, idx):
        return arr[idx]


class _Streams:
    """The part of reconstruction.streams.Streams that gram_stats reads: two stores of one tensor."""

    def __init__(self, q, fp, n_train):
        self.q, self.fp, self.n_train, self.mask = {"x": q}, {"x": fp}, n_train, None

    def layout(self, name):
        return _Layout()

    def take(self, store, name, idx):
        return store[name][idx]

    def shuffled(self, rng, count, batch):
        order = rng.permutation(count)
        return [np.sort(order[s:s + batch]) for s in range(0, count, batch)]


def test_deployed_statistics_come_from_the_quantized_stream_alone():
    """gram_stats' second result (what GPTQ's candidate fits) equals the QDrop-free statistics, made in
    the same pass as the QDrop-mixed ones; the mixed ones differ from it."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxflex.graph import Graph
    from onnxflex.reconstruction.fit import gram_stats

    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 9, 9])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, 5, 5])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    graph = Graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    spec = graph.weighted_nodes()[0]
    fp = rng.standard_normal((20, 4, 9, 9)).astype(np.float32)
    q = fp + 0.1 * rng.standard_normal(fp.shape).astype(np.float32)
    y = torch.nn.functional.conv2d(torch.from_numpy(fp), torch.from_numpy(w), torch.from_numpy(b), stride=2, padding=1).numpy()
    streams = _Streams(q, fp, 16)

    def run(drop, deployed):
        return gram_stats(graph, spec, None, streams, y, 8, drop, np.random.default_rng(1),
                          torch.Generator().manual_seed(2), "cpu", deployed)

    mixed, total = run(0.5, True)
    plain, none = run(0.0, False)
    assert none is None and len(mixed) == len(plain) == 2
    want = sum(plain[1:], plain[0])
    for got, ref in ((total.G, want.G), (total.C, want.C), (total.r2, want.r2)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    assert total.count == want.count and total.samples == 16
    assert not torch.allclose(sum(mixed[1:], mixed[0]).G, want.G, rtol=1e-3)  # QDrop did mix the FP stream in
    _, same = run(0.0, True)  # no mixing: the deployed total is the sum of the training statistics
    torch.testing.assert_close(same.G, want.G)


def _conv_problem(kernel, pads, strides, seed=0):
    """A one-Conv graph on 10x10 inputs and its quantized / FP streams (the target is the FP output)."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxflex.graph import Graph

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((6, 4, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=pads, strides=strides)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 10, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    graph = Graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    fp = rng.standard_normal((16, 4, 10, 10)).astype(np.float32)
    q = fp + 0.1 * rng.standard_normal(fp.shape).astype(np.float32)
    y = F.conv2d(torch.from_numpy(fp), torch.from_numpy(w), torch.from_numpy(b), stride=strides,
                 padding=pads[:2]).numpy()
    return graph, graph.weighted_nodes()[0], _Streams(q, fp, 16), q, w, b, y


@pytest.mark.parametrize("kernel,pads,strides", [(1, [0, 0, 0, 0], [1, 1]), (3, [1, 1, 1, 1], [1, 1]),
                                                 (3, [1, 1, 1, 1], [2, 2])])
def test_gram_positions_read_every_kth_row_and_scale_the_sums_back(kernel, pads, strides):
    """With ``positions`` below a map's size, batch k's statistics are those of output rows k mod step,
    k mod step + step, ... times (rows / rows read): an estimate of the whole map's sums, and the batches
    between them read every row. A 1x1 conv takes its rows before the mixing (its own path)."""
    from onnxflex.quantizers.gram import conv_gram
    from onnxflex.reconstruction.fit import gram_stats, row_step

    graph, spec, streams, q, w, b, y = _conv_problem(kernel, pads, strides)
    ho = y.shape[2]
    n = 16  # fitted samples
    assert row_step(y.shape, 0, n) == 1 and row_step(y.shape, n * ho * ho, n) == 1 and row_step(y.shape, 1, n) == ho
    step = row_step(y.shape, n * ho * ho // 2, n)
    assert step == 2 and row_step(y.shape, n * ho * ho // 2, n // 2) == 1  # fewer samples: every row

    def run(positions):
        return gram_stats(graph, spec, None, streams, y, 4, 0.0, np.random.default_rng(1),
                          torch.Generator().manual_seed(2), "cpu", False, positions)[0]

    full, sub = run(0), run(n * ho * ho // 2)
    batches = _Streams(q, q, 16).shuffled(np.random.default_rng(1), 16, 4)
    tw, tb = torch.from_numpy(w), torch.from_numpy(b)
    for k, (idx, st) in enumerate(zip(batches, sub)):
        rows = list(range(k % step, ho, step))
        ref = conv_gram(torch.from_numpy(q[idx]), tw, tb, torch.from_numpy(y[idx]), strides, pads[0], 1, 1)
        part = conv_gram(torch.from_numpy(q[idx]), tw, tb, torch.from_numpy(y[idx]), strides, pads[0], 1, 1,
                         row_step=step, row_offset=k % step)
        torch.testing.assert_close(st.G, part.G)
        assert st.count == ref.count == full[k].count
        # the phases of one batch, each weighted by its share of the rows, add up to the whole map's sums
        shares = [len(range(o, ho, step)) / ho for o in range(step)]
        parts = [conv_gram(torch.from_numpy(q[idx]), tw, tb, torch.from_numpy(y[idx]), strides, pads[0], 1, 1,
                           row_step=step, row_offset=o) for o in range(step)]
        torch.testing.assert_close(sum(p.G * f for p, f in zip(parts, shares)), ref.G, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(sum(p.C * f for p, f in zip(parts, shares)), ref.C, rtol=1e-5, atol=1e-3)
        assert not torch.allclose(st.G, ref.G, rtol=1e-2)  # a real subset
        # the rows read, summed unscaled, are exactly the direct statistics of those rows
        yrows = torch.from_numpy(y[idx])[:, :, rows]
        direct = F.conv2d(torch.from_numpy(q[idx]), tw, tb, stride=strides, padding=pads[0])[:, :, rows]
        r2 = ((yrows - direct) ** 2).sum()
        torch.testing.assert_close(st.r2 * len(rows) / ho, r2, rtol=1e-4, atol=1e-4)
    # every row is read by some batch: the phases alternate
    assert {k % step for k in range(len(batches))} == set(range(step))


def test_depthwise_statistics_in_one_product_match_the_general_path():
    """A depthwise conv's G, C and ||R||² come out of one product (R as an extra tap); the grouped path
    (two channels per group) must agree with it on the same channels."""
    from onnxflex.quantizers.gram import conv_gram

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 9, 9, generator=g)
    w = torch.randn(6, 1, 3, 3, generator=g)
    b = torch.randn(6, generator=g)
    y = F.conv2d(x + 0.1 * torch.randn(x.shape, generator=g), w, b, padding=1, groups=6)
    dw = conv_gram(x, w, b, y, 1, 1, 1, 6)
    # the same channels as six one-channel convs, each through the regular path
    for c in range(6):
        one = conv_gram(x[:, c:c + 1], w[c:c + 1], b[c:c + 1], y[:, c:c + 1], 1, 1, 1, 1)
        torch.testing.assert_close(dw.G[c], one.G[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(dw.C[c], one.C[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(dw.x_sum[c], one.x_sum[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dw.r2, ((F.conv2d(x, w, b, padding=1, groups=6) - y) ** 2).sum(), rtol=1e-5, atol=1e-4)
    assert conv_gram(x, w, b, y, 1, 1, 1, 6, sums=False).x_sum is None


def test_drop_mask_draws_each_element_with_probability_p():
    from onnxflex.reconstruction.fit import drop_mask, mix

    shape = (7, 3, 101, 13)  # an element count that is not a multiple of 8
    for p in (0.5, 0.25, 0.9):
        m = drop_mask(shape, p, torch.Generator().manual_seed(0), "cpu")
        assert m.dtype == torch.bool and m.shape == shape
        assert abs(float(m.float().mean()) - p) < 0.01
        assert torch.equal(m, drop_mask(shape, p, torch.Generator().manual_seed(0), "cpu"))  # the seed decides it
    a = drop_mask(shape, 0.5, torch.Generator().manual_seed(0), "cpu")
    assert not torch.equal(a, drop_mask(shape, 0.5, torch.Generator().manual_seed(1), "cpu"))
    # neighbouring elements are independent: a byte per element, not one draw per 64-bit word
    flat = a.reshape(-1)[: a.numel() // 8 * 8].reshape(-1, 8).float()
    assert abs(float((flat[:, 0] == flat[:, 1]).float().mean()) - 0.5) < 0.02
    q, f = torch.zeros(shape), torch.ones(shape)
    mixed = mix(q, f, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(mixed.bool(), a)  # FP where the mask drops, the quantized stream elsewhere
    assert mix(q, f, 0.001, None) is q and mix(q, f, 0.999, None) is f  # p on the 1/256 grid: none / all


def test_negative_gram_positions_is_a_user_error():
    from onnxflex.config import QuantConfig
    from onnxflex.errors import OnnxflexError

    assert QuantConfig(gram_positions=0).resolved().gram_positions == 0
    with pytest.raises(OnnxflexError, match="--gram-positions"):
        QuantConfig(gram_positions=-1).resolved()
