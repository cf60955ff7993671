"""The reconstruction loop's options: S2's own learning rate and early stopping on held-out error."""
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
