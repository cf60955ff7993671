"""The typed state the passes share during one run, and the records they exchange.

Every pass reads and writes a :class:`Context`; nothing else is passed between passes. The records
(``Region``, ``ActPoint``, ``WeightResult``, ``RegionReport``) live here rather than in the pass
that first fills them, so a pass never imports another pass to learn a type.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import onnx

from .graph import WeightSpec
from .traits import ModelTraits

if TYPE_CHECKING:
    from .config import QuantConfig
    from .layout import Batching
    from .methods import Method
    from .targets import Target


@dataclass
class Region:
    """A contiguous run of nodes reconstructed together (DESIGN §4)."""

    index: int
    kind: str  # layer | block | fp
    nodes: list
    inputs: list  # non-constant tensors read here and produced before the region
    outputs: list  # tensors produced here and read after it (or graph outputs)
    weights: list  # WeightSpec of the ops quantized in this region
    unsupported: list = field(default_factory=list)  # op types with no torch lifting

    @property
    def name(self) -> str:
        """r007:<first quantized op> (the first node may be a recomputed shape op shared by all)."""
        first = self.weights[0].node if self.weights else (self.nodes[0].name if self.nodes else "?")
        return f"r{self.index:03d}:{first}"

    def describe(self) -> str:
        ops = ",".join(w.op_type for w in self.weights) or "-"
        return f"{self.name} [{self.kind}] {len(self.nodes)} nodes, weights: {ops}"


@dataclass
class ActPoint:
    """One activation tensor that gets a Q/DQ pair, shared by all its quantized readers."""

    tensor: str
    consumers: set = field(default_factory=set)  # nodes that read the quantized tensor
    dtype: str = "int8"  # int8 | uint8 | int16 | uint16 (the target's activation grid)
    scale: float = 0.0
    zero_point: int = 0  # 0 for symmetric targets (TensorRT)
    low: float = float("inf")  # observed FP32 range on the calibration set
    high: float = float("-inf")
    high_limit: float = float("inf")  # the grid's top must stay at or below this (a Clip the runtime folds into the Q)
    same_as: str = ""  # another point whose scale and zero point this one shares (through a Reshape, MaxPool...)
    candidates: dict = field(default_factory=dict)  # method -> (scale, zero point), chosen by region error


@dataclass
class WeightResult:
    """What the QDQ writer deploys for one weight: integers and the grid size s1."""

    spec: WeightSpec
    integers: np.ndarray  # int32, weight layout, as stored (unsigned when there is a zero point)
    scale: np.ndarray  # float32, [Cout] or 0-d; block-wise the weight's rank with ceil(K / block_size) on in_axis
    bits: int
    block_size: int = 0
    zero_point: Optional[np.ndarray] = None  # int32 in scale's shape: asymmetric (unsigned) weights; None = symmetric
    bias: Optional[np.ndarray] = None  # float32: the op's corrected bias (bias correction), None = as in the model


@dataclass
class RegionReport:
    """One row of the summary table: the region's output error under RTN and after learning."""

    index: int
    name: str
    kind: str
    nodes: int
    weights: list
    loss_form: str  # gram | direct | closed-form | none
    rtn_mse: Optional[float] = None
    final_mse: Optional[float] = None  # of what is deployed (RTN when learning did not help)
    learned_mse: Optional[float] = None
    gptq_mse: Optional[float] = None  # GPTQ's rounding, the judge's third candidate (one-op regions)
    bias_mse: Optional[float] = None  # the deployed weights with the corrected bias
    bias_corrected: bool = False  # the corrected bias is deployed (bias_mse was below the uncorrected error)
    iters: int = 0
    seconds: float = 0.0
    status: str = ""
    act_ranges: dict = field(default_factory=dict)  # activation -> range method kept (calib auto)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Context:
    """State the passes share during one run (DESIGN §1)."""

    config: "QuantConfig"
    target: "Target"
    method: "Method"
    calibration_source: Any = None  # what the user passed; LoadCalibrationPass turns it into ``calibration``
    calibration_options: dict = field(default_factory=dict)  # preprocess, tokenizer, max_length
    calibration: Any = None  # a CalibrationSet
    fp_model: Optional[onnx.ModelProto] = None  # the prepared FP32 model (the reference)
    traits: ModelTraits = field(default_factory=ModelTraits)
    device: str = "cpu"
    quantize_nodes: set = field(default_factory=set)
    tensor_sizes: dict = field(default_factory=dict)
    batching: Optional[Batching] = None  # each tensor's batch layout (partition's probe)
    regions: list = field(default_factory=list)
    region_mode: str = ""  # layer | block, as resolved from the config (auto) by the partition pass
    act_points: dict = field(default_factory=dict)
    weight_results: dict = field(default_factory=dict)
    region_reports: list = field(default_factory=list)
    final_outputs: dict = field(default_factory=dict)
    stream_peak_bytes: int = 0
    qdq_model: Optional[onnx.ModelProto] = None
    summary: dict = field(default_factory=dict)  # measured by the validate pass
    violations: list = field(default_factory=list)  # the target's rule check
    notes: list = field(default_factory=list)  # report lines: what stays FP32 and why, beyond the region table
    pass_seconds: dict = field(default_factory=dict)  # pass name -> wall time
    pass_peak_rss_mb: dict = field(default_factory=dict)  # pass name -> peak RSS of the run when it ended
