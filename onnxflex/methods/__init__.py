"""Weight-rounding methods, one module each (rtn, flexround, adaround, gptq).

A method is one :class:`Method` entry: how to build its weight quantizer, whether and how it learns
(Adam on a reconstruction loss, or a closed-form solve on the Gram statistics), its loss scaling and
its learning rate. The reconstruct pass reads the entry and never tests a method's name. Adding a
method is adding one module here that defines ``METHOD``; it is found by name.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import OnnxflexError


@dataclass(frozen=True)
class Method:
    name: str
    quantizer: str  # "module:Class" of its quantizers.grid.WeightQuantizer (imported on use: torch loads lazily)
    fit: str  # "none" (the RTN grid as is) | "adam" (iterative reconstruction) | "solve" (closed form on Gram stats)
    summary: str
    per_sample_loss: bool = False  # loss summed per sample (AdaRound's regulariser weight is tuned for it)
    lr: Optional[Callable[[dict], float]] = None  # preset -> learning rate, for "adam"
    learns_act_steps: bool = True  # LSQ activation steps trained alongside the weights ("adam")
    region_mode: Optional[str] = None  # the region mode `auto` resolves to, when the method needs one
    # its training forward is the deployed weights (hard rounding), so a held-out check mid-schedule
    # measures what would ship (early stopping); AdaRound's soft rounding is not
    checkable: bool = True

    @property
    def learns(self) -> bool:
        return self.fit != "none"

    def make_quantizer(self, weight, bits: int, out_axis, in_axis, per_channel: bool = True, **kwargs):
        module, cls = self.quantizer.split(":")
        return getattr(importlib.import_module(module), cls)(weight, bits, out_axis, in_axis,
                                                             per_channel=per_channel, **kwargs)


def _discover() -> dict:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if isinstance(method, Method):
            found[method.name] = method
    return found


METHODS: dict[str, Method] = _discover()
#: the order users see them in (help texts, error messages)
METHOD_NAMES = tuple(sorted(METHODS, key=lambda n: (n != "flexround", n)))


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise OnnxflexError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}") from None
