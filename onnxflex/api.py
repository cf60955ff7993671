"""``quantize(model, output, calibration, config)``: the one entry point the CLI and pipelines call.

It composes the passes of DESIGN §1 (prepare -> partition -> calibrate -> reconstruct -> qdq),
checks that ONNX Runtime loads and runs the result, and only then writes the output file.
"""
from __future__ import annotations

import dataclasses
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx

from .config import QuantConfig
from .errors import OnnxflexError
from .graph import Graph, check_output_path, save_model, with_float_outputs

log = logging.getLogger("onnxflex")


@dataclass
class Context:
    """State the passes share during one run."""

    config: QuantConfig
    calibration: Any = None
    device: str = "cpu"
    quantize_nodes: set = field(default_factory=set)
    tensor_sizes: dict = field(default_factory=dict)
    regions: list = field(default_factory=list)
    region_mode: str = ""  # layer | block, as resolved from the config (auto) by the partition pass
    act_points: dict = field(default_factory=dict)
    weight_results: dict = field(default_factory=dict)
    region_reports: list = field(default_factory=list)
    final_outputs: dict = field(default_factory=dict)
    stream_peak_bytes: int = 0
    qdq_model: Optional[onnx.ModelProto] = None


@dataclass
class QuantResult:
    """What a run produced: the output path, the per-region report and measured summary."""

    output: Path
    config: QuantConfig
    regions: list
    summary: dict
    report_path: Optional[Path] = None
    violations: list = field(default_factory=list)

    def format_table(self) -> str:
        from .report import format_region_table

        return format_region_table(self.regions, self.summary)


def model_input_specs(model: onnx.ModelProto) -> dict:
    """name -> (shape with ints or dim names, numpy dtype) for the non-initializer graph inputs."""
    inits = {t.name for t in model.graph.initializer}
    specs = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                for d in tt.shape.dim]
        specs[i.name] = (dims, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return specs


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        log.warning("--device cuda requested but torch sees no GPU; running on the CPU")
        return "cpu"
    if requested not in ("cpu", "cuda"):
        raise OnnxflexError(f"unknown device {requested!r}; use auto, cpu or cuda")
    return requested


def capture_shapes(model: onnx.ModelProto, feed: dict) -> dict:
    """Shapes of every float tensor for one calibration sample (sizes the regions' live sets)."""
    from .runtime.session import make_session

    g = Graph(model)
    names = [o for n in g.nodes for o in n.output
             if o and g.elem_types.get(o, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT]
    sess = make_session(with_float_outputs(model, names))
    outs = [o.name for o in sess.get_outputs()]
    vals = sess.run(outs, feed)
    return {n: v.shape for n, v in zip(outs, vals)}


def _load_calibration(source, model, cfg, preprocess, tokenizer, max_length):
    from .calib import CalibrationSet, load_calibration
    from .text import infer_token_mask, is_text_file, load_text_calibration

    specs = model_input_specs(model)
    if isinstance(source, CalibrationSet):
        calib = source
    elif isinstance(source, (str, Path)) and is_text_file(source):
        return load_text_calibration(source, specs, tokenizer, max_length=max_length, size=cfg.calib_size)
    else:
        calib = load_calibration(source, specs, size=cfg.calib_size, preprocess=preprocess, seed=cfg.seed,
                                 augment=cfg.augment)
    if calib.token_mask is None:
        calib.token_mask = infer_token_mask(calib)
    return calib


def quantize(model, output, calibration, config: Optional[QuantConfig] = None, *, preprocess=None,
             tokenizer=None, max_length: int = 128, report: Optional[str] = None, **overrides) -> QuantResult:
    """Quantize ``model`` (path or ModelProto) with ``calibration`` data and write a QDQ model to ``output``.

    calibration: an image folder, .npy/.npz path(s), a text file (one text per line, with
    ``tokenizer`` = a Hugging Face tokenizer folder and ``max_length`` tokens), a CalibrationSet,
    or an iterable of {input name: array} dicts. config: a QuantConfig; keyword overrides
    (``method="rtn"``, ``weight_bits=4``...) replace its fields. Nothing is written unless the
    whole run succeeds.
    """
    from .passes.calibrate import CalibratePass
    from .passes.partition import PartitionPass, tensor_sizes
    from .passes.prepare import PreparePass, load_model
    from .passes.qdq import QDQPass
    from .passes.reconstruct import ReconstructPass
    from .report import write_report

    t_start = time.perf_counter()
    cfg = dataclasses.replace(config or QuantConfig(), **overrides).resolved()
    output = Path(output)
    check_output_path(output)
    fp_model = PreparePass().run(load_model(model))
    graph = Graph(fp_model)
    ctx = Context(cfg, device=resolve_device(cfg.device))
    ctx.calibration = _load_calibration(calibration, fp_model, cfg, preprocess, tokenizer, max_length)
    all_weighted = {s.node for s in graph.weighted_nodes()}
    if not all_weighted:
        raise OnnxflexError("the model has no Conv, Gemm or MatMul with constant weights; nothing to quantize")
    unknown = set(cfg.exclude) - {n.name for n in graph.nodes}
    if unknown:
        raise OnnxflexError(f"--exclude names nodes not in the model: {', '.join(sorted(unknown))}; "
                            "see `onnxflex inspect` for node names")
    ctx.quantize_nodes = all_weighted - set(cfg.exclude)
    first = next(ctx.calibration.batches(1))
    ctx.tensor_sizes = tensor_sizes(capture_shapes(fp_model, first))

    for p in (PartitionPass(), CalibratePass(), ReconstructPass(), QDQPass()):
        graph = p.run(graph, ctx)

    summary = _validate(ctx, fp_model)
    summary.update(
        seconds=round(time.perf_counter() - t_start, 2),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        calibration_samples=ctx.calibration.num_samples,
        regions=len(ctx.regions), weights_quantized=len(ctx.weight_results),
        act_points=len(ctx.act_points), device=ctx.device, method=cfg.method, preset=cfg.preset,
        iters=cfg.iters, weight_bits=cfg.weight_bits, act_bits=cfg.act_bits, granularity=cfg.granularity,
        region_mode=cfg.regions if cfg.regions != "auto" else f"auto:{ctx.region_mode}",
    )
    if ctx.device == "cuda":
        import torch

        summary["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    violations = _rule_check(ctx.qdq_model, cfg.target)
    summary["rule_violations"] = sum(v.severity == "error" for v in violations)
    summary["rule_warnings"] = sum(v.severity != "error" for v in violations)
    save_model(ctx.qdq_model, output)
    report_path = Path(report) if report else output.with_suffix(".report.json")
    result = QuantResult(output, cfg, ctx.region_reports, summary, report_path, violations)
    write_report(result, report_path)
    return result


def _validate(ctx: Context, fp_model) -> dict:
    """Load the QDQ model in ONNX Runtime, run it on calibration data, and measure it against FP32."""
    from .runtime.metrics import sqnr_db
    from .runtime.session import make_session

    try:
        sess = make_session(ctx.qdq_model, optimization="disable")
    except OnnxflexError as e:
        raise RuntimeError(f"internal error: the written QDQ model does not load in ONNX Runtime: {e}") from None
    n = min(ctx.calibration.num_samples, 64)
    # the first float output is the one measured (a text model may echo its integer ids first)
    out_names = [o.name for o in sess.get_outputs() if o.type == "tensor(float)"] or [sess.get_outputs()[0].name]
    fp_sess = make_session(fp_model)
    qdq_vals, fp_vals = [], []
    for i, feed in enumerate(ctx.calibration.batches(32)):
        if i * 32 >= n:
            break
        qdq_vals.append(sess.run(out_names[:1], feed)[0])
        fp_vals.append(fp_sess.run(out_names[:1], feed)[0])
    qdq, fp = np.concatenate(qdq_vals), np.concatenate(fp_vals)
    summary = {"calib_output_sqnr_db": round(float(sqnr_db(fp, qdq)), 2)}
    o = out_names[0]
    if o in ctx.final_outputs:
        sim = ctx.final_outputs[o][1][: len(qdq)]
        summary["torch_vs_ort_sqnr_db"] = round(float(sqnr_db(qdq, sim)), 2)
    return summary


def _rule_check(model, target):
    from .checks.tensorrt import check_qdq_model

    violations = check_qdq_model(model, target)
    for v in violations:
        log.warning("%s rule %s at %s: %s", target, v.rule, v.node, v.message)
    return violations
