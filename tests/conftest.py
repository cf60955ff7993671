"""Shared fixtures: tiny synthetic models (unit tests only) and the ../shared data folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IMAGENET = SHARED / "data" / "imagenet-sample"


def require_imagenet():
    if not (IMAGENET / "val" / "labels.csv").exists():
        pytest.skip(f"real ImageNet sample not found at {IMAGENET} (../shared beside the repo); CI always has it")
    return IMAGENET


class TinyResNet(torch.nn.Module):
    """Conv-BN-ReLU6 stem, a grouped conv, a residual block, a depthwise conv, GAP, Linear."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.grouped = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c1 = torch.nn.Conv2d(8, 16, 1)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c2 = torch.nn.Conv2d(16, 8, 1)
        self.fc = torch.nn.Linear(8, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            self.bn.running_mean.copy_(torch.randn(8, generator=g) * 0.1)
            self.bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)

    def forward(self, x):
        x = torch.nn.functional.relu6(self.bn(self.stem(x)))
        x = torch.relu(self.grouped(x))
        y = self.c2(torch.nn.functional.relu6(self.dw(torch.relu(self.c1(x)))))
        x = x + y
        return self.fc(x.mean(dim=(2, 3)))


def export(module, args, path, input_names, output_names, dynamic_axes=None):
    module.eval()
    torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                      dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)
    m = onnx.load(str(path))
    m.ir_version = 10
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one torch thread avoids oversubscription slowdowns on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_cnn(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny_cnn.onnx"
    return export(TinyResNet(), torch.zeros(1, 3, 16, 16), path, ["input"], ["logits"],
                  {"input": {0: "batch"}, "logits": {0: "batch"}})


@pytest.fixture(scope="session")
def tiny_calib():
    rng = np.random.default_rng(0)
    return rng.standard_normal((48, 3, 16, 16)).astype(np.float32)
