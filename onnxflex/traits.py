"""What kind of model this is, read once from the graph (DESIGN §2: no model-family guesses in passes).

Passes ask ``ctx.traits`` instead of re-scanning the graph or testing for architectures: whether it
has attention, which tensors carry activations (vs side inputs such as masks), the KV-cache inputs
and outputs of a decoder, and which inputs have a batch size fixed by the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .calib.windows import is_decoder, proto_io_specs
from .graph import Graph, reads

SHAPE_OPS = ("Shape", "Size")  # read only a tensor's shape: their outputs carry no activation data
EMBEDDING_MIN_ELEMENTS = 1024  # a float initializer this large read by a node is a learned table (embeddings)
KV_CACHE_MARKERS = ("past_key_values", "past_key", "past_value", "present", "cache")


def weight_dependent(graph: Graph) -> set:
    """Tensors downstream of a weighted op (tells residual Adds from mask Adds)."""
    dep = set()
    for n in graph.nodes:
        if graph.weight_spec(n) is not None or any(i in dep for i in reads(n)):
            dep.update(o for o in n.output if o)
    return dep


def data_dependent(graph: Graph) -> set:
    """Tensors downstream of a weighted op or of a large float table (embedding lookups): the
    activations. What is left are side tensors computed from the inputs alone (masks, positions)."""
    def reads_table(n):
        return any(i in graph.initializers and graph.initializers[i].data_type == onnx.TensorProto.FLOAT
                   and int(np.prod(graph.initializers[i].dims)) >= EMBEDDING_MIN_ELEMENTS for i in n.input)

    dep = set()
    for n in graph.nodes:
        if n.op_type in SHAPE_OPS:
            continue
        if graph.weight_spec(n) is not None or reads_table(n) or any(i in dep for i in reads(n)):
            dep.update(o for o in n.output if o)
    return dep


def has_attention(graph: Graph) -> bool:
    """True when a MatMul multiplies two activations (attention scores or context)."""
    return any(n.op_type == "MatMul" and graph.weight_spec(n) is None
               and not any(graph.is_constant(i) for i in n.input[:2]) for n in graph.nodes)


def _static_batch(graph: Graph) -> dict:
    """input name -> batch size, for inputs whose first dimension is a fixed number in the graph."""
    out = {}
    for vi in graph.model.graph.input:
        if vi.name not in graph.input_names or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            out[vi.name] = int(dims[0].dim_value)
    return out


@dataclass
class ModelTraits:
    attention: bool = False
    activations: set = field(default_factory=set)  # data_dependent(): tensors that carry activation data
    after_weights: set = field(default_factory=set)  # weight_dependent(): downstream of a weighted op
    kv_cache_inputs: list = field(default_factory=list)
    kv_cache_outputs: list = field(default_factory=list)
    static_batch: dict = field(default_factory=dict)  # input -> batch size fixed by the graph
    decoder: bool = False  # a causal LM (calib.windows.is_decoder): token windows, only the LM head kept wider

    @classmethod
    def of(cls, graph: Graph) -> "ModelTraits":
        def kv(name):
            return any(m in name.lower() for m in KV_CACHE_MARKERS)

        return cls(attention=has_attention(graph), activations=data_dependent(graph),
                   after_weights=weight_dependent(graph),
                   kv_cache_inputs=[i for i in graph.input_names if kv(i)],
                   kv_cache_outputs=[o for o in graph.output_names if kv(o)],
                   static_batch=_static_batch(graph), decoder=is_decoder(*proto_io_specs(graph.model)))
