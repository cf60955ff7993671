"""RegionModule: replay a contiguous list of ONNX nodes in torch.

A region is the unit of FlexRound reconstruction: its weights are swapped for quantizer modules
(``weight_overrides``) and selected activations pass through activation quantizers (``act_quant``)
while the output is compared with ONNX Runtime's FP32 result.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

import numpy as np
import onnx
import torch
from torch import nn

from .ops import NUM_OUTPUTS, OPS, node_attrs, numpy_to_torch

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _op_label(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"


def unsupported_ops(nodes: Iterable[onnx.NodeProto]) -> list[str]:
    """Op types among ``nodes`` with no torch lifting, unique, in first-seen order.

    Ops outside the default ONNX domain (e.g. com.microsoft fused ops) are never supported and are
    reported as ``"domain.OpType"``.
    """
    seen: list[str] = []
    for n in nodes:
        ok = n.domain in _DEFAULT_DOMAINS and n.op_type in OPS
        label = _op_label(n)
        if not ok and label not in seen:
            seen.append(label)
    return seen


def _sanitize(name: str, taken: set[str]) -> str:
    """ONNX tensor names contain '.', '/', ':' which nn.Module attribute names cannot."""
    base = re.sub(r"\W", "_", name) or "_"
    if base[0].isdigit():
        base = "_" + base
    key, i = base, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


class RegionModule(nn.Module):
    """Runs a contiguous list of ONNX nodes in torch, with optional weight and activation quantizers attached.

    Args:
        nodes: topologically ordered nodes of the region (default ONNX domain).
        constants: initializer name -> array. Only those the nodes read become buffers
            (non-trainable; floats as float32, integers kept integer).
        inputs: names of the region's runtime inputs (positional order of ``forward``).
        outputs: names returned by ``forward``.
        opset: default-domain opset of the model (selects attr-vs-input forms).
        weight_overrides: initializer name -> module whose ``forward()`` returns the tensor to use
            instead (e.g. a FlexRound-quantized weight). Registered as submodules, so their
            parameters are trained by the region's optimiser.
        act_quant: tensor name -> module applied to that tensor where nodes read it.
        act_consumers: tensor name -> node names that read the quantized version (others read
            raw). Tensors without an entry are quantized for every consumer.

    Region outputs are always the raw (unquantized) values: the next region (or the reconstruction
    loss) decides for itself whether to quantize them.
    """

    def __init__(
        self,
        nodes: list[onnx.NodeProto],
        constants: dict[str, np.ndarray],
        inputs: list[str],
        outputs: list[str],
        opset: int,
        weight_overrides: Optional[dict[str, nn.Module]] = None,
        act_quant: Optional[dict[str, nn.Module]] = None,
        act_consumers: Optional[dict[str, set[str]]] = None,
    ):
        super().__init__()
        for n in nodes:
            if n.domain not in _DEFAULT_DOMAINS or n.op_type not in OPS:
                raise NotImplementedError(f"op {_op_label(n)} (node {n.name}) has no torch lifting")
        self.opset = int(opset)
        self.input_names = list(inputs)
        self.output_names = list(outputs)
        weight_overrides = dict(weight_overrides or {})
        act_quant = dict(act_quant or {})
        self.act_consumers = {k: set(v) for k, v in (act_consumers or {}).items()}

        # names readable before the first node runs
        read = {i for n in nodes for i in n.input if i} | set(self.output_names)
        produced = {o for n in nodes for o in n.output if o}
        taken: set[str] = set()
        self.consts = nn.Module()
        self.const_keys: dict[str, str] = {}  # onnx name -> buffer name in self.consts
        for name, arr in constants.items():
            # an overridden weight's raw values are never read (its module's forward() is): no copy
            if name in read and name not in produced and name not in self.input_names and name not in weight_overrides:
                key = _sanitize(name, taken)
                self.consts.register_buffer(key, numpy_to_torch(arr))
                self.const_keys[name] = key

        # Constant nodes are folded into buffers so that they follow .to(device)
        self._steps: list[tuple] = []
        for n in nodes:
            attrs = node_attrs(n)
            attrs[NUM_OUTPUTS] = len(n.output)
            if n.op_type == "Constant":
                key = _sanitize(n.output[0], taken)
                self.consts.register_buffer(key, OPS["Constant"]([], attrs, self.opset)[0])
                self.const_keys[n.output[0]] = key
                continue
            self._steps.append((OPS[n.op_type], attrs, list(n.input), list(n.output), n.name, n.op_type))

        taken_w: set[str] = set()
        self.weights = nn.ModuleDict()
        self.weight_keys: dict[str, str] = {}
        for name, mod in weight_overrides.items():
            key = _sanitize(name, taken_w)
            self.weights[key] = mod
            self.weight_keys[name] = key

        taken_a: set[str] = set()
        self.act_quant = nn.ModuleDict()
        self.act_keys: dict[str, str] = {}
        for name, mod in act_quant.items():
            key = _sanitize(name, taken_a)
            self.act_quant[key] = mod
            self.act_keys[name] = key

        # every read must be resolvable: catches a region cut in the wrong place at build time
        avail = set(self.input_names) | set(self.const_keys) | set(self.weight_keys)
        for fn, attrs, ins, outs, name, op in self._steps:
            missing = [i for i in ins if i and i not in avail]
            if missing:
                raise ValueError(f"node {name or op} reads {missing}, which are not region inputs, constants "
                                 f"or outputs of earlier nodes")
            avail |= {o for o in outs if o}
        missing = [o for o in self.output_names if o not in avail]
        if missing:
            raise ValueError(f"region outputs {missing} are not produced by the region")

        # last step index that reads each tensor, so intermediates can be freed early
        self._last_use: dict[str, int] = {}
        for k, (_, _, ins, _, _, _) in enumerate(self._steps):
            for i in ins:
                if i:
                    self._last_use[i] = k

    def constant(self, name: str) -> torch.Tensor:
        """The raw buffer of an ONNX constant (not of an overridden weight, which is not kept)."""
        return getattr(self.consts, self.const_keys[name])

    def _wants_quant(self, tensor: str, node_name: str) -> bool:
        if tensor not in self.act_keys:
            return False
        consumers = self.act_consumers.get(tensor)
        return consumers is None or node_name in consumers

    def forward(self, *args, **feeds) -> dict[str, torch.Tensor]:
        """Run the region. Inputs positionally in ``input_names`` order, or by name (``**{name: x}``)."""
        if len(args) > len(self.input_names):
            raise TypeError(f"region takes {len(self.input_names)} inputs, got {len(args)} positional")
        env: dict[str, torch.Tensor] = dict(zip(self.input_names, args))
        for k, v in feeds.items():
            if k not in self.input_names:
                raise TypeError(f"unknown region input {k!r}; inputs are {self.input_names}")
            env[k] = v
        missing = [n for n in self.input_names if n not in env]
        if missing:
            raise TypeError(f"missing region inputs {missing}")
        for k, v in env.items():
            if v.is_floating_point() and v.dtype != torch.float32:
                env[k] = v.float()
        for name, key in self.const_keys.items():
            env[name] = getattr(self.consts, key)
        for name, key in self.weight_keys.items():
            if name in self._last_use or name in self.output_names:  # skip overrides nobody reads
                env[name] = self.weights[key]()

        quantized: dict[str, torch.Tensor] = {}  # computed once per forward, shared by consumers
        keep = set(self.output_names)
        for k, (fn, attrs, ins, outs, name, op) in enumerate(self._steps):
            args_: list[Optional[torch.Tensor]] = []
            for i in ins:
                if not i:
                    args_.append(None)
                elif self._wants_quant(i, name):
                    if i not in quantized:
                        quantized[i] = self.act_quant[self.act_keys[i]](env[i])
                    args_.append(quantized[i])
                else:
                    args_.append(env[i])
            while args_ and args_[-1] is None:
                args_.pop()
            res = fn(args_, attrs, self.opset)
            for j, o in enumerate(outs):
                if not o:
                    continue
                if j >= len(res):
                    raise NotImplementedError(f"output {j} of op {op} (node {name}) has no torch lifting")
                env[o] = res[j]
            for i in ins:
                if i and self._last_use.get(i) == k and i not in keep:
                    env.pop(i, None)
                    quantized.pop(i, None)
        return {o: env[o] for o in self.output_names}
