"""ORT session factory, metrics against hand values, and evaluate() on a model whose answers are known."""
from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnxflex.errors import OnnxflexError
from onnxflex.runtime import metrics, session as S
from onnxflex.runtime.evaluate import EvalReport, evaluate


def _relu_model(shape=("n", 3)) -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 14  # what onnx >= 1.20 writes by default
    return m


def _classifier(hw=(8, 8), classes=6) -> onnx.ModelProto:
    """GlobalAveragePool -> Flatten -> Gemm: logit c = mean of channel c (c < 3); classes 3.. get -10.

    So a solid red/green/blue image is classified 0/1/2, whatever the preprocessing's mean/std."""
    w = np.zeros((classes, 3), np.float32)
    w[:3, :3] = np.eye(3)
    b = np.zeros(classes, np.float32)
    b[3:] = -10
    g = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["images"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "W", "B"], ["logits"], transB=1),
        ],
        "cls",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, *hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])  # IR 14: exercises the fix


COLORS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}


def _image_folder(tmp_path: Path) -> Path:
    """6 solid images (2 per colour, one in a subfolder); one red image deliberately labelled 1."""
    d = tmp_path / "val"
    (d / "sub").mkdir(parents=True)
    rows = []
    for i, c in enumerate([0, 0, 1, 1, 2, 2]):
        rel = f"sub/{c}_{i}.png" if i == 5 else f"{c}_{i}.png"
        Image.new("RGB", (10, 9), COLORS[c]).save(d / rel)
        rows.append((rel, 1 if i == 0 else c))
    with open(d / "labels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["file", "class_index", "wnid", "name"])
        for rel, c in rows:
            wr.writerow([rel, c, "n0", "x"])
    return d


# ---------------------------------------------------------------- session
def test_max_ir_version_and_fix():
    assert S.ORT_MAX_IR_VERSION >= 10
    m = _relu_model()
    with pytest.raises(Exception, match="IR version"):
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    S.fix_ir_version(m)
    assert m.ir_version == S.ORT_MAX_IR_VERSION
    ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def test_make_session_from_proto_bytes_and_path(tmp_path):
    m = _relu_model()
    s = S.make_session(m, threads=1)
    assert m.ir_version == 14  # caller's proto untouched
    assert S.input_specs(s) == {"x": (["n", 3], np.dtype(np.float32))}
    S.make_session(m.SerializeToString())
    onnx.save(m, tmp_path / "m.onnx")
    s = S.make_session(tmp_path / "m.onnx", providers="cpu")
    out = S.run_batched(s, [{"x": np.array([[1, -1, 2]], np.float32)}, {"x": -np.ones((2, 3), np.float32)}])
    np.testing.assert_array_equal(out["y"], [[1, 0, 2], [0, 0, 0], [0, 0, 0]])


def test_large_proto_goes_through_temp_file(monkeypatch):
    # pretend the proto is over 2 GB but below the weightless threshold (a graph of small constants)
    monkeypatch.setattr(S, "fits_in_protobuf", lambda m, limit=None: limit is not None)
    s = S.make_session(_classifier())
    assert S.run_batched(s, [{"images": np.ones((1, 3, 8, 8), np.float32)}])["logits"].shape == (1, 6)


def test_big_proto_session_shares_its_weights_instead_of_serialising_them(monkeypatch):
    """Above WEIGHTLESS_ABOVE_BYTES a ModelProto is served weightless: same outputs, the large
    initializers handed to onnxruntime as OrtValues, the caller's proto untouched."""
    model = _classifier()
    feed = [{"images": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}]
    want = S.run_batched(S.make_session(model), feed)["logits"]
    before = model.SerializeToString()
    monkeypatch.setattr(S, "WEIGHTLESS_ABOVE_BYTES", 0)
    monkeypatch.setattr("onnxflex.onnx_facts.WEIGHT_MIN_BYTES", 0)
    s = S.make_session(model)
    assert s._onnxflex_weights and set(s._onnxflex_weights) <= {t.name for t in model.graph.initializer}
    np.testing.assert_array_equal(S.run_batched(s, feed)["logits"], want)
    assert model.SerializeToString() == before


def test_make_session_errors(tmp_path):
    with pytest.raises(OnnxflexError, match="cannot load"):
        S.make_session(b"\x08\x07 this is not an onnx model")
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(OnnxflexError, match="bad.onnx"):
        S.make_session(tmp_path / "bad.onnx")
    with pytest.raises(OnnxflexError, match="does not exist"):
        S.make_session(tmp_path / "missing.onnx")
    with pytest.raises(OnnxflexError, match="unknown execution provider"):
        S.make_session(_relu_model(), providers=("tpu",))
    s = S.make_session(_relu_model())
    with pytest.raises(OnnxflexError, match="rejected the inputs"):
        S.run_batched(s, [{"x": np.ones((1, 4), np.float32)}])
    with pytest.raises(OnnxflexError, match="no output"):
        S.run_batched(s, [], output_names=["z"])


@pytest.mark.skipif("cuda" in S.available_providers(), reason="CUDA works here; the fallback path is not taken")
def test_cuda_requested_but_absent_falls_back_to_cpu():
    S._warned.discard("CUDAExecutionProvider")
    with pytest.warns(UserWarning, match="cuda was requested"):
        s = S.make_session(_relu_model(), providers=("cuda", "cpu"))
    assert s.get_providers() == ["CPUExecutionProvider"]
    assert S.available_providers()[-1] == "cpu"


# ---------------------------------------------------------------- metrics
def test_topk_and_agreement():
    logits = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]])
    labels = np.array([1, 1, 0, 1])
    # top-1 preds 1, 0, 2, 0 (tie -> lower index): correct only row 0
    assert metrics.topk_accuracy(logits, labels, 1) == pytest.approx(0.25)
    # top-2 sets {1,2}, {0,1}, {2,1}, {0,1}: rows 0, 1, 3 correct
    assert metrics.topk_accuracy(logits, labels, 2) == pytest.approx(0.75)
    assert metrics.topk_accuracy(logits, labels, 5) == 1.0
    other = np.array([[0, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], float)
    assert metrics.top1_agreement(logits, other) == pytest.approx(0.75)


def test_sqnr_cosine_kl_hand_values():
    ref = np.array([[3.0, 4.0]])
    assert metrics.sqnr_db(ref, np.array([[3.0, 3.0]])) == pytest.approx(10 * math.log10(25 / 1))
    assert metrics.sqnr_db(ref, ref) == math.inf
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0]])
    assert metrics.cosine_similarity(a, b) == pytest.approx(0.5)  # rows: 0 and 1
    assert metrics.cosine_similarity(np.zeros((1, 3)), np.zeros((1, 3))) == 1.0
    p = np.log(np.array([[0.5, 0.5]]))
    q = np.log(np.array([[0.25, 0.75]])) + 7.0  # logits: a constant shift must not matter
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert metrics.kl_divergence(p, q) == pytest.approx(want)
    assert metrics.kl_divergence(q, q) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- evaluate
def test_evaluate_folder_top1_and_self_reference(tmp_path):
    d = _image_folder(tmp_path)
    onnx.save(_classifier(), tmp_path / "cls.onnx")
    model = tmp_path / "cls.onnx"
    r = evaluate(model, d, ref=model, batch_size=4)
    assert isinstance(r, EvalReport) and r.num_samples == 6 and r.kind == "classifier"
    assert r.top1 == pytest.approx(5 / 6)  # the mislabelled red image is the only miss
    assert r.top5 == 1.0  # its label (class 1) is second-best
    assert r.agreement == 1.0 and r.sqnr_db == math.inf and r.cosine == pytest.approx(1.0) and r.kl == pytest.approx(0.0, abs=1e-9)
    assert r.latency_ms is not None and r.latency_ms > 0
    assert r.to_dict()["sqnr_db"] == "inf"
    table = r.format_table()
    assert "top-1" in table and "83.33 %" in table and "inf dB" in table


def test_evaluate_limit_and_labels_errors(tmp_path):
    d = _image_folder(tmp_path)
    m = _classifier()
    r = evaluate(m, d, limit=2)  # sorted: 0_0.png (mislabelled), 0_1.png
    assert r.num_samples == 2 and r.top1 == pytest.approx(0.5) and r.agreement is None
    bad = tmp_path / "bad.csv"
    bad.write_text("filename,label\na.png,1\n")
    with pytest.raises(OnnxflexError, match="no column file, class_index"):
        evaluate(m, d, labels=bad)
    with pytest.raises(OnnxflexError, match="does not exist"):
        evaluate(m, d, labels=tmp_path / "nope.csv")
    partial = tmp_path / "partial.csv"
    partial.write_text("file,class_index\n0_0.png,0\n")
    with pytest.raises(OnnxflexError, match="no row in"):
        evaluate(m, d, labels=partial)


def test_evaluate_npy_and_embedding(tmp_path):
    m = _classifier()
    x = np.zeros((4, 3, 8, 8), np.float32)
    for i, c in enumerate([0, 1, 2, 2]):
        x[i, c] = 1.0
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.array([0, 1, 2, 0]))
    r = evaluate(m, tmp_path / "x.npy", labels=tmp_path / "y.npy", batch_size=3)
    assert r.num_samples == 4 and r.top1 == pytest.approx(0.75)
    np.save(tmp_path / "short.npy", np.array([0, 1]))
    with pytest.raises(OnnxflexError, match="2 labels for 4 samples"):
        evaluate(m, tmp_path / "x.npy", labels=tmp_path / "short.npy")
    # an embedding model (no labels, width not a class count): cosine/SQNR vs ref only
    emb = _relu_model(("n", 3))
    np.save(tmp_path / "e.npy", np.array([[1, -2, 3], [4, 5, -6]], np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = evaluate(emb, tmp_path / "e.npy", ref=emb)
    assert r.kind == "embedding" and r.cosine == pytest.approx(1.0) and r.agreement is None and r.top1 is None


def test_region_targets_use_cuda_only_when_reconstructing_there_and_ort_offers_it(monkeypatch):
    import onnxruntime as ort

    from onnxflex.runtime.session import target_providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert target_providers("cuda") == ("cuda", "cpu")
    assert target_providers("cpu") == ("cpu",)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert target_providers("cuda") == ("cpu",)


def test_opset_upgrade_runs_weightless_and_puts_the_weights_back(monkeypatch):
    """onnx's version converter sees stubs, not weights (no 2 GB limit, no extra copies); every
    initializer comes back byte for byte and the converted model computes the same."""
    from onnxflex.onnx_facts import default_opset, upgrade_opset

    monkeypatch.setattr("onnxflex.onnx_facts.WEIGHT_MIN_BYTES", 0)
    model = _classifier()
    up = upgrade_opset(model, 21, "the test needs")
    assert default_opset(up) == 21 and default_opset(model) == 13
    before = {t.name: t.SerializeToString() for t in model.graph.initializer}
    assert {t.name: t.SerializeToString() for t in up.graph.initializer if t.name in before} == before
    feed = [{"images": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}]
    np.testing.assert_array_equal(S.run_batched(S.make_session(up), feed)["logits"],
                                  S.run_batched(S.make_session(model), feed)["logits"])


def test_cpu_flags_and_whether_int8_kernels_saturate(tmp_path):
    from onnxflex.runtime.cpu import cpu_flags, describe_cpu, int8_kernels_saturate

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx512_vnni\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx2", "fma"}  # the first CPU's line, not every word of the file
    assert cpu_flags(tmp_path / "absent") == frozenset()
    assert int8_kernels_saturate({"avx2", "fma"})  # VPMADDUBSW: int16 pair sums
    assert not int8_kernels_saturate({"avx2", "avx512f", "avx512_vnni"})
    assert not int8_kernels_saturate({"avx2", "avx_vnni"})
    assert not int8_kernels_saturate(set())  # not x86 (or unknown): no claim
    assert "avx2 yes" in describe_cpu({"avx2"}) and "avx512_vnni no" in describe_cpu({"avx2"})
