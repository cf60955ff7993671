"""The one masked squared error behind every reconstruction loss and every region judgement."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..runtime.memory import trim
from .streams import to_torch

FLOAT_TYPES = (np.float32, np.float16, np.float64)


def token_weights(mask: Optional[torch.Tensor], out: torch.Tensor) -> Optional[torch.Tensor]:
    """The token mask broadcast over ``out`` when ``out`` is laid out [batch, seq, ...]; else None.
    Padded positions carry no meaning, so they are left out of every reconstruction loss."""
    if mask is None or out.dim() < 2 or tuple(out.shape[:2]) != tuple(mask.shape):
        return None
    return mask.reshape(tuple(mask.shape) + (1,) * (out.dim() - 2)).to(out.dtype)


def squared_error(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor], dtype=None):
    """(sum of squared errors over the counted positions, number of counted elements)."""
    d = (pred.float() - target.float()) ** 2
    w = token_weights(mask, d)
    if w is None:
        return d.sum(dtype=dtype), float(d.numel())
    return (d * w).sum(dtype=dtype), float(w.sum()) * (d[0, 0].numel())


def data_loss(pred, target, mask=None, per_sample: bool = False):
    """Training loss: the MSE over counted positions, or (AdaRound, whose regulariser weight lambda
    0.01 is tuned for it) the squared error summed per sample and averaged over samples."""
    err, count = squared_error(pred, target, mask)
    return err / pred.shape[0] if per_sample else err / max(count, 1.0)


@torch.no_grad()
def region_mse(module, streams, store, inputs: list, targets: dict, samples: range, batch: int, device) -> float:
    """Mean over the region's float outputs of the output MSE on ``samples`` (streamed)."""
    names = [o for o, t in targets.items() if t.dtype in FLOAT_TYPES]
    if not names:
        return 0.0
    sq = {o: 0.0 for o in names}
    count = {o: 0.0 for o in names}
    for s, e in streams.spans(samples, batch):
        outs = module(*[to_torch(x, device) for x in streams.feed(store, inputs, s, e)])
        mask = None if streams.mask is None else to_torch(streams.mask[s:e], device)
        for o in names:
            target = streams.layout(o).slice(targets[o], s, e)
            err, c = squared_error(outs[o], to_torch(target, device), mask, dtype=torch.float64)
            sq[o] += float(err)
            count[o] += c
    trim()  # the batches' buffers would stay in the heap (runtime/memory.py)
    return float(np.mean([sq[o] / max(count[o], 1.0) for o in names]))
