"""GPTQ (Frantar et al., 2022): closed-form sequential rounding with error feedback through X^T X.

Solved once per weight on the Gram statistics the reconstruct pass already accumulates, so it
needs one-op (layer) regions; no iterations, no learning rate.
"""
from . import Method

METHOD = Method("gptq", "onnxflex.quantizers.gptq:GPTQQuantizer", fit="solve", learns_act_steps=False, region_mode="layer",
                summary="closed-form GPTQ on the layer's Gram statistics (one solve per weight)")
