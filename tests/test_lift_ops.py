"""Every lifted op must reproduce ONNX Runtime on a one-node model (FP32 within 1e-4, ints exact).

If a lifting drifts from ORT, FlexRound would "correct" the drift by bending the weights, so each
op and each attribute/opset form that changes the layout gets its own case here.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.helper as oh
import onnxruntime as ort
import pytest
import torch

from onnxflex.lift import NUM_OUTPUTS, OPS, is_supported, node_attrs, numpy_to_torch

RNG = np.random.default_rng(0)
INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


def f(*shape, lo=None, hi=None):
    """Random float32; uniform in [lo, hi] when given, else standard normal."""
    if lo is not None:
        return RNG.uniform(lo, hi, size=shape).astype(np.float32)
    return RNG.standard_normal(shape).astype(np.float32)


def i64(v):
    return np.array(v, dtype=np.int64)


def b(*shape):
    return RNG.random(shape) > 0.5


CASES = []


def case(op, inputs, attrs=None, opset=17, n_out=1, label=""):
    """Register a one-node test: ``inputs`` in ONNX order, None = omitted optional input."""
    cid = f"{op}-{label or len([c for c in CASES if c.id.startswith(op + '-')])}-op{opset}"
    CASES.append(pytest.param(op, inputs, attrs or {}, opset, n_out, id=cid))


# --- conv / linear algebra -------------------------------------------------------------------
case("Conv", [f(1, 3, 8, 8), f(4, 3, 3, 3), f(4)], dict(pads=[1, 1, 1, 1]), label="pad1")
case("Conv", [f(1, 3, 9, 9), f(4, 3, 3, 3)], dict(strides=[2, 2]), label="stride2-nobias")
case("Conv", [f(1, 4, 6, 6), f(6, 2, 3, 3), f(6)], dict(group=2, pads=[1, 1, 1, 1]), label="grouped")
case("Conv", [f(1, 4, 7, 7), f(4, 1, 3, 3), f(4)], dict(group=4, pads=[1, 1, 1, 1]), label="depthwise")
case("Conv", [f(1, 2, 9, 9), f(3, 2, 3, 3), f(3)], dict(dilations=[2, 2], pads=[2, 2, 2, 2]), label="dilated")
case("Conv", [f(1, 2, 8, 8), f(3, 2, 3, 3), f(3)], dict(auto_pad="SAME_UPPER", strides=[2, 2]), label="same-upper-asym")
case("Conv", [f(1, 2, 8, 8), f(3, 2, 3, 3), f(3)], dict(auto_pad="SAME_LOWER", strides=[2, 2]), label="same-lower-asym")
case("Conv", [f(1, 2, 7, 7), f(3, 2, 3, 3)], dict(auto_pad="SAME_UPPER"), label="same-upper-sym")
case("Conv", [f(1, 2, 7, 7), f(3, 2, 3, 3)], dict(auto_pad="VALID"), label="valid")
case("Conv", [f(1, 2, 7, 7), f(3, 2, 3, 3)], dict(pads=[0, 1, 2, 0]), label="explicit-asym")
case("Conv", [f(1, 2, 10), f(3, 2, 3), f(3)], dict(pads=[1, 1]), label="1d")
case("Conv", [f(1, 2, 4, 4, 4), f(2, 2, 3, 3, 3)], dict(pads=[1] * 6), label="3d")
case("ConvTranspose", [f(1, 3, 4, 4), f(3, 2, 3, 3), f(2)], dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), label="s2-outpad")
case("ConvTranspose", [f(1, 3, 4, 4), f(3, 2, 3, 3), f(2)], dict(strides=[2, 2], pads=[0, 1, 1, 0]), label="asym-pads")
case("ConvTranspose", [f(1, 4, 4, 4), f(4, 1, 3, 3), f(2)], dict(group=2, dilations=[2, 2]), label="grouped-dilated")
case("ConvTranspose", [f(1, 3, 4, 4), f(3, 2, 3, 3)], dict(strides=[2, 2], output_shape=[8, 8]), label="output-shape")
case("ConvTranspose", [f(1, 3, 4, 4), f(3, 2, 2, 2)], dict(strides=[2, 2], auto_pad="SAME_UPPER"), label="same-upper")
case("ConvTranspose", [f(1, 3, 5, 5), f(3, 2, 3, 3)], dict(strides=[2, 2], auto_pad="SAME_LOWER"), label="same-lower")
case("ConvTranspose", [f(1, 3, 6), f(3, 2, 4), f(2)], dict(strides=[3], pads=[1, 2]), label="1d")
case("Gemm", [f(3, 4), f(4, 5), f(5)], label="bias")
case("Gemm", [f(4, 3), f(5, 4), f(3, 5)], dict(transA=1, transB=1, alpha=0.5, beta=2.0), label="trans-alpha-beta")
case("Gemm", [f(3, 4), f(5, 4)], dict(transB=1), label="noC")
case("Gemm", [f(3, 4), f(4, 5), f(1)], dict(beta=0.25), label="scalarC")
case("MatMul", [f(2, 3, 4), f(4, 5)], label="batched")
case("MatMul", [f(2, 1, 3, 4), f(5, 4, 6)], label="broadcast")
case("MatMul", [f(4), f(4, 5)], label="vec-mat")
case("MatMul", [f(3, 4), f(4)], label="mat-vec")
case("Einsum", [f(2, 3, 4), f(2, 4, 5)], dict(equation="bij,bjk->bik"), label="bmm")
case("Einsum", [f(3, 4)], dict(equation="ij->ji"), label="transpose")
case("Einsum", [f(2, 3, 4), f(4)], dict(equation="...j,j->..."), label="ellipsis")

# --- elementwise -------------------------------------------------------------------------------
for _op in ("Add", "Sub", "Mul", "Div"):
    case(_op, [f(2, 3, 4), f(3, 1)], label="bcast")
    case(_op, [i64([7, -7, 5, -5, 9]), i64([2, 2, -3, -3, 9])], label="int64")
case("Pow", [f(2, 3, lo=0.5, hi=2.0), f(2, 3, lo=-2, hi=2)], label="float")
case("Pow", [f(2, 3), i64([2])], label="int-exponent")
for _op in ("Relu", "Sigmoid", "Tanh", "Erf", "HardSwish", "Neg", "Exp", "Abs", "Floor", "Ceil", "Sign",
            "Sin", "Cos", "Softplus", "Softsign", "Identity"):
    case(_op, [f(2, 3, 5) * 3])
for _op in ("Sqrt", "Log", "Reciprocal"):
    case(_op, [f(2, 3, 5, lo=0.1, hi=4.0)])
case("Round", [np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.4, -0.6], np.float32)], label="half-even")
case("Neg", [i64([3, -4, 0])], label="int64")
case("Abs", [i64([3, -4, 0])], label="int64")
case("Identity", [i64([3, -4, 0])], label="int64")
case("LeakyRelu", [f(2, 8)], label="default")
case("LeakyRelu", [f(2, 8)], dict(alpha=0.2), label="alpha")
case("PRelu", [f(1, 3, 4, 4), f(3, 1, 1)], label="per-channel")
case("Elu", [f(2, 8)], dict(alpha=0.7))
case("Selu", [f(2, 8)])
case("HardSigmoid", [f(4, 8) * 4], label="default")
case("HardSigmoid", [f(4, 8) * 4], dict(alpha=1 / 6, beta=0.5), label="alpha-beta")
case("Gelu", [f(3, 7) * 2], opset=20, label="exact")
case("Gelu", [f(3, 7) * 2], dict(approximate="tanh"), opset=20, label="tanh")
case("Clip", [f(3, 8) * 3, np.float32(-1.0), np.float32(2.0)], label="min-max")
case("Clip", [f(3, 8) * 3, np.float32(0.0)], label="min-only")
case("Clip", [f(3, 8) * 3, None, np.float32(1.5)], label="max-only")
case("Clip", [f(3, 8) * 3], label="none")
case("Clip", [f(3, 8) * 3], dict(min=-0.5, max=0.5), opset=6, label="attrs")
case("Clip", [i64([-5, 0, 3, 10]), np.int64(0), np.int64(6)], label="int64")
case("Where", [b(2, 3, 4), f(2, 3, 4), f(3, 1)], label="bcast")
case("Where", [b(3), i64([1, 2, 3]), i64([-1, -2, -3])], label="int64")
for _op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"):
    case(_op, [np.round(f(3, 4)), np.round(f(1, 4))], label="float")
    case(_op, [i64([1, 2, 3, 4]), i64([3, 2, 1, 4])], label="int64")
for _op in ("And", "Or", "Xor"):
    case(_op, [b(3, 4), b(4)])
case("Not", [b(3, 4)])
for _op in ("Min", "Max", "Sum", "Mean"):
    case(_op, [f(2, 3, 4), f(3, 1), f(4)], label="3-inputs")
    case(_op, [f(2, 3)], label="1-input")
case("Max", [i64([1, 5, -3]), i64([2, 2, 2])], label="int64")
_special = np.array([[0.5, np.nan, np.inf], [-np.inf, -2.0, np.nan]], np.float32)
case("IsNaN", [_special])
case("IsInf", [_special], label="both")
case("IsInf", [_special], dict(detect_negative=0), label="positive")
case("IsInf", [_special], dict(detect_positive=0), label="negative")
case("Cast", [f(3, 4) * 5], dict(to=onnx.TensorProto.INT64), label="float-to-int64")
case("Cast", [i64([1, -2, 3])], dict(to=onnx.TensorProto.FLOAT), label="int64-to-float")
case("Cast", [f(3, 4) * 100], dict(to=onnx.TensorProto.FLOAT16), label="to-fp16")
case("Cast", [f(3, 4)], dict(to=onnx.TensorProto.DOUBLE), label="to-double")
case("Cast", [np.array([0.0, 1.5, -2.0, 0.0], np.float32)], dict(to=onnx.TensorProto.BOOL), label="to-bool")
case("Cast", [i64([1, -2, 3])], dict(to=onnx.TensorProto.INT32), label="to-int32")
case("CastLike", [i64([1, -2, 3]), f(1)], label="int-like-float")
case("Dropout", [f(3, 4)], label="single")
case("Dropout", [f(3, 4), np.float32(0.5)], n_out=2, label="mask")

# --- normalisation / softmax -----------------------------------------------------------------
case("Softmax", [f(2, 3, 5) * 3], label="default-axis")
case("Softmax", [f(2, 3, 5) * 3], dict(axis=1), label="axis1")
case("Softmax", [f(2, 3, 5) * 3], dict(axis=-2), opset=13, label="neg-axis")
case("Softmax", [f(2, 3, 5) * 3], dict(axis=1), opset=11, label="coerce2d")
case("Softmax", [f(2, 3, 5) * 3], opset=11, label="coerce2d-default")
case("LogSoftmax", [f(2, 3, 5) * 3], dict(axis=1), label="axis1")
case("LogSoftmax", [f(2, 3, 5) * 3], dict(axis=1), opset=11, label="coerce2d")
case("LayerNormalization", [f(2, 3, 8), f(8), f(8)], label="last-axis")
case("LayerNormalization", [f(2, 4, 5) * 2 + 1, f(4, 5)], dict(axis=1, epsilon=1e-3), label="axis1-nobias")
case("LayerNormalization", [f(2, 3, 8), f(8), f(8)], n_out=3, label="mean-invstd")
case("BatchNormalization", [f(2, 3, 4, 4), f(3), f(3), f(3), f(3, lo=0.5, hi=2)], label="4d")
case("BatchNormalization", [f(5, 3), f(3), f(3), f(3), f(3, lo=0.5, hi=2)], dict(epsilon=1e-3), label="2d")
case("InstanceNormalization", [f(2, 3, 4, 4), f(3), f(3)])

# --- reductions / pooling --------------------------------------------------------------------
x4 = f(2, 3, 4, 5)
case("ReduceMean", [x4], dict(axes=[2, 3]), label="axes-attr")
case("ReduceMean", [x4], dict(axes=[-1], keepdims=0), label="keepdims0")
case("ReduceMean", [x4], label="all")
case("ReduceMean", [x4, i64([1, -1])], opset=18, label="axes-input")
case("ReduceMean", [x4, i64([2])], dict(keepdims=0), opset=21, label="axes-input-kd0")
case("ReduceMean", [x4], dict(noop_with_empty_axes=1), opset=18, label="noop")
case("ReduceSum", [x4, i64([1])], label="axes-input")
case("ReduceSum", [x4], dict(axes=[0, 2], keepdims=0), opset=11, label="axes-attr")
case("ReduceSum", [i64([[1, 2], [3, 4]]), i64([0])], dict(keepdims=0), label="int64")
case("ReduceSum", [x4], label="all")
case("ReduceMax", [x4], dict(axes=[1]), label="attr")
case("ReduceMax", [x4, i64([-1])], dict(keepdims=0), opset=18, label="input")
case("ReduceMin", [x4], dict(axes=[1]), label="attr")
case("ReduceMin", [x4, i64([2, 3])], opset=18, label="input")
case("ReduceSumSquare", [x4], dict(axes=[1]))
case("ReduceL2", [x4], dict(axes=[3], keepdims=0))
case("ReduceProd", [x4], dict(axes=[1, 3]), label="attr")
case("ReduceProd", [i64([[1, 2], [3, 4]]), i64([1])], dict(keepdims=0), opset=18, label="int64-input")
case("ReduceL1", [x4], dict(axes=[2], keepdims=0))
# CumSum: the decoders' position ids are cumsum(attention_mask) - 1 on int64
case("CumSum", [f(2, 3, 4), np.int64(1)], label="float")
case("CumSum", [i64([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), i64(-1)], label="int64-mask")
case("CumSum", [f(2, 5), np.int32(1)], dict(exclusive=1), label="exclusive-int32-axis")
case("CumSum", [f(2, 5), i64([0])], dict(reverse=1), label="reverse")
case("CumSum", [i64([[1, 2, 3], [4, 5, 6]]), np.int64(1)], dict(exclusive=1, reverse=1), label="exclusive-reverse")
case("CumSum", [np.array([1, 2, 3], np.int32), np.int64(0)], label="int32")
case("GlobalAveragePool", [f(2, 3, 5, 6)])
case("GlobalAveragePool", [f(2, 3, 7)], label="1d")
case("GlobalMaxPool", [f(2, 3, 5, 6)])
case("AveragePool", [f(1, 2, 8, 8)], dict(kernel_shape=[2, 2], strides=[2, 2]), label="k2s2")
case("AveragePool", [f(1, 2, 7, 7)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), label="pad-excl")
case("AveragePool", [f(1, 2, 7, 7)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1), label="pad-incl")
case("AveragePool", [f(1, 2, 8, 8)], dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), label="ceil")
case("AveragePool", [f(1, 2, 8, 8)], dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, pads=[1, 1, 1, 1], count_include_pad=1), label="ceil-pad-incl")
case("AveragePool", [f(1, 2, 7, 7)], dict(kernel_shape=[3, 3], pads=[0, 1, 2, 0]), label="asym-pads")
case("AveragePool", [f(1, 2, 8, 8)], dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"), label="same-upper")
case("AveragePool", [f(1, 1, 5, 5)], dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1), label="ceil-drop-last")
case("MaxPool", [f(1, 1, 5, 5)], dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1), label="ceil-drop-last")
case("MaxPool", [f(1, 2, 8, 8)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1), label="ceil-pad")
case("AveragePool", [f(1, 2, 9)], dict(kernel_shape=[3], strides=[2], pads=[1, 1]), label="1d")
case("MaxPool", [f(1, 2, 8, 8)], dict(kernel_shape=[2, 2], strides=[2, 2]), label="k2s2")
case("MaxPool", [f(1, 2, 7, 7)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), label="pad1")
case("MaxPool", [f(1, 2, 8, 8)], dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), label="ceil")
case("MaxPool", [f(1, 2, 9, 9)], dict(kernel_shape=[3, 3], dilations=[2, 2]), label="dilated")
case("MaxPool", [f(1, 2, 8, 8)], dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"), label="same-upper")
case("MaxPool", [f(1, 2, 7, 7)], dict(kernel_shape=[3, 3], pads=[0, 1, 2, 0]), label="asym-pads")
case("MaxPool", [f(1, 2, 9)], dict(kernel_shape=[3], strides=[2]), label="1d")

# --- shape manipulation ------------------------------------------------------------------------
case("Reshape", [f(2, 3, 4), i64([0, -1])], label="zero-copies")
case("Reshape", [f(2, 3, 4), i64([4, -1, 2])], label="infer")
case("Reshape", [f(2, 3, 4), i64([6, 4])], dict(allowzero=1), label="allowzero")
case("Reshape", [i64([[1, 2, 3], [4, 5, 6]]), i64([-1])], label="int64")
for _ax in (0, 1, 2, -1):
    case("Flatten", [f(2, 3, 4)], dict(axis=_ax), label=f"axis{_ax}")
case("Transpose", [f(2, 3, 4)], dict(perm=[1, 2, 0]), label="perm")
case("Transpose", [f(2, 3, 4)], label="default")
case("Concat", [f(2, 3), f(2, 5)], dict(axis=1), label="axis1")
case("Concat", [f(2, 3), f(1, 3), f(4, 3)], dict(axis=-2), label="neg-axis")
case("Concat", [i64([1, 2]), i64([3]), i64([-1])], dict(axis=0), label="int64")
case("Split", [f(2, 7), i64([3, 4])], dict(axis=1), n_out=2, label="sizes-input")
case("Split", [f(6, 2)], n_out=3, label="equal")
case("Split", [f(2, 7)], dict(axis=1, split=[2, 5]), opset=11, n_out=2, label="sizes-attr")
case("Split", [f(2, 7)], dict(axis=-1, num_outputs=3), opset=18, n_out=3, label="num-outputs-uneven")
xs = f(4, 6, 5)
case("Slice", [xs, i64([1, 2]), i64([3, 5]), i64([0, 1])], label="basic")
case("Slice", [xs, i64([-3]), i64([INT64_MAX]), i64([-1])], label="neg-start-intmax")
case("Slice", [xs, i64([0, 5]), i64([6, 0]), i64([1, 2]), i64([2, -2])], label="steps")
case("Slice", [xs, i64([-1]), i64([INT64_MIN]), i64([1]), i64([-1])], label="reverse")
case("Slice", [xs, i64([1, 1]), i64([-1, 100])], label="no-axes")
case("Slice", [xs, i64([10]), i64([20]), i64([0])], label="empty")
case("Slice", [xs], dict(starts=[1], ends=[-1], axes=[2]), opset=9, label="attrs")
case("Slice", [i64([2, 3, 4, 5]), i64([1]), i64([3])], label="int64-shape")
case("Gather", [f(5, 3), i64([0, -1, 2])], label="axis0-neg")
case("Gather", [f(2, 5, 3), i64([[1, 0], [4, -2]])], dict(axis=1), label="2d-indices")
case("Gather", [f(2, 5, 3), np.int64(-1)], dict(axis=-1), label="scalar")
case("Gather", [i64([1, 3, 224, 224]), np.int64(0)], label="shape-scalar")
case("GatherElements", [f(3, 4), i64([[0, 1, -1, 2]] * 3)], dict(axis=1))
case("GatherND", [f(2, 3, 4), i64([[0, 1], [1, -1]])], label="pairs")
case("GatherND", [f(2, 3, 4), i64([[[1], [0]], [[2], [1]]])], dict(batch_dims=1), label="batch-dims")
case("GatherND", [f(2, 3), i64([[0, 2], [1, 0], [1, 1]])], label="to-scalars")
case("ScatterND", [f(4, 3), i64([[2], [0]]), f(2, 3)], label="rows")
case("ScatterND", [f(2, 3, 4), i64([[0, 1, 2], [1, 2, -1]]), f(2)], label="elements-neg")
case("ScatterND", [f(2, 3, 4), i64([[[0, 1]], [[1, 0]]]), f(2, 1, 4)], label="batched-idx")
case("ScatterND", [i64([1, 2, 3, 4]), i64([[3], [1]]), i64([9, 8])], label="int64")
case("ScatterND", [f(4, 3), i64([[1], [1], [3]]), f(3, 3)], dict(reduction="add"), opset=16, label="add-dup")
case("ScatterND", [f(4, 3), i64([[1], [3]]), f(2, 3)], dict(reduction="mul"), opset=16, label="mul")
case("ScatterND", [f(4, 3), i64([[1], [1], [3]]), f(3, 3)], dict(reduction="max"), opset=18, label="max-dup")
case("ScatterND", [f(4, 3), i64([[0], [3]]), f(2, 3)], dict(reduction="min"), opset=18, label="min")
case("Trilu", [f(2, 4, 5)], label="upper")
case("Trilu", [f(2, 4, 5), np.int64(1)], dict(upper=0), label="lower-k1")
case("Trilu", [f(5, 4), np.int64(-2)], label="upper-kneg")
case("Trilu", [i64(np.arange(12).reshape(3, 4))], dict(upper=0), label="int64")
case("Trilu", [np.ones((3, 3), bool), np.int64(1)], label="bool-causal")
case("Unsqueeze", [f(3, 4), i64([0, -1])], label="input-axes")
case("Unsqueeze", [np.int64(7), i64([0])], label="scalar")
case("Unsqueeze", [f(3, 4)], dict(axes=[1, 3]), opset=11, label="attr-axes")
case("Squeeze", [f(1, 3, 1, 4), i64([2])], label="input-axes")
case("Squeeze", [f(1, 3, 1, 4)], label="all")
case("Squeeze", [f(1, 3, 1, 4)], dict(axes=[0, -2]), opset=11, label="attr-axes")
case("Pad", [f(1, 2, 3, 4), i64([0, 0, 1, 2, 0, 0, 2, 1]), np.float32(1.5)], label="constant-value")
case("Pad", [f(1, 2, 3, 4), i64([0, 0, 1, 2, 0, 0, 2, 1])], label="constant-zero")
case("Pad", [f(1, 2, 4, 5), i64([0, 0, 1, 2, 0, 0, 2, 1])], dict(mode="reflect"), label="reflect")
case("Pad", [f(1, 2, 4, 5), i64([0, 1, 1, 2, 0, 0, 2, 1])], dict(mode="edge"), label="edge")
case("Pad", [f(1, 2, 4, 5), i64([0, 0, -1, 1, 0, 0, 1, -2])], label="negative")
case("Pad", [f(1, 2, 4, 5), i64([1, 2, 2, 1]), None, i64([1, 3])], opset=18, label="axes")
case("Pad", [f(2, 4, 5), i64([0, 1, 2, 0, 2, 1])], dict(mode="wrap"), opset=19, label="wrap")
case("Pad", [f(1, 2, 3, 4)], dict(pads=[0, 0, 1, 1, 0, 0, 1, 1], value=-1.0), opset=2, label="attrs")
case("Pad", [f(2, 6), i64([0, 3, 0, 2])], dict(mode="reflect"), label="reflect-2d")
case("Expand", [f(3, 1), i64([2, 3, 4])], label="grow")
case("Expand", [f(3, 4), i64([1, 4])], label="bidirectional")
case("Tile", [f(2, 3), i64([2, 3])])
case("Shape", [f(2, 3, 4)], label="full")
case("Shape", [f(2, 3, 4, 5)], dict(start=1), label="start")
case("Shape", [f(2, 3, 4, 5)], dict(start=-3, end=-1), label="start-end")
case("Size", [f(2, 3, 4)])
case("ConstantOfShape", [i64([2, 3])], label="default")
case("ConstantOfShape", [i64([2, 3])], dict(value=np.array([1.5], np.float32)), label="float")
case("ConstantOfShape", [i64([4])], dict(value=np.array([7], np.int64)), label="int64")
case("Range", [np.int64(1), np.int64(10), np.int64(3)], label="int64")
case("Range", [np.float32(0.5), np.float32(3.0), np.float32(0.5)], label="float")
case("Range", [np.int64(5), np.int64(1), np.int64(-2)], label="negative")
case("Constant", [], dict(value=f(2, 3)), label="tensor")
case("Constant", [], dict(value=i64([1, -1])), label="int-tensor")
case("Constant", [], dict(value_float=2.5), label="float")
case("Constant", [], dict(value_ints=[3, 4]), label="ints")
case("Constant", [], dict(value_int=3), label="int")

# --- Resize ------------------------------------------------------------------------------------
xr = f(1, 2, 4, 5)
_NO = None  # omitted roi
case("Resize", [xr, _NO, np.array([1, 1, 2, 2], np.float32)], dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"), label="nearest-asym-floor")
case("Resize", [xr, _NO, np.array([1, 1, 1.5, 1.7], np.float32)], dict(mode="nearest"), label="nearest-default")
case("Resize", [xr, _NO, None, i64([1, 2, 3, 3])], dict(mode="nearest"), label="nearest-sizes-down")
case("Resize", [xr, _NO, np.array([1, 1, 2.5, 1.5], np.float32)], dict(mode="nearest", nearest_mode="round_prefer_ceil"), label="nearest-prefer-ceil")
case("Resize", [xr, _NO, np.array([1, 1, 1.5, 2.0], np.float32)], dict(mode="nearest", nearest_mode="ceil", coordinate_transformation_mode="align_corners"), label="nearest-ceil-align")
case("Resize", [xr, np.zeros(0, np.float32), np.array([1, 1, 2, 2], np.float32)], dict(mode="nearest", coordinate_transformation_mode="tf_half_pixel_for_nn"), opset=11, label="nearest-tf-half-pixel")
case("Resize", [xr, np.array([1, 1, 2, 2], np.float32)], dict(mode="nearest"), opset=10, label="opset10-nearest")
case("Resize", [xr, np.array([1, 1, 0.6, 0.6], np.float32)], dict(mode="nearest"), opset=10, label="opset10-nearest-down")
case("Resize", [xr, np.array([1, 1, 2, 1.5], np.float32)], dict(mode="linear"), opset=10, label="opset10-linear")
case("Resize", [xr, _NO, np.array([1, 1, 2, 2], np.float32)], dict(mode="linear"), label="linear-half-pixel")
case("Resize", [xr, _NO, None, i64([1, 2, 7, 9])], dict(mode="linear", coordinate_transformation_mode="align_corners"), label="linear-align-corners")
case("Resize", [xr, _NO, np.array([1, 1, 1.5, 2.5], np.float32)], dict(mode="linear", coordinate_transformation_mode="asymmetric"), label="linear-asym")
case("Resize", [f(1, 2, 8, 6), _NO, np.array([1, 1, 0.5, 0.5], np.float32)], dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"), label="linear-pytorch-down")
case("Resize", [xr, _NO, np.array([1, 1, 2, 2], np.float32)], dict(mode="linear", coordinate_transformation_mode="half_pixel_symmetric"), opset=19, label="linear-half-pixel-sym")
case("Resize", [xr, np.array([0, 0, 0.2, 0.1, 1, 1, 0.9, 1.2], np.float32), None, i64([1, 2, 5, 6])], dict(mode="linear", coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=-3.0), label="linear-tf-crop")
case("Resize", [xr, _NO, np.array([1, 1, 2, 2], np.float32)], dict(mode="cubic"), label="cubic")
case("Resize", [xr, _NO, np.array([1, 1, 1.5, 2], np.float32)], dict(mode="cubic", cubic_coeff_a=-0.5, exclude_outside=1, coordinate_transformation_mode="asymmetric"), label="cubic-exclude")
case("Resize", [xr, _NO, np.array([2, 2], np.float32)], dict(mode="linear", axes=[2, 3]), opset=18, label="axes")
case("Resize", [xr, _NO, None, i64([8, 8])], dict(mode="nearest", axes=[2, 3], keep_aspect_ratio_policy="not_larger"), opset=18, label="keep-aspect")
case("Resize", [f(1, 2, 7, 9), _NO, np.array([1, 1, 0.6, 0.45], np.float32)], dict(mode="nearest"), label="nearest-down-frac")
case("Resize", [f(1, 2, 7, 9), _NO, np.array([1, 1, 0.6, 0.45], np.float32)], dict(mode="linear"), label="linear-down-frac")
case("Resize", [f(1, 2, 8, 8), _NO, None, i64([1, 2, 5, 3])], dict(mode="cubic"), label="cubic-down")
case("Resize", [f(1, 2, 3, 4, 4), _NO, np.array([1, 1, 2, 1.5, 2], np.float32)], dict(mode="linear"), label="trilinear")
case("Resize", [f(1, 3, 4, 4, 4), _NO, np.array([1, 1, 2, 2, 2], np.float32)], dict(mode="nearest"), label="nearest-5d")


def _run_ort(op, inputs, attrs, opset, n_out):
    names = [f"i{k}" if x is not None else "" for k, x in enumerate(inputs)]
    while names and names[-1] == "":
        names.pop()
    outs = [f"o{k}" for k in range(n_out)]
    attrs = {k: onnx.numpy_helper.from_array(v) if isinstance(v, np.ndarray) else v for k, v in attrs.items()}
    node = oh.make_node(op, names, outs, name="n0", **attrs)
    g_in = [
        oh.make_tensor_value_info(n, oh.np_dtype_to_tensor_dtype(np.asarray(x).dtype), list(np.shape(x)))
        for n, x in zip(names, inputs) if n
    ]
    graph = oh.make_graph([node], "g", g_in, [onnx.ValueInfoProto(name=o) for o in outs])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {n: np.asarray(x) for n, x in zip(names, inputs) if n}
    return node, sess.run(None, feeds)


def _check(op, inputs, attrs, opset, n_out, device):
    node, expected = _run_ort(op, inputs, attrs, opset, n_out)
    t_in = [numpy_to_torch(np.asarray(x)).to(device) if x is not None else None for x in inputs]
    a = node_attrs(node)
    a[NUM_OUTPUTS] = n_out
    got = OPS[op](t_in, a, opset)
    assert len(got) >= n_out
    for e, g in zip(expected, got):
        if op != "Constant":  # the one op without inputs creates its value on the CPU
            assert g.device.type == torch.device(device).type
        g = g.cpu()
        assert tuple(g.shape) == e.shape, (tuple(g.shape), e.shape)
        if e.dtype.kind == "f":
            assert g.dtype == torch.float32
            if e.size:
                diff = np.abs(g.detach().numpy().astype(np.float64) - e.astype(np.float64)).max()
                assert diff <= 1e-4, diff
        else:
            assert not g.is_floating_point()
            if e.dtype == np.bool_:
                assert g.dtype == torch.bool
            elif e.dtype == np.int64:
                assert g.dtype == torch.int64
            np.testing.assert_array_equal(g.numpy(), e)


@pytest.mark.parametrize("op,inputs,attrs,opset,n_out", CASES)
def test_op_matches_ort(op, inputs, attrs, opset, n_out):
    _check(op, inputs, attrs, opset, n_out, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("op,inputs,attrs,opset,n_out", CASES)
def test_op_matches_ort_cuda(op, inputs, attrs, opset, n_out):
    """Same cases with tensors on the GPU: catches index/shape tensors created on the wrong device."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _check(op, inputs, attrs, opset, n_out, "cuda")


REQUIRED = """Conv ConvTranspose Gemm MatMul Add Sub Mul Div Relu LeakyRelu Clip Sigmoid HardSigmoid HardSwish
Tanh Erf Gelu Softmax LayerNormalization BatchNormalization ReduceMean ReduceSum GlobalAveragePool
AveragePool MaxPool Reshape Flatten Transpose Concat Split Slice Gather Unsqueeze Squeeze Pad Resize Pow
Sqrt Cast Identity Dropout Shape Expand Where Equal Less Greater Not And Neg Exp Log Abs Reciprocal Min
Max ConstantOfShape Range Einsum Constant CumSum""".split()


def test_registry_has_required_ops():
    missing = [op for op in REQUIRED if not is_supported(op)]
    assert not missing, missing
    assert not is_supported("NonMaxSuppression")


def test_every_registered_op_has_an_ort_case():
    tested = {p.values[0] for p in CASES}
    assert set(OPS) <= tested, sorted(set(OPS) - tested)


def test_node_attrs_decodes_python_values():
    node = oh.make_node("Resize", ["x"], ["y"], mode="linear", axes=[2, 3], cubic_coeff_a=-0.5,
                        exclude_outside=1, value=oh.make_tensor("v", onnx.TensorProto.FLOAT, [2], [1.0, 2.0]))
    a = node_attrs(node)
    assert a["mode"] == "linear" and isinstance(a["mode"], str)
    assert a["axes"] == [2, 3] and isinstance(a["axes"], list)
    assert a["cubic_coeff_a"] == -0.5 and a["exclude_outside"] == 1
    np.testing.assert_array_equal(a["value"], np.array([1.0, 2.0], np.float32))


@pytest.mark.parametrize("op,inputs,attrs", [
    ("Resize", [f(1, 1, 3, 4), None, torch.tensor([1, 1, 2.0, 1.5])], dict(mode="linear")),
    ("Pad", [f(1, 2, 4, 5), torch.tensor([0, 0, 1, 2, 0, 0, 2, 1])], dict(mode="reflect")),
    ("Slice", [f(4, 6), torch.tensor([-1]), torch.tensor([INT64_MIN]), torch.tensor([1]), torch.tensor([-2])], {}),
    ("AveragePool", [f(1, 2, 7, 7)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0], ceil_mode=1)),
    ("Conv", [f(1, 2, 8, 8), f(3, 2, 3, 3)], dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    ("CumSum", [f(2, 5), torch.tensor(1)], dict(exclusive=1, reverse=1)),
    ("ScatterND", [f(4, 3), torch.tensor([[2], [0]]), f(2, 3)], {}),
    ("ScatterND", [f(4, 3), torch.tensor([[1], [1]]), f(2, 3)], dict(reduction="add")),
    ("Trilu", [f(2, 4, 4)], dict(upper=0)),
])
def test_gradients_flow(op, inputs, attrs):
    """Ops that index or pad must stay differentiable w.r.t. the data (and weights)."""
    t = [torch.as_tensor(x) if x is not None else None for x in inputs]
    for x in t:
        if x is not None and x.is_floating_point() and x.dim() > 1:
            x.requires_grad_(True)
    OPS[op](t, attrs, 17)[0].square().sum().backward()
    for x in t:
        if x is not None and x.requires_grad:
            assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
