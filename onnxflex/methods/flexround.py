"""FlexRound (Lee et al., ICML 2023): learned element-wise division, trained on the region output error."""
from . import Method

METHOD = Method("flexround", "onnxflex.quantizers.flexround:FlexRoundQuantizer", fit="adam", lr=lambda preset: preset["lr"],
                summary="learned element-wise division s1*S2*s3*s4 (Adam, cosine decay)")
