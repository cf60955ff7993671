"""QuantConfig: every knob of a quantization run, with presets that fix the reconstruction budget."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from .errors import OnnxflexError
from .methods import get_method
from .runtime.cpu import int8_kernels_saturate
from .targets import get_target

REGION_MODES = ("auto", "layer", "block")
CALIB_METHODS = ("auto", "percentile", "mse", "minmax")
STREAM_PRECISIONS = ("float16", "float32")

# iterations per region, mini-batch size, FlexRound lr, AdaRound lr, activation-step (LSQ) lr, FlexRound S2's
# lr as a multiple of lr, held-out checks per region (early stopping). Longer schedules let the per-weight S2
# overfit the calibration set (EfficientNet-Lite0 W4A8, bench/results/ablation_cnn_*: 1000 iterations at
# the full S2 rate end below 200); a slower S2 plus keeping the best held-out point put them above it.
PRESETS = {
    "fast": dict(iters=200, batch_size=32, lr=3e-3, adaround_lr=1e-3, act_lr=4e-5, element_lr_scale=1.0, checks=0),
    "default": dict(iters=1000, batch_size=32, lr=3e-3, adaround_lr=1e-3, act_lr=4e-5, element_lr_scale=0.3,
                    checks=10),
    "paper": dict(iters=20000, batch_size=32, lr=3e-3, adaround_lr=1e-3, act_lr=4e-5, element_lr_scale=0.3,
                  checks=20),
}


@dataclass
class QuantConfig:
    """What to quantize and how. ``None`` fields take their value from ``preset``."""

    method: str = "flexround"
    weight_bits: int = 8
    act_bits: int = 8  # 0 = weight-only
    granularity: str = "channel"  # channel | tensor (weight scales)
    # MatMul/Gemm weights: one scale per block of this many input rows per output channel (0 = per channel);
    # written as a blocked DequantizeLinear (opset 21), which onnxruntime runs as MatMulNBits
    block_size: int = 0
    # weight-only: an integer zero point per channel/block (uint4/uint8 weights; onnxruntime, not TensorRT)
    asymmetric: bool = False
    regions: str = "auto"  # auto | layer | block
    preset: str = "fast"
    iters: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    act_lr: Optional[float] = None
    drop_prob: Optional[float] = None  # QDrop: P(feed FP input), rounded to 1/256; default 0.5 when activations are quantized
    calib_size: int = 256  # calibration samples (images, for a folder)
    augment: int = 0  # extra random-crop views per calibration image
    # activation range: auto (minmax in attention models, else percentile: passes/calibrate.py) |
    # percentile | mse | minmax
    calib_method: str = "auto"
    percentile: float = 99.99
    first_last_bits: Optional[int] = 8  # first and last weighted op stay at this many bits; None = same as weights
    quantize_act_matmul: bool = False  # activation x activation MatMul (attention) inputs
    quantize_residual: Optional[bool] = None  # Q/DQ on residual Add inputs; None = not in attention models
    exclude: list = field(default_factory=list)  # node names kept in FP32
    # cross-layer equalization of Conv -> Relu/ReLU6 -> Conv chains before calibration (passes/equalize.py),
    # function-preserving (a ReLU6 channel moves only while its clip stays exact on the calibration data)
    cle: bool = False
    # activation-aware scaling of MatMul weights into the gain / up projection that feeds them
    # (passes/awq_scale.py), function-preserving. Off by default: on SmolLM2 W4 b128 it raised RTN's
    # perplexity (31.46 -> 33.04) although it lowered every group's rounding error on the calibration text
    awq: bool = False
    # ablation switches (bench/ablation_cnn.py): keep a region's RTN weights when its learned weights do
    # worse on the held-out calibration samples; learn only weights with enough calibration rows
    judge: bool = True
    row_guard: bool = True
    # the judge also weighs GPTQ's closed-form rounding of each one-op region (same Gram statistics, same
    # grid) and keeps whichever of RTN, GPTQ and the learned rounding does best held out. None: yes,
    # except for decoder LMs, where it lowered region errors on held-out calibration windows but raised
    # perplexity on other text (README, "Decoder LM")
    gptq_candidate: Optional[bool] = None
    # GPTQ (the candidate and --method gptq) tries each per-channel grid at several multiples of its initial
    # scale (quantizers/gptq.py, SEARCH_RATIOS) and keeps, per output channel, the one with the lowest Gram
    # loss on the training samples: a clipping choice made on the layer's output error, not the weights alone
    gptq_grid_search: bool = True
    # GPTQ's damping, as a fraction of the mean diagonal of G (a ridge towards round-to-nearest): GPTQ's own
    # 0.01. On EfficientNet-Lite0 W4A8 0.1 moved val SQNR within the seeds' spread (README, "GPTQ's grid search")
    gptq_damp: float = 0.01
    # a one-op region whose op has a bias (Conv, Gemm) gets the bias that cancels its rounding's mean output
    # error on the deployed calibration inputs (closed form from the Gram statistics), kept where the
    # held-out samples confirm it. Off by default: on EfficientNet-Lite0 W4A8 it lowered 43 of 49 region
    # errors held out and raised the output SQNR on the training images by 0.8-1.2 dB, but not on images
    # the fit never saw (README, "Bias correction")
    bias_correction: bool = False
    # a conv's Gram statistics read about this many output positions over all fitted samples: every k-th output
    # row of a larger map (the sums scaled back; 0: every row). 700 000 is 224 images of 56x56: on
    # EfficientNet-Lite0 W4A8 with 256 images the 112x112 layers read every 4th row, their regions took 20.2
    # instead of 24.6 s, and val and held-out errors stayed within the seeds' spread; 64 images read every row
    # (README, "Where a Lite0 W4A8 fast run's time goes")
    gram_positions: int = 700_000
    # learning rate of FlexRound's per-weight S2 as a multiple of --lr; held-out checks per region
    # (early stopping: the parameters with the lowest held-out error along the schedule are kept)
    element_lr_scale: Optional[float] = None
    checks: Optional[int] = None
    device: str = "auto"  # auto | cpu | cuda
    tf32: bool = False  # CUDA: allow TF32 convolutions/matmuls (faster; results drift further from a CPU run)
    seed: int = 0
    max_memory: float = 3.0  # GiB of live calibration tensors held in RAM before spilling to files (both streams)
    # how the reconstruction streams hold float32 tensors: float16 halves them (measured in
    # bench/stream_precision.py), float32 keeps every bit
    stream_precision: str = "float16"
    target: str = "tensorrt"  # tensorrt | ort-cpu: where activation Q/DQ go, their type, the rule check
    # ort-cpu with 8-bit activations: int8 weights on the 7-bit grid [-63, 63], so onnxruntime's u8s8 kernels
    # do not saturate on x86 CPUs without VNNI (runtime/cpu.py). None: on when the quantizing machine is one
    reduce_range: Optional[bool] = None
    progress: bool = True

    def resolved(self) -> "QuantConfig":
        """Return a validated copy with preset values filled in."""
        method = get_method(self.method)
        get_target(self.target)
        if self.preset not in PRESETS:
            raise OnnxflexError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.regions not in REGION_MODES:
            raise OnnxflexError(f"unknown region mode {self.regions!r}; choose one of {', '.join(REGION_MODES)}")
        if self.granularity not in ("channel", "tensor"):
            raise OnnxflexError(f"unknown granularity {self.granularity!r}; choose channel or tensor")
        if self.calib_method not in CALIB_METHODS:
            raise OnnxflexError(f"unknown calibration method {self.calib_method!r}; choose one of {', '.join(CALIB_METHODS)}")
        if self.weight_bits not in (2, 3, 4, 8):
            raise OnnxflexError(f"--weight-bits {self.weight_bits} is not supported; use 8, 4, 3 or 2")
        if self.act_bits not in (0, 8, 16):
            raise OnnxflexError(f"--act-bits {self.act_bits} is not supported; use 8, 16 or 0 (weight-only)")
        if self.block_size and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise OnnxflexError(f"--block-size {self.block_size} is not supported; use 0 (per channel) or a power of two "
                                "from 16 (32, 64, 128 are usual)")
        if self.block_size and self.granularity != "channel":
            raise OnnxflexError("--block-size needs --granularity channel (blocks split each output channel)")
        if self.stream_precision not in STREAM_PRECISIONS:
            raise OnnxflexError(f"unknown stream precision {self.stream_precision!r}; choose one of "
                                f"{', '.join(STREAM_PRECISIONS)}")
        if not self.max_memory >= 0:
            raise OnnxflexError("--max-memory must be 0 or more (GiB; 0 keeps every stream tensor in a file)")
        if not self.gptq_damp > 0:
            raise OnnxflexError("--gptq-damp must be above 0 (a fraction of the mean diagonal of XᵀX, e.g. 0.01 or 0.1)")
        if self.gram_positions < 0:
            raise OnnxflexError("--gram-positions must be 0 (every output position) or more")
        if self.calib_size < 1:
            raise OnnxflexError("--calib-size must be at least 1")
        if self.asymmetric and self.act_bits:
            raise OnnxflexError("--asymmetric is for weight-only runs; add --act-bits 0 (W8A8 weights are symmetric)")
        if self.asymmetric and not get_target(self.target).weight_zero_points:
            raise OnnxflexError(f"--asymmetric weights need zero points, which {self.target} does not take; "
                                "use --target ort-cpu, or drop --asymmetric")
        cfg = dataclasses.replace(self)
        applies = self.target == "ort-cpu" and self.act_bits == 8
        if self.reduce_range and not applies:
            raise OnnxflexError("--reduce-range is for --target ort-cpu with --act-bits 8 (onnxruntime's u8 x s8 CPU "
                                "kernels); drop it")
        cfg.reduce_range = applies and (int8_kernels_saturate() if self.reduce_range is None else self.reduce_range)
        p = PRESETS[self.preset]
        if cfg.iters is None:
            cfg.iters = p["iters"]
        if cfg.batch_size is None:
            cfg.batch_size = p["batch_size"]
        if cfg.lr is None and method.lr is not None:
            cfg.lr = method.lr(p)
        if cfg.act_lr is None:
            cfg.act_lr = p["act_lr"]
        if cfg.element_lr_scale is None:
            cfg.element_lr_scale = p["element_lr_scale"]
        if cfg.checks is None:
            cfg.checks = p["checks"]
        if cfg.drop_prob is None:
            cfg.drop_prob = 0.5 if cfg.act_bits > 0 else 0.0
        if method.fit != "adam":  # nothing to iterate: RTN, or a closed-form solve
            cfg.iters = 0
        if not cfg.element_lr_scale >= 0 or cfg.checks < 0:
            raise OnnxflexError("--element-lr-scale and --checks must be 0 or more")
        if not 0.0 <= cfg.drop_prob <= 1.0:
            raise OnnxflexError("--drop-prob must be between 0 and 1")
        return cfg
