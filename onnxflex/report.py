"""The end-of-run report: per-region output error under RTN and after learning (table, JSON, PNG)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("onnxflex")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3e}"


def format_region_table(regions, summary: dict) -> str:
    lines = [f"{'region':<34} {'kind':<6} {'loss':<6} {'RTN MSE':>10} {'final MSE':>10} {'ratio':>6} {'sec':>6}  status"]
    for r in regions:
        ratio = (r.final_mse / r.rtn_mse) if (r.rtn_mse and r.final_mse is not None and r.rtn_mse > 0) else None
        lines.append(f"{r.name[:34]:<34} {r.kind:<6} {r.loss_form:<6} {_fmt(r.rtn_mse):>10} {_fmt(r.final_mse):>10} "
                     f"{'-' if ratio is None else f'{ratio:.2f}':>6} {r.seconds:6.1f}  {r.status}"
                     + (" + bias" if r.bias_corrected else ""))
    keys = ["method", "preset", "iters", "weight_bits", "act_bits", "granularity", "region_mode", "device",
            "calibration_samples", "regions", "weights_quantized", "act_points", "calib_output_sqnr_db",
            "torch_vs_ort_sqnr_db", "rule_violations", "seconds", "peak_rss_mb", "region_outcomes", "bias_corrected"]
    lines.append("")
    lines.append("  ".join(f"{k}={summary[k]}" for k in keys if k in summary))
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    if "locked_batch" in summary:
        lines.append(f"note: ran {summary['locked_batch']}")
    return "\n".join(lines)


def write_report(result, path: Path) -> None:
    """JSON beside the output model, and a PNG plot of per-region MSE (RTN vs learned)."""
    path = Path(path)
    data = {
        "output": str(result.output),
        "config": {k: v for k, v in result.config.__dict__.items()},
        "summary": result.summary,
        "regions": [r.to_dict() for r in result.regions],
        "violations": [v.__dict__ for v in result.violations],
    }
    path.write_text(json.dumps(data, indent=2, default=str))
    try:
        _plot(result.regions, path.with_suffix(".png"))
    except Exception as e:  # a plot is a convenience; never fail a run for it
        log.warning("could not draw the report plot: %s", e)


def _plot(regions, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in regions if r.rtn_mse is not None]
    if not rs:
        return
    x = list(range(len(rs)))
    fig, ax = plt.subplots(figsize=(max(6, len(rs) * 0.18), 3.5))
    ax.plot(x, [max(r.rtn_mse, 1e-12) for r in rs], "o-", label="round-to-nearest", ms=3)
    ax.plot(x, [max(r.final_mse if r.final_mse is not None and math.isfinite(r.final_mse) else r.rtn_mse, 1e-12)
                for r in rs], "o-", label="learned", ms=3)
    ax.set_yscale("log")
    ax.set_xlabel("region")
    ax.set_ylabel("region output MSE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
