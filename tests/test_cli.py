"""CLI contract: user mistakes give one line, exit code 2, no traceback and no output file."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from onnxflex.cli import main


def _invoke(args):
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    return res


def _assert_user_error(res, out_path, *words):
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert "Traceback" not in text
    last = text.splitlines()[-1].lower()
    for w in words:
        assert w.lower() in last, last
    assert not out_path.exists()
    assert not list(out_path.parent.glob(f".{out_path.name}*"))  # no temp leftovers


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / "sub" / f"{i}.png")
    return d


def test_quantize_rtn_from_image_folder(tiny_cnn, images, tmp_path):
    out = tmp_path / "q.onnx"
    res = _invoke(["quantize", str(tiny_cnn), "--calib", str(images), "-o", str(out), "--method", "rtn",
                   "--size", "16", "-q"])
    assert res.exit_code == 0, res.output
    assert out.exists() and "wrote" in res.output
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["summary"]["calibration_samples"] == 6
    assert out.with_suffix(".report.png").exists()


def test_quantize_from_npy(tiny_cnn, tiny_calib, tmp_path):
    npy = tmp_path / "x.npy"
    np.save(npy, tiny_calib[:8])
    out = tmp_path / "q.onnx"
    res = _invoke(["quantize", str(tiny_cnn), "--calib", str(npy), "-o", str(out), "--method", "flexround",
                   "--weight-bits", "4", "--iters", "5", "-q"])
    assert res.exit_code == 0, res.output
    assert out.exists()


def test_corrupt_model(tmp_path, images):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 50)
    out = tmp_path / "q.onnx"
    _assert_user_error(_invoke(["quantize", str(bad), "--calib", str(images), "-o", str(out)]), out, "onnx")


def test_truncated_model(tiny_cnn, tmp_path, images):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(tiny_cnn.read_bytes()[:300])
    out = tmp_path / "q.onnx"
    _assert_user_error(_invoke(["quantize", str(cut), "--calib", str(images), "-o", str(out)]), out, "cut.onnx")


def test_missing_model(tmp_path, images):
    out = tmp_path / "q.onnx"
    _assert_user_error(_invoke(["quantize", str(tmp_path / "nope.onnx"), "--calib", str(images), "-o", str(out)]),
                       out, "nope.onnx")


def test_missing_external_data(tmp_path, images):
    import onnx

    from tests.conftest import TinyResNet, export
    import torch

    p = export(TinyResNet(), torch.zeros(1, 3, 16, 16), tmp_path / "ext.onnx", ["input"], ["logits"])
    m = onnx.load(str(p))
    onnx.save_model(m, str(p), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    out = tmp_path / "q.onnx"
    _assert_user_error(_invoke(["quantize", str(p), "--calib", str(images), "-o", str(out)]), out, "ext.onnx.data")


def test_empty_calibration_folder(tiny_cnn, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "q.onnx"
    _assert_user_error(_invoke(["quantize", str(tiny_cnn), "--calib", str(empty), "-o", str(out)]), out, "empty")


def test_folder_without_images(tiny_cnn, tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    (d / "a.txt").write_text("hello")
    out = tmp_path / "q.onnx"
    _assert_user_error(_invoke(["quantize", str(tiny_cnn), "--calib", str(d), "-o", str(out)]), out, "image")


def test_wrong_calibration_shape(tiny_cnn, tmp_path):
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((4, 3, 8, 8), np.float32))
    out = tmp_path / "q.onnx"
    _assert_user_error(_invoke(["quantize", str(tiny_cnn), "--calib", str(npy), "-o", str(out)]), out, "shape")


def test_reduce_range_outside_ort_cpu_int8_is_a_user_error(tiny_cnn, images, tmp_path):
    out = tmp_path / "q.onnx"
    _assert_user_error(_invoke(["quantize", str(tiny_cnn), "--calib", str(images), "-o", str(out), "--size", "16",
                                "--reduce-range"]), out, "--reduce-range is for --target ort-cpu")


def test_unwritable_output(tiny_cnn, images, tmp_path):
    out = tmp_path / "no_such_dir" / "q.onnx"
    _assert_user_error(_invoke(["quantize", str(tiny_cnn), "--calib", str(images), "-o", str(out), "--size", "16"]),
                       out, "does not exist")


def test_output_is_a_folder(tiny_cnn, images, tmp_path):
    out = tmp_path / "adir"
    out.mkdir()
    res = _invoke(["quantize", str(tiny_cnn), "--calib", str(images), "-o", str(out), "--size", "16"])
    assert res.exit_code == 2 and "folder" in res.output


def test_unknown_exclude(tiny_cnn, tiny_calib, tmp_path):
    npy = tmp_path / "x.npy"
    np.save(npy, tiny_calib[:4])
    out = tmp_path / "q.onnx"
    _assert_user_error(_invoke(["quantize", str(tiny_cnn), "--calib", str(npy), "-o", str(out), "--exclude", "zzz"]),
                       out, "zzz")


def test_inspect_lists_ops_and_regions(tiny_cnn):
    res = _invoke(["inspect", str(tiny_cnn)])
    assert res.exit_code == 0, res.output
    assert "6 quantizable ops" in res.output and "regions" in res.output


def test_eval_and_check(tiny_cnn, images, tmp_path):
    shutil.copy(tiny_cnn, tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    assert _invoke(["quantize", str(tiny_cnn), "--calib", str(images), "-o", str(out), "--method", "rtn",
                    "--size", "16", "-q"]).exit_code == 0
    res = _invoke(["eval", str(out), "--data", str(images), "--ref", str(tiny_cnn), "--size", "16", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["agreement"] is not None and 0 <= data["agreement"] <= 1
    ok = _invoke(["check", str(out)])
    assert ok.exit_code == 0 and "no tensorrt rule violations" in ok.output


def test_a_bug_in_a_pass_is_one_internal_error_line_naming_the_pass(tiny_cnn, images, tmp_path, monkeypatch):
    from onnxflex.passes.calibrate import CalibratePass

    def broken(self, graph, ctx):
        raise IndexError("list index out of range")

    monkeypatch.setattr(CalibratePass, "run", broken)
    out = tmp_path / "q.onnx"
    res = _invoke(["quantize", str(tiny_cnn), "--calib", str(images), "-o", str(out), "--method", "rtn",
                   "--size", "16", "-q"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("internal error in the calibrate pass: IndexError") and "report" in last
    assert not out.exists()


def test_ort_cpu_target_quantizes_op_outputs_with_uint8(tiny_cnn, images, tmp_path):
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "q.onnx"
    res = _invoke(["quantize", str(tiny_cnn), "--calib", str(images), "-o", str(out), "--method", "rtn",
                   "--size", "16", "--target", "ort-cpu", "--reduce-range", "-q"])
    assert res.exit_code == 0, res.output
    m = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    act_q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert act_q and all(inits[n.input[2]].dtype == np.uint8 for n in act_q)
    report = json.loads(out.with_suffix(".report.json").read_text())["summary"]
    assert report["target"] == "ort-cpu" and report["rule_violations"] == 0 and report["reduce_range"] is True
    # every Conv reads a DQ and (unless it writes the graph output) its output, after its ReLU, is quantized
    producers = {o: n for n in m.graph.node for o in n.output}
    readers = {}
    for n in m.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for conv in (n for n in m.graph.node if n.op_type == "Conv"):
        assert producers[conv.input[0]].op_type == "DequantizeLinear"
        t = conv.output[0]
        while len(readers.get(t, [])) == 1 and readers[t][0].op_type in ("Relu", "Clip"):
            t = readers[t][0].output[0]
        assert {r.op_type for r in readers[t]} == {"QuantizeLinear"}, conv.name


def test_inspect_shows_the_regions_quantize_uses(tiny_cnn, images, tmp_path):
    out = tmp_path / "q.onnx"
    res = _invoke(["quantize", str(tiny_cnn), "--calib", str(images), "-o", str(out), "--method", "rtn",
                   "--size", "16", "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    regions = json.loads(out.with_suffix(".report.json").read_text())["summary"]["regions"]
    shown = _invoke(["inspect", str(tiny_cnn), "--device", "cpu"])
    assert shown.exit_code == 0, shown.output
    assert f"{regions} regions (auto -> layer" in shown.output


def test_output_file_mode_follows_the_umask(tiny_cnn, images, tmp_path):
    import os
    import stat

    out = tmp_path / "q.onnx"
    old = os.umask(0o022)
    try:
        res = _invoke(["quantize", str(tiny_cnn), "--calib", str(images), "-o", str(out), "--method", "rtn",
                       "--act-bits", "0", "--size", "16", "-q"])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
