"""Weight quantizers (RTN, FlexRound, AdaRound, GPTQ), activation fake quant (LSQ) and the Gram-form loss.

All weight quantizers share :class:`WeightQuantizer`'s interface so the reconstruct pass and the
QDQ writer never need to know which method produced the integers and scales. Which quantizer a
method uses, and how it is fitted, is the method's entry in onnxflex/methods/.
"""
from __future__ import annotations

from .activation import ActQuantizer, grad_scale
from .adaround import AdaRoundQuantizer
from .flexround import FlexRoundQuantizer
from .gptq import GPTQQuantizer
from .gram import GramStats, conv_gram, gram_loss, gram_mse, gram_sample_loss, linear_gram
from .grid import (WeightQuantizer, act_qrange, init_weight_scale, init_weight_zero_scale, quantize_weight,
                   round_ste, weight_qrange)
from .rtn import RTNQuantizer

__all__ = [
    "WeightQuantizer", "RTNQuantizer", "FlexRoundQuantizer", "AdaRoundQuantizer", "GPTQQuantizer",
    "ActQuantizer", "grad_scale", "GramStats", "conv_gram", "linear_gram",
    "gram_loss", "gram_mse", "gram_sample_loss", "weight_qrange", "act_qrange", "round_ste", "init_weight_scale",
    "init_weight_zero_scale", "quantize_weight",
]
