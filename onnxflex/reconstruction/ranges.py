"""Each activation's range, chosen among calibrate's candidates by the region output error it causes.

The calibrate pass proposes candidates (minmax, MSE, percentiles, fractions of the max) from
activation statistics alone; which one is best depends on what the region does with the tensor, so
the choice is made here, with the region's RTN module, greedily in graph order.
"""
from __future__ import annotations

from .losses import region_mse


def choose_act_ranges(points: dict, act_quant: dict, module, streams, inputs: list, y_fp: dict,
                      samples: range, batch: int, device) -> dict:
    """Set each owned activation quantizer to its best candidate; return tensor -> chosen method."""
    chosen = {}
    for t, m in act_quant.items():  # greedy: each range given the ones chosen before it
        errs = {}
        for method, (scale, zp) in points[t].candidates.items():
            m.set_range(scale, zp)
            errs[method] = region_mse(module, streams, streams.q, inputs, y_fp, samples, batch, device)
        best = min(errs, key=errs.get)
        m.set_range(*points[t].candidates[best])
        chosen[t] = best
    return chosen
