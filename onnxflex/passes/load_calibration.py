"""Turn what the user passed as calibration data into a CalibrationSet for the prepared model."""
from __future__ import annotations

from ..calib import load_calibration
from ..calib.windows import is_decoder, proto_io_specs
from ..graph import Graph, model_input_specs
from .base import Pass


class LoadCalibrationPass(Pass):
    """ctx.calibration_source (folder, .npy/.npz, text file, iterable) -> ctx.calibration.

    It runs after prepare because the feeds are matched to the prepared model's inputs."""

    name = "load_calibration"

    def run(self, graph: Graph, ctx) -> Graph:
        cfg = ctx.config
        options = dict(ctx.calibration_options)
        if options.get("decoder") is None:  # the outputs tell a no-cache decoder (3-D logits) from an encoder
            options["decoder"] = is_decoder(*proto_io_specs(graph.model))
        ctx.calibration = load_calibration(ctx.calibration_source, model_input_specs(graph.model),
                                           size=cfg.calib_size, seed=cfg.seed, augment=cfg.augment, **options)
        return graph
