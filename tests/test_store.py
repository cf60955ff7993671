"""The reconstruction streams' storage (onnxflex/store.py): float16 compaction, spilling to files,
batch-by-batch writes, and the results they must not change."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from onnxflex import QuantConfig, quantize
from onnxflex.layout import Batching, Layout
from onnxflex.quantizers.activation import ActQuantizer
from onnxflex.reconstruction.streams import Streams, collect
from onnxflex.store import TensorStore


def _parts(rng, n=10, shape=(3, 4, 5), batch=4):
    full = rng.standard_normal((n,) + shape).astype(np.float32)
    return full, [((s, min(n, s + batch)), full[s:s + batch]) for s in range(0, n, batch)]


@pytest.mark.parametrize("compact,budget", [(False, 1e12), (True, 1e12), (False, 0), (True, 0)])
def test_stored_array_reads_what_was_written(compact, budget):
    """In memory or on disk, float32 or float16: slices, sorted index sets and single rows read back
    the written values (rounded to float16 when compact), as float32."""
    rng = np.random.default_rng(0)
    full, parts = _parts(rng)
    store = TensorStore(budget, compact=compact)
    arr = store.allocate("t", full.shape, np.float32)
    for (s, _), p in parts:
        arr.write(s, p)
    want = full.astype(np.float16).astype(np.float32) if compact else full
    assert arr.dtype == np.float32 and arr.on_disk == (budget == 0)
    assert arr.storage == (np.float16 if compact else np.float32)
    assert arr.nbytes == full.size * (2 if compact else 4)
    for key in (slice(2, 7), np.array([0, 3, 4, 9]), np.array([5, 6, 7])):
        got = arr[key]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want[key])
    np.testing.assert_array_equal(arr[3], want[3])
    np.testing.assert_array_equal(arr[(slice(1, 4), slice(None), 2)], want[1:4, :, 2])
    np.testing.assert_array_equal(np.asarray(arr), want)
    path = arr.path
    store.close()
    assert path is None or not path.exists()


@pytest.mark.parametrize("budget", [1e12, 0])
def test_float16_widens_when_values_leave_its_range(budget):
    """A compact tensor whose later batch holds 1e6 becomes float32, keeping the earlier batches."""
    store = TensorStore(budget, compact=True)
    arr = store.allocate("t", (6, 2), np.float32)
    arr.write(0, np.full((3, 2), 0.1, np.float32))
    arr.write(3, np.array([[1e6, -2.0], [np.inf, 1.0], [np.nan, 3.0]], np.float32))
    assert arr.storage == np.float32
    got = arr[:]
    np.testing.assert_array_equal(got[:3], np.float32(np.float16(0.1)))
    assert got[3, 0] == 1e6 and np.isinf(got[4, 0]) and np.isnan(got[5, 0])
    # inf and nan alone do not widen
    arr2 = store.allocate("u", (2, 2), np.float32)
    arr2.write(0, np.array([[np.inf, 1.0], [np.nan, -np.inf]], np.float32))
    assert arr2.storage == np.float16
    store.close()


def test_store_spills_past_its_budget_and_put_keeps_uncompacted_inputs():
    store = TensorStore(budget_bytes=1000, compact=True)
    x = np.arange(100, dtype=np.float32).reshape(25, 4)
    store.put("input", x, compact=False)  # 400 bytes, kept as given: no copy
    assert store["input"].storage == np.float32 and not store["input"].on_disk
    big = store.allocate("big", (250, 4), np.float32)  # 2000 bytes in float16: over the budget
    assert big.on_disk and store.spilled == {"big"}
    store.keep_only({"input"})
    assert store.names() == ["input"] and store.spilled == set()
    released = store.release("input")
    assert "input" not in store
    store.close()
    np.testing.assert_array_equal(released[:], x)  # the caller's array outlives the store


def test_collect_writes_batches_in_place_and_joins_other_layouts():
    """Rows of axis 0 go straight into the store; a tensor without a batch axis is kept once; equal to
    joining the batches."""
    rng = np.random.default_rng(1)
    full, parts = _parts(rng, n=9, batch=4)
    shape_arith = np.array([3, 4], np.int64)
    batching = Batching(layouts={"y": Layout(0), "shape": Layout(None)})
    streams = Streams(TensorStore(1e12), TensorStore(1e12), 9, 8, batching=batching)
    out = collect(streams, streams.fp, ["y", "shape"], (((s, e), [p, shape_arith]) for (s, e), p in parts))
    np.testing.assert_array_equal(out["y"][:], full)
    np.testing.assert_array_equal(np.asarray(out["shape"]), shape_arith)
    # a later batch whose rows are not its samples goes back to joining, keeping what was written
    odd = [((0, 4), [full[:4]]), ((4, 9), [full[4:7]])]
    out = collect(streams, streams.q, ["y"], iter(odd))
    np.testing.assert_array_equal(np.asarray(out["y"]), full[:7])
    streams.close()


def test_act_quantizer_inference_path_matches_training_path():
    """The in-place no-grad fake quantization gives the training path's values bit for bit."""
    x = torch.randn(4, 8, 5, 5) * 3
    for zp, signed in ((0, True), (17, False)):
        q = ActQuantizer(0.05, 8, learn=True, zero_point=zp, signed=signed)
        with torch.no_grad():
            fast = q(x)
        slow = q(x.clone().requires_grad_(True)).detach()
        assert torch.equal(fast, slow)
        assert torch.equal(x, x)  # input untouched


def test_calibration_ranges_do_not_depend_on_run_size(tiny_cnn, tiny_calib):
    """The calibrate pass sizes its runs by memory; percentile and MSE ranges come out the same for any
    batching of the samples."""
    import onnx

    from onnxflex.context import ActPoint
    from onnxflex.passes.calibrate import calibrate_points

    model = onnx.load(str(tiny_cnn))
    names = [n.output[0] for n in model.graph.node if n.op_type in ("Relu", "Conv")][:3]

    def run(batch, method):
        pts = {t: ActPoint(t, set()) for t in names}
        feeds = [{"input": tiny_calib[s:s + batch]} for s in range(0, len(tiny_calib), batch)]
        calibrate_points(model, pts, iter(feeds), method, num_samples=len(tiny_calib))
        return [(p.scale, p.zero_point) for p in pts.values()]

    for method in ("percentile", "mse"):
        assert run(1, method) == run(7, method) == run(len(tiny_calib), method)


def test_spilled_and_float32_streams_match_in_memory_results(tiny_cnn, tiny_calib, tmp_path):
    """Spilling is exact: --max-memory 0 (every stream tensor in a file) writes the same bytes as the
    in-memory run; float16 streams stay within the quantization noise of float32 ones."""
    outs = {}
    for name, kw in {"mem": {}, "disk": {"max_memory": 0.0}, "f32": {"stream_precision": "float32"}}.items():
        cfg = QuantConfig(progress=False, batch_size=16, calib_size=48, method="flexround", iters=20, weight_bits=4, **kw)
        res = quantize(str(tiny_cnn), tmp_path / f"{name}.onnx", [{"input": tiny_calib}], cfg)
        outs[name] = ((tmp_path / f"{name}.onnx").read_bytes(), res.summary["calib_output_sqnr_db"])
    assert outs["mem"][0] == outs["disk"][0]
    assert abs(outs["mem"][1] - outs["f32"][1]) < 1.5  # training noise on a tiny model; bench/stream_memory.py measures
