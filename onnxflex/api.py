"""``quantize(model, output, calibration, config)``: the one entry point the CLI and pipelines call.

It runs the passes of DESIGN §1 as one pipeline, and writes the output file only after the QDQ model
loaded and ran in ONNX Runtime and passed the target's rule check.
"""
from __future__ import annotations

from collections import Counter

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import QuantConfig
from .context import Context
from .errors import OnnxflexError
from .graph import Graph, check_output_path, model_input_specs, save_model  # noqa: F401 - public helpers
from .methods import get_method
from .runtime.memory import peak_rss_mb
from .targets import get_target

log = logging.getLogger("onnxflex")


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


def pipeline():
    """The passes of one quantization run, in order."""
    from .passes.analyze import AnalyzePass
    from .passes.awq_scale import ActivationScalePass
    from .passes.base import Sequential
    from .passes.calibrate import CalibratePass
    from .passes.check import CheckPass
    from .passes.equalize import EqualizePass
    from .passes.load_calibration import LoadCalibrationPass
    from .passes.partition import PartitionPass
    from .passes.prepare import PreparePass
    from .passes.qdq import QDQPass
    from .passes.reconstruct import ReconstructPass
    from .passes.select import SelectPass
    from .passes.validate import ValidatePass

    return Sequential(PreparePass(), LoadCalibrationPass(), EqualizePass(), AnalyzePass(), ActivationScalePass(),
                      SelectPass(), PartitionPass(),
                      CalibratePass(), ReconstructPass(), QDQPass(), ValidatePass(), CheckPass())


def quantize(model, output, calibration, config: Optional[QuantConfig] = None, *, preprocess=None,
             tokenizer=None, max_length: int = 128, report: Optional[str] = None, seq_len: Optional[int] = None,
             decoder: Optional[bool] = None, **overrides) -> QuantResult:
    """Quantize ``model`` (path or ModelProto) with ``calibration`` data and write a QDQ model to ``output``.

    calibration: an image folder, .npy/.npz path(s), a text file (one text per line, with
    ``tokenizer`` = a Hugging Face tokenizer folder and ``max_length`` tokens), a CalibrationSet,
    or an iterable of {input name: array} dicts. A text file for a decoder LM (``decoder`` True, or
    None: detected from the model's inputs/outputs, see onnxflex.calib.windows.is_decoder) is one token
    stream cut into ``calib_size`` windows of ``seq_len`` tokens (default 512), fed with an empty KV
    cache. config: a QuantConfig; keyword overrides
    (``method="rtn"``, ``weight_bits=4``...) replace its fields. Nothing is written unless the
    whole run succeeds.
    """
    from .passes.prepare import load_model
    from .report import write_report

    t_start = time.perf_counter()
    requested = dataclasses.replace(config or QuantConfig(), **overrides)
    cfg = requested.resolved()
    output = Path(output)
    check_output_path(output)
    ctx = Context(cfg, get_target(cfg.target), get_method(cfg.method), device=resolve_device(cfg.device),
                  calibration_source=calibration,
                  calibration_options=dict(preprocess=preprocess, tokenizer=tokenizer, max_length=max_length,
                                           seq_len=seq_len, decoder=decoder))
    if cfg.reduce_range and requested.reduce_range is None:  # chosen for this machine: say why
        ctx.notes.append("int8 weights on the 7-bit grid [-63, 63] (reduce_range): this CPU has AVX2 without VNNI, "
                         "where onnxruntime's u8 x s8 kernels saturate on full-range weights; pass --no-reduce-range "
                         "(reduce_range=False) for a model that will run on a CPU with VNNI")
    pipeline().run(Graph(load_model(model)), ctx)
    summary = _run_summary(ctx, time.perf_counter() - t_start)
    save_model(ctx.qdq_model, output)
    report_path = Path(report) if report else output.with_suffix(".report.json")
    result = QuantResult(output, cfg, ctx.region_reports, summary, report_path, ctx.violations)
    write_report(result, report_path)
    return result


def _outcome(status: str) -> str:
    """What a region deploys, from its report status: learned | gptq | rtn | fp32."""
    if status.startswith("kept gptq"):
        return "gptq"
    if status.startswith(("kept rtn", "rtn")):
        return "rtn"
    return status.split(":")[0] or "none"


def _run_summary(ctx: Context, seconds: float) -> dict:
    """The validate and check passes' measurements plus what this run was (for reports and benchmarks)."""
    cfg = ctx.config
    summary = dict(ctx.summary)
    summary.update(
        seconds=round(seconds, 2),
        peak_rss_mb=peak_rss_mb(),
        calibration_samples=ctx.calibration.num_samples,
        regions=len(ctx.regions), weights_quantized=len(ctx.weight_results),
        act_points=len(ctx.act_points), device=ctx.device, method=cfg.method, preset=cfg.preset,
        iters=cfg.iters, weight_bits=cfg.weight_bits, act_bits=cfg.act_bits, granularity=cfg.granularity, block_size=cfg.block_size,
        target=cfg.target, reduce_range=cfg.reduce_range, region_mode=cfg.regions if cfg.regions != "auto" else f"auto:{ctx.region_mode}",
        pass_seconds=dict(ctx.pass_seconds), pass_peak_rss_mb=dict(ctx.pass_peak_rss_mb),
    )
    outcomes = Counter(_outcome(r.status) for r in ctx.region_reports or [])
    if outcomes:
        summary["region_outcomes"] = dict(sorted(outcomes.items()))
    corrected = sum(r.bias_corrected for r in ctx.region_reports or [])
    if corrected:
        summary["bias_corrected"] = corrected
    if ctx.notes:
        summary["notes"] = list(ctx.notes)
    if ctx.batching is not None and ctx.batching.locked_unit:
        summary["locked_batch"] = f"{ctx.batching.locked_unit} sample(s) at a time: {ctx.batching.reason}"
    if ctx.device == "cuda":
        import torch

        summary["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return summary
