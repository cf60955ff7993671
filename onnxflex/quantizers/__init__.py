"""Weight quantizers (RTN, FlexRound, AdaRound), activation fake quant (LSQ, QDrop) and the Gram-form loss.

All weight quantizers share :class:`WeightQuantizer`'s interface so the reconstruct pass and the
QDQ writer never need to know which method produced the integers and scales.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .activation import ActQuantizer, grad_scale, qdrop
from .adaround import AdaRoundQuantizer
from .flexround import FlexRoundQuantizer
from .gram import GramStats, conv_gram, gram_loss, gram_mse, gram_sample_loss, linear_gram
from .grid import (WeightQuantizer, act_qrange, init_weight_scale, quantize_weight, round_ste,
                   weight_qrange)
from .rtn import RTNQuantizer

WEIGHT_QUANTIZERS = {"rtn": RTNQuantizer, "flexround": FlexRoundQuantizer, "adaround": AdaRoundQuantizer}


def make_weight_quantizer(method: str, weight: Tensor, bits: int, out_axis: Optional[int], in_axis: Optional[int],
                          per_channel: bool = True, scale_method: str = "lp", **kwargs) -> WeightQuantizer:
    """Build the quantizer for ``method`` ("rtn" | "flexround" | "adaround"); extra kwargs go to its class."""
    try:
        cls = WEIGHT_QUANTIZERS[method]
    except KeyError:
        raise ValueError(f"unknown weight quantization method {method!r}; choose one of {', '.join(WEIGHT_QUANTIZERS)}") from None
    return cls(weight, bits, out_axis, in_axis, per_channel=per_channel, scale_method=scale_method, **kwargs)


__all__ = [
    "WeightQuantizer", "RTNQuantizer", "FlexRoundQuantizer", "AdaRoundQuantizer", "make_weight_quantizer",
    "WEIGHT_QUANTIZERS", "ActQuantizer", "grad_scale", "qdrop", "GramStats", "conv_gram", "linear_gram",
    "gram_loss", "gram_mse", "gram_sample_loss", "weight_qrange", "act_qrange", "round_ste", "init_weight_scale", "quantize_weight",
]
