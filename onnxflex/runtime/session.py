"""onnxruntime session factory: one place that knows ORT's quirks.

* onnx >= 1.20 writes IR version 14, which onnxruntime 1.31 refuses; models are lowered to the newest IR
  the installed onnxruntime loads (:data:`ORT_MAX_IR_VERSION`, probed once at import).
* onnxruntime-gpu lists CUDA/TensorRT as "available" even on a machine without a GPU (they fail only
  when a session is created), so :func:`available_providers` probes them for real.
* Load errors become :class:`OnnxflexError` with ORT's message trimmed to its useful part.
"""
from __future__ import annotations

import functools
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from ..errors import OnnxflexError
from ..onnx_facts import fits_in_protobuf, weightless_copy

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
_SHORT = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


def _tiny_model(ir_version: int) -> bytes:
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = ir_version
    return m.SerializeToString()


def _probe_max_ir_version() -> int:
    """Newest IR version the installed onnxruntime accepts (13 for onnxruntime 1.31)."""
    so = ort.SessionOptions()
    so.log_severity_level = 4
    for ir in range(max(onnx.IR_VERSION, 13) + 2, 6, -1):
        try:
            ort.InferenceSession(_tiny_model(ir), so, providers=["CPUExecutionProvider"])
            return ir
        except Exception:
            continue
    return 10  # onnxruntime >= 1.16 loads IR 10; safe fallback


ORT_MAX_IR_VERSION: int = _probe_max_ir_version()


def fix_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Lower ``model.ir_version`` (in place) to what onnxruntime loads; returns the model for chaining.

    Safe for models produced by current onnx: the IR bumps since 10 add features (e.g. new types) that
    the opsets ORT supports do not rely on.
    """
    if model.ir_version > ORT_MAX_IR_VERSION:
        model.ir_version = ORT_MAX_IR_VERSION
    return model


@functools.lru_cache(maxsize=None)
def _provider_works(full: str) -> bool:
    """Create a tiny session on ``full`` and see whether ORT kept it (it silently falls back otherwise)."""
    if full == "CPUExecutionProvider":
        return True
    if full not in ort.get_available_providers():
        return False
    so = ort.SessionOptions()
    so.log_severity_level = 4
    ort.set_default_logger_severity(4)  # the provider bridge logs load failures on the default logger
    try:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # ORT prints "EP Error ... Falling back"
            s = ort.InferenceSession(_tiny_model(min(10, ORT_MAX_IR_VERSION)), so, providers=[full, "CPUExecutionProvider"])
        return full in s.get_providers()
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(2)  # ORT's default (warning)


def available_providers() -> list[str]:
    """Short names (cpu, cuda, tensorrt) of the providers that really work here, best first."""
    out = []
    for full in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"):
        if _provider_works(full):
            out.append(_SHORT[full])
    return out


_warned: set[str] = set()


def _resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    if providers is None:
        providers = ("cpu",)
    if isinstance(providers, str):
        providers = [p for p in re.split(r"[,\s]+", providers) if p]
    full = []
    for p in providers:
        key = str(p).strip()
        name = PROVIDER_NAMES.get(key.lower(), key if key.endswith("ExecutionProvider") else None)
        if name is None:
            raise OnnxflexError(f"unknown execution provider {p!r}; choose from cpu, cuda, tensorrt")
        if name not in full:
            full.append(name)
    keep = []
    for name in full:
        if _provider_works(name):
            keep.append(name)
        elif name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"{_SHORT.get(name, name)} was requested but is not usable here (no GPU or missing CUDA/TensorRT "
                "libraries); running on the remaining providers",
                stacklevel=3,
            )
    if "CPUExecutionProvider" not in keep:
        keep.append("CPUExecutionProvider")  # ORT needs CPU for ops the GPU providers lack
    return keep


def _summarize(err: BaseException) -> str:
    """'[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/...cc:256 fn(...) Real message' -> 'Real message'."""
    msg = " ".join(str(err).split()) or type(err).__name__
    msg = msg.replace(" Please fix either the inputs/outputs or the model.", "")
    msg = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", msg)
    msg = re.sub(r"/onnxruntime_src/\S+:\d+\s+(\S+\([^)]*\)(\s*const)?\s*)?", "", msg)
    msg = re.sub(r"\s+", " ", msg).strip()
    return msg[:300] + ("..." if len(msg) > 300 else "")


def _has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _session_options(threads: int | None, optimization: str, spin: bool = True, arena: bool = True) -> ort.SessionOptions:
    so = ort.SessionOptions()
    if not arena:
        # runs that fetch different sets of intermediates (the batch probe) would each grow the arena
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
    if not spin:
        # onnxruntime's threads spin-wait after each run; torch work that follows in the same process
        # then fights them for the cores (RTN on YOLOv8n: most of the run was that wait)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimization not in OPT_LEVELS:
        raise OnnxflexError(f"unknown graph optimization level {optimization!r}; choose one of {', '.join(OPT_LEVELS)}")
    so.graph_optimization_level = OPT_LEVELS[optimization]
    if threads is not None:
        if int(threads) < 0:
            raise OnnxflexError(f"--threads must be >= 0 (0 = onnxruntime default), got {threads}")
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3  # errors only: "node not assigned to preferred EP" warnings are noise here
    return so


def target_providers(device: str) -> tuple:
    """Providers for FP32 region targets: CUDA when reconstruction runs on the GPU and the installed
    onnxruntime offers it (onnxruntime-gpu), the CPU otherwise."""
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ("cuda", "cpu")
    return ("cpu",)


def make_session(
    model: str | Path | onnx.ModelProto | bytes,
    providers: Sequence[str] | str | None = ("cpu",),
    threads: int | None = None,
    optimization: str = "all",
    provider_options: dict[str, dict] | None = None,
    spin: bool = True,
    arena: bool = True,
    initializers: dict | None = None,
) -> ort.InferenceSession:
    """An :class:`onnxruntime.InferenceSession` for a path, ModelProto or serialized bytes.

    ``providers``: short names (cpu, cuda, tensorrt) or ORT names; unusable ones are dropped with one
    warning and CPU is always last.  ``threads``: intra-op threads (None = ORT default).
    ``optimization``: disable | basic | extended | all.  ``provider_options``: {short or ORT name: {...}};
    TensorRT gets ``trt_int8_enable`` for Q/DQ models by default (TensorRT needs the INT8 flag to honour
    explicit Q/DQ).  The IR version is lowered when ORT refuses it; a proto of WEIGHTLESS_ABOVE_BYTES or more
    goes through :class:`SharedWeights` (no serialised copy, no 2 GB limit), and only a >= 2 GB proto whose
    bytes are not in large initializers through a temp file.
    ``spin=False`` for sessions whose runs alternate with torch work (reconstruction); ``arena=False``
    returns each run's memory when it ends. ``initializers``: {name: OrtValue} for the initializers a
    :class:`SharedWeights` skeleton marks external (the session uses them without a copy).
    """
    so = _session_options(threads, optimization, spin, arena)
    if initializers:
        so.add_external_initializers(list(initializers), list(initializers.values()))
    provs = _resolve_providers(providers)
    opts_by = {}
    for k, v in (provider_options or {}).items():
        opts_by[PROVIDER_NAMES.get(k.lower(), k)] = dict(v)

    # Normalise the model into either a path ORT can open or a (fixed) ModelProto/bytes.
    proto: onnx.ModelProto | None = None
    path: Path | None = None
    blob: bytes | None = None
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray, memoryview)):
        blob = bytes(model)
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise OnnxflexError(f"model file {path} does not exist; check the path")
        if path.is_dir():
            raise OnnxflexError(f"{path} is a folder; pass the .onnx model file")
    else:
        raise OnnxflexError(f"cannot load a model from a {type(model).__name__}; pass a path, onnx.ModelProto or bytes")

    if "TensorrtExecutionProvider" in provs and "TensorrtExecutionProvider" not in opts_by:
        try:
            p = proto if proto is not None else (
                onnx.load_from_string(blob) if blob is not None else onnx.load(str(path), load_external_data=False))
            opts_by["TensorrtExecutionProvider"] = {"trt_int8_enable": bool(_has_qdq(p))}
        except Exception:
            pass
    pos = [opts_by.get(p, {}) for p in provs]

    def create(m):
        return ort.InferenceSession(m, so, providers=provs, provider_options=pos)

    def fail(e, what):
        return OnnxflexError(f"onnxruntime cannot load {what}: {_summarize(e)}; check it is a valid ONNX model (onnx.checker.check_model)")

    what = str(path) if path is not None else "the model"
    if path is not None:
        try:
            return create(str(path))
        except Exception as e:
            if "IR version" not in str(e):
                raise fail(e, what) from None
        try:  # IR too new: load (with external data), lower it, go through the proto route
            proto = onnx.load(str(path))
        except Exception as e:
            raise OnnxflexError(f"cannot read model {path}: {_summarize(e)}; check it is a valid ONNX file") from None
    elif blob is not None:
        try:
            return create(blob)
        except Exception as e:
            if "IR version" not in str(e):
                raise fail(e, what) from None
        try:
            proto = onnx.load_from_string(blob)
        except Exception as e:
            raise fail(e, what) from None

    assert proto is not None
    if initializers is None and not fits_in_protobuf(proto, WEIGHTLESS_ABOVE_BYTES):
        shared = SharedWeights(proto)  # weights handed over in place: no serialised copy, no temp file
        try:
            return shared.session(threads=threads, optimization=optimization, provider_options=provider_options,
                                  spin=spin, arena=arena, providers=providers)
        except OnnxflexError:
            raise
        except Exception as e:
            raise fail(e, what) from None
    old_ir = proto.ir_version
    fix_ir_version(proto)  # restored below: the caller's proto is not ours to change
    try:
        try:
            serialized = proto.SerializeToString() if fits_in_protobuf(proto) else None
        except Exception:
            serialized = None
        if serialized is not None:
            try:
                return create(serialized)
            except Exception as e:
                raise fail(e, what) from None
        with tempfile.TemporaryDirectory(prefix="onnxflex-") as td:  # >= 2 GB: external data in a temp dir
            f = Path(td) / "model.onnx"
            big = onnx.ModelProto()
            big.CopyFrom(proto)
            onnx.save_model(big, str(f), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
            del big
            try:
                return create(str(f))  # ORT reads the weights at session creation; the dir can go afterwards
            except Exception as e:
                raise fail(e, what) from None
    finally:
        proto.ir_version = old_ir


#: tensor types an OrtValue can be made from (numpy's own dtypes; not int4, bfloat16 or float8)
_ORTVALUE_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT8, TensorProto.INT16,
                             TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32,
                             TensorProto.UINT64, TensorProto.BOOL})
#: a ModelProto at least this big becomes a session through SharedWeights (serialising it would copy it)
WEIGHTLESS_ABOVE_BYTES = 64 << 20


class SharedWeights:
    """A model's large initializers held once, as OrtValues, for many sessions over variants of its graph.

    onnxruntime runs every node of a graph on every run, whatever outputs are asked for, so a run that
    fetches a few intermediates of a graph exposing all of them keeps all of them alive (the batch
    probe of a decoder: 8 GB for 0.5 GB of weights). The probe therefore builds one session per group
    of outputs; this keeps those sessions from each serialising and copying the weights: ``skeleton``
    is the model with each large initializer marked external, and :meth:`session` hands onnxruntime
    the arrays through ``add_external_initializers``, which it uses in place.
    """

    def __init__(self, model: onnx.ModelProto):
        from onnx import numpy_helper

        self.skeleton, weights = weightless_copy(model, types=_ORTVALUE_TYPES)
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(numpy_helper.to_array(t)))
                       for name, t in weights.items()}

    def session(self, outputs: Sequence | None = None, batch_axes: dict | None = None, prune: bool = False,
                **kwargs) -> ort.InferenceSession:
        """A session on the skeleton whose graph outputs are ``outputs`` (ValueInfoProtos; None keeps
        the model's) and whose inputs have a symbolic dim on ``batch_axes`` {input: axis}. ``prune``:
        the graph keeps only the nodes those outputs depend on (onnxruntime would run them all)."""
        m = onnx.ModelProto()
        m.CopyFrom(self.skeleton)
        if outputs is not None:
            del m.graph.output[:]
            m.graph.output.extend(outputs)
        values = self.values
        if outputs is not None and prune:
            from ..graph import reads

            keep = needed_nodes(m.graph, {o.name for o in outputs})
            used = {t for n in keep for t in reads(n)} | {o.name for o in outputs}
            del m.graph.node[:]
            m.graph.node.extend(keep)
            inits = [t for t in m.graph.initializer if t.name in used]  # onnxruntime drops unused ones
            del m.graph.initializer[:]
            m.graph.initializer.extend(inits)
            values = {k: v for k, v in values.items() if k in used}
        for vi in m.graph.input:
            axis = (batch_axes or {}).get(vi.name)
            dims = vi.type.tensor_type.shape.dim
            if axis is not None and vi.type.tensor_type.HasField("shape") and axis < len(dims):
                dims[axis].Clear()
                dims[axis].dim_param = "onnxflex_batch"
        sess = make_session(m, initializers=values, **kwargs)
        sess._onnxflex_weights = self.values  # the arrays must outlive the session
        return sess


def needed_nodes(graph: onnx.GraphProto, outputs: set) -> list:
    """The nodes of ``graph`` that ``outputs`` depend on, in graph order (copies)."""
    from ..graph import reads

    need, keep = set(outputs), []
    for n in reversed(graph.node):
        if any(o in need for o in n.output):
            keep.append(onnx.NodeProto.FromString(n.SerializeToString()))
            need.update(reads(n))
    return keep[::-1]


def input_specs(session: ort.InferenceSession) -> dict[str, tuple[list, np.dtype]]:
    """{input name: (shape with ints for static dims and str/None for dynamic ones, numpy dtype)}."""
    out = {}
    for i in session.get_inputs():
        if i.type not in _ORT_TYPES:
            raise OnnxflexError(f"model input {i.name!r} has type {i.type}, which onnxflex cannot feed; use a model with tensor inputs")
        out[i.name] = (list(i.shape), np.dtype(_ORT_TYPES[i.type]))
    return out


def output_names(session: ort.InferenceSession) -> list[str]:
    return [o.name for o in session.get_outputs()]


def run_batched(
    session: ort.InferenceSession,
    feeds_iter: Iterable[dict[str, np.ndarray]],
    output_names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run every feed dict and concatenate each output along axis 0 (outputs are assumed batch-first)."""
    known = [o.name for o in session.get_outputs()]
    names = list(output_names) if output_names is not None else known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise OnnxflexError(f"model has no output(s) {', '.join(map(repr, unknown))}; its outputs are {', '.join(known)}")
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feeds in feeds_iter:
        try:
            res = session.run(names, feeds)
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ValueError) as e:
            raise OnnxflexError(f"the model rejected the inputs: {_summarize(e)}; check input names, shapes and dtypes") from None
        for n, r in zip(names, res):
            parts[n].append(np.asarray(r))
    out = {}
    for n, p in parts.items():
        if not p:
            out[n] = np.empty((0,), np.float32)
        elif len(p) == 1 or p[0].ndim == 0:
            out[n] = p[0] if len(p) == 1 else np.stack(p)
        else:
            out[n] = np.concatenate(p, axis=0)
    return out
