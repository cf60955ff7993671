"""A thin read-mostly view over an ONNX ModelProto: producers, consumers, constants, weighted ops.

Passes share this view instead of re-deriving graph relations each time; the ModelProto stays the
source of truth (mutating passes rebuild the view).
"""
from __future__ import annotations

import contextlib

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import OnnxflexError
from .onnx_facts import MAX_IR_VERSION, default_opset, fits_in_protobuf

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
# Element-wise ops that may follow a weighted op inside one layer region.
ELEMENTWISE_OPS = {
    "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Gelu", "Erf",
    "Add", "Sub", "Mul", "Div", "Identity", "Dropout",
}


@dataclass(frozen=True)
class WeightSpec:
    """One quantizable weight: which node reads it and how its axes are laid out."""

    node: str  # node name
    op_type: str
    weight: str  # initializer name
    bias: Optional[str]
    data_input: str  # the activation tensor the op multiplies with the weight
    out_axis: int  # output-channel axis of the weight (per-channel scale axis)
    in_axis: int  # input-channel axis of the weight
    weight_input: int = 1  # which input of the node the weight is (0 for a Gather's table)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies of an If/Loop/Scan node (empty for every other node)."""
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def all_nodes(g: onnx.GraphProto):
    """Every node of ``g`` and, after each control-flow node, those of its bodies (depth first)."""
    for n in g.node:
        yield n
        for sg in subgraphs(n):
            yield from all_nodes(sg)


def implicit_inputs(node: onnx.NodeProto) -> list[str]:
    """Outer-scope tensors that an If/Loop/Scan body reads: ONNX lists them nowhere on the node, yet
    the node depends on them like on its inputs."""
    out: list[str] = []

    def visit(g: onnx.GraphProto, bound: set) -> None:
        bound = bound | {i.name for i in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            for t in n.input:
                if t and t not in bound and t not in out:
                    out.append(t)
            for sg in subgraphs(n):
                visit(sg, bound)
            bound |= set(n.output)
        for o in g.output:
            if o.name not in bound and o.name not in out:
                out.append(o.name)

    for sg in subgraphs(node):
        visit(sg, set())
    return out


def reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node depends on: its inputs, then what its subgraphs read from outside."""
    return list(node.input) + [t for t in implicit_inputs(node) if t not in node.input]


class Graph:
    """Producers, consumers and constants of a model, in the model's (topological) node order."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.node_by_name = {n.name: n for n in self.nodes}
        self.initializers = {t.name: t for t in g.initializer}
        self.producer = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in reads(n):
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.input_names = [i.name for i in g.input if i.name not in self.initializers]
        self.output_names = [o.name for o in g.output]
        self.opset = default_opset(model)
        self._arrays: dict[str, np.ndarray] = {}
        self.elem_types = {}
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type"):
                self.elem_types[vi.name] = vi.type.tensor_type.elem_type
        for name, t in self.initializers.items():
            self.elem_types[name] = t.data_type

    def is_constant(self, name: str) -> bool:
        return name in self.initializers

    def array(self, name: str) -> np.ndarray:
        """Initializer as numpy (cached)."""
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.initializers[name])
        return self._arrays[name]

    def clip_bounds(self, node: onnx.NodeProto) -> tuple:
        """(low, high) of a Clip: attributes before opset 11, constant inputs from 11; -inf / inf for an
        absent bound, None for a bound computed at run time."""
        attrs = {a.name: a.f for a in node.attribute if a.name in ("min", "max")}
        bounds = []
        for idx, key, absent in ((1, "min", float("-inf")), (2, "max", float("inf"))):
            name = node.input[idx] if len(node.input) > idx else ""
            if name:
                bounds.append(float(self.array(name)) if self.is_constant(name) else None)
            else:
                bounds.append(float(attrs.get(key, absent)))
        return tuple(bounds)

    def is_private_constant(self, name: str) -> bool:
        """A constant that exactly one node reads (rescaling it in place changes nothing else)."""
        return self.is_constant(name) and len(self.consumers.get(name, [])) == 1

    def constants_for(self, nodes) -> dict[str, np.ndarray]:
        """Initializers read by these nodes."""
        return {i: self.array(i) for n in nodes for i in n.input if i in self.initializers}

    def weight_spec(self, node: onnx.NodeProto) -> Optional[WeightSpec]:
        """The quantizable weight of a Conv/Gemm/MatMul, or None when it has no constant weight."""
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            return None
        w = node.input[1]
        if not self.is_constant(w) or self.is_constant(node.input[0]):
            return None
        rank = len(self.initializers[w].dims)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] and self.is_constant(node.input[2]) else None
        if node.op_type == "Conv":
            if rank < 3:
                return None
            return WeightSpec(node.name, "Conv", w, bias, node.input[0], 0, 1)
        if rank != 2:
            return None
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            out_axis, in_axis = (0, 1) if trans_b else (1, 0)
            if bias is not None and len(self.initializers[bias].dims) > 1:
                return None
            return WeightSpec(node.name, "Gemm", w, bias, node.input[0], out_axis, in_axis)
        return WeightSpec(node.name, "MatMul", w, None, node.input[0], 1, 0)

    def weighted_nodes(self) -> list[WeightSpec]:
        return [s for s in (self.weight_spec(n) for n in self.nodes) if s is not None]

    def first_last_nodes(self, decoder: bool) -> set:
        """The weighted ops kept at --first-last-bits: a CNN's first conv and classifier; a decoder's LM
        head only (its first weighted op is an ordinary q projection)."""
        ws = self.weighted_nodes()
        return set() if not ws else {ws[-1].node} if decoder else {ws[0].node, ws[-1].node}


def model_input_specs(model: onnx.ModelProto) -> dict:
    """name -> (shape with ints or dim names, numpy dtype) for the non-initializer graph inputs."""
    inits = {t.name for t in model.graph.initializer}
    specs = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                for d in tt.shape.dim] if tt.HasField("shape") else None  # None: rank unknown (not a scalar)
        specs[i.name] = (dims, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return specs


@contextlib.contextmanager
def float_outputs_exposed(model: onnx.ModelProto, names):
    """``model`` itself, with these intermediate float tensors added as outputs until the block ends
    (create the onnxruntime session inside it): :func:`with_float_outputs` without a copy of every weight."""
    outputs = model.graph.output
    have = {o.name for o in outputs}
    extra = [n for n in dict.fromkeys(names) if n not in have]
    outputs.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in extra)
    try:
        yield model
    finally:
        for _ in extra:
            outputs.pop()


def with_float_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs these intermediate float tensors (to capture them in ORT)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in names:
        if t not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
            have.add(t)
    return m


def check_output_path(output: Path) -> None:
    """Fail before any work when the output cannot be written (one-line user error)."""
    parent = output.parent
    if output.is_dir():
        raise OnnxflexError(f"output path {output} is a folder; give a file name such as {output}/model.qdq.onnx")
    if not parent.is_dir():
        raise OnnxflexError(f"output folder {parent} does not exist; create it or choose another -o path")
    if not os.access(parent, os.W_OK):
        raise OnnxflexError(f"cannot write to {parent} (permission denied); choose a writable -o path")


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename) so a failed run never leaves a half-written model.

    Models over 2 GB go to external data beside the file, as protobuf cannot hold them.
    """
    path = Path(path)
    check_output_path(path)
    parent = path.parent
    model.ir_version = min(model.ir_version or MAX_IR_VERSION, MAX_IR_VERSION)
    large = not fits_in_protobuf(model)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the output gets the mode any new file would
    try:
        if large:
            data_name = path.name + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            # external data was written next to tmp under its final name
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OnnxflexError(f"cannot write {path}: {e.strerror}; choose a writable -o path") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

