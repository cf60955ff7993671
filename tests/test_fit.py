"""The reconstruction loop's options (S2's own learning rate, early stopping on held-out error) and the
Gram statistics it trains on."""
import numpy as np
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
