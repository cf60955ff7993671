"""AdaRound (Nagel et al., 2020): learned up/down rounding with an annealed regulariser (baseline)."""
from . import Method

METHOD = Method("adaround", "onnxflex.quantizers.adaround:AdaRoundQuantizer", fit="adam", per_sample_loss=True,
                lr=lambda preset: preset["adaround_lr"], checkable=False,
                summary="learned rounding offsets h(V) with beta annealing (Adam)")
