"""Load and canonicalise an exported FP32 ONNX model before quantization.

Later passes assume one canonical form: every weight is an initializer, BatchNormalization
is folded into the Conv before it (so the folded weight is what gets quantized), no
Identity/Dropout/constant subgraphs in the way, shapes annotated, unique node names,
default-domain opset >= 13 (per-channel QDQ) and an IR version onnxruntime accepts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxflex.errors import InternalError, OnnxflexError
from onnxflex.graph import Graph, subgraphs
from onnxflex.passes.base import Pass
from onnxflex.onnx_facts import MAX_IR_VERSION, MIN_QDQ_OPSET, PROTO_LIMIT, default_opset, upgrade_opset

__all__ = ["load_model", "PreparePass", "static_input_shapes"]

logger = logging.getLogger(__name__)

# Constant folding: the onnxscript default (8192 elements) would leave large weight
# subgraphs such as Cast(fp16 weight) or Transpose(weight) unfolded, and weights must end
# up as initializers. Output growth is still bounded by onnxscript's output limit.
_FOLD_INPUT_SIZE_LIMIT = 1 << 40
# onnxscript rewrite rules left out: SlicesSplit (two Slices of one tensor -> a Split) matches a two-node
# pattern by scanning the graph for every candidate, so its cost grows with the square of the graph:
# 64 s of the 75 s optimisation of SmolLM2 (13k nodes), with no rewrite. A Split changes nothing onnxflex
# quantizes.
_SKIPPED_REWRITES = frozenset({"SlicesSplit"})


@contextlib.contextmanager
def _default_rewrites_without(names: frozenset):
    """onnxscript's optimiser with its default rewrite rules less ``names`` (it takes no rule list,
    so its module-level default is swapped for the call and restored after)."""
    import onnxscript.rewriter as rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:  # another onnxscript layout: keep its defaults
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if getattr(r, "name", None) not in names)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


# --------------------------------------------------------------------------- loading


def _short(exc: BaseException, limit: int = 200) -> str:
    """First line of an exception message, clipped, so OnnxflexError stays one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _external_tensors(model: onnx.ModelProto):
    """All tensors (initializers, Constant attributes, subgraphs) stored as external data."""
    for t in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(t):
            yield t


def _load_external(model: onnx.ModelProto, base_dir: Path, source: str) -> None:
    """Check every referenced data file exists and is long enough, then load it in place."""
    for t in list(_external_tensors(model)):
        info = external_data_helper.ExternalDataInfo(t)
        location = info.location or ""
        data_path = (base_dir / location).resolve()
        if not location or not data_path.is_file():
            raise OnnxflexError(
                f"{source}: external data file '{location}' for tensor '{t.name}' not found "
                f"in {base_dir}; keep the .data file next to the .onnx file (or re-export "
                f"without external data)"
            )
        offset = int(info.offset or 0)
        length = info.length
        if length is not None and data_path.stat().st_size < offset + int(length):
            raise OnnxflexError(
                f"{source}: external data file '{location}' is truncated (tensor '{t.name}' "
                f"needs bytes {offset}..{offset + int(length)}, file has "
                f"{data_path.stat().st_size}); copy or re-export it again"
            )
    try:
        external_data_helper.load_external_data_for_model(model, str(base_dir))
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad data file
        raise OnnxflexError(
            f"{source}: cannot read its external data ({_short(exc)}); re-export the model"
        ) from exc


def _stripped_copy(model: onnx.ModelProto, keep_elements: int = 1024) -> onnx.ModelProto:
    """Copy without large initializer data (turned into typed graph inputs).

    Used to run the checker / shape inference on models too large to serialise.
    """
    out = onnx.ModelProto(ir_version=model.ir_version)
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    g = out.graph
    src = model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.input.extend(src.input)
    input_names = {i.name for i in src.input}
    for t in src.initializer:
        if int(np.prod(t.dims, dtype=np.int64)) <= keep_elements:
            g.initializer.append(t)
        elif t.name not in input_names:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return out


def _check(model: onnx.ModelProto, source: str) -> None:
    try:
        if model.ByteSize() < PROTO_LIMIT:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(_stripped_copy(model))
    except Exception as exc:  # noqa: BLE001 - checker raises ValidationError / others
        # the checker is stricter than the runtime (e.g. graph outputs without a shape): a model that
        # onnxruntime loads is what the user deploys, so it is only warned about
        if ort_load_error(model) is None:
            logger.warning("%s fails the ONNX checker (%s) but loads in onnxruntime; going on", source, _short(exc))
            return
        raise OnnxflexError(
            f"{source} fails the ONNX checker: {_short(exc)}; fix or re-export the model"
        ) from exc


def load_model(
    path_or_proto: str | os.PathLike | onnx.ModelProto,
    base_dir: str | os.PathLike | None = None,
    check: bool = True,
) -> onnx.ModelProto:
    """Load an ONNX model with its external data, turning every failure into OnnxflexError.

    Dynamo exports keep weights in ``model.onnx.data`` next to the file; those are loaded
    into memory. For a ModelProto whose external data is not loaded yet, pass ``base_dir``
    (the folder of the data file). A ModelProto argument is returned as is (not copied)
    unless external data had to be loaded into it.
    """
    if isinstance(path_or_proto, onnx.ModelProto):
        model = path_or_proto
        source = "model"
        if any(True for _ in _external_tensors(model)):
            if base_dir is None:
                raise OnnxflexError(
                    "model references external data that is not loaded; pass base_dir (the "
                    "folder holding its .data file) or load it with onnxflex's load_model(path)"
                )
            _load_external(model, Path(base_dir), source)
    elif isinstance(path_or_proto, (str, os.PathLike)):
        path = Path(path_or_proto)
        source = str(path)
        if not path.exists():
            raise OnnxflexError(f"model file '{path}' not found; check the path")
        if not path.is_file():
            raise OnnxflexError(f"model path '{path}' is not a file; pass the .onnx file")
        try:
            model = onnx.load_model(str(path), load_external_data=False)
        except (DecodeError, ValueError, RuntimeError, TypeError, UnicodeDecodeError) as exc:
            raise OnnxflexError(
                f"{path} is not a valid ONNX model (truncated or corrupt); re-export it"
            ) from exc
        except OSError as exc:
            raise OnnxflexError(f"cannot read model file '{path}': {_short(exc)}") from exc
        # Random bytes sometimes parse as an (empty) protobuf: a real model has an IR
        # version, an opset and a graph with at least one output.
        if model.ir_version <= 0 or not model.opset_import or not model.graph.output:
            raise OnnxflexError(
                f"{path} is not a valid ONNX model (truncated or corrupt); re-export it"
            )
        _load_external(model, Path(base_dir) if base_dir else path.parent, source)
    else:
        raise OnnxflexError(
            f"expected a path to an .onnx file or an onnx.ModelProto, got "
            f"{type(path_or_proto).__name__}"
        )
    if check:
        _check(model, source)
    return model


# --------------------------------------------------------------------------- helpers


def ort_load_error(model: onnx.ModelProto) -> str | None:
    """Why onnxruntime refuses to load ``model`` (one line), or None when it loads."""
    from onnxflex.runtime.session import make_session

    try:
        make_session(model, optimization="disable")
    except Exception as exc:  # noqa: BLE001 - any refusal is reported as its first line
        return _short(exc, 300)
    return None


def _required_ir(model: onnx.ModelProto) -> int:
    """Lowest IR version that covers all the model's opsets (onnx.helper's table)."""
    need = 3
    for op in model.opset_import:
        domain = op.domain or "ai.onnx"
        try:
            need = max(need, onnx.helper.find_min_ir_version_for([op], ignore_unknown=True))
        except Exception:  # noqa: BLE001 - unknown domain/version: no constraint
            logger.debug("no IR requirement known for opset %s:%s", domain, op.version)
    return need


def _fold_conv_bn(graph: ir.Graph) -> int:
    """Fold BatchNormalization(Conv(x)) that the onnxscript rules left behind.

    onnxscript skips the fusion when the Conv weight or bias initializer is shared with
    another node; here the folded weight gets a fresh initializer instead.
    """
    count = 0
    taken = set(graph.initializers)
    for bn in list(graph):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
            continue
        if any(o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
            continue  # training mode outputs in use
        training = bn.attributes.get("training_mode")
        if training is not None and training.as_int() != 0:
            continue
        x = bn.inputs[0]
        conv = x.producer() if x is not None else None
        if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            continue
        if len(x.uses()) != 1 or x.is_graph_output():
            continue
        params = [v.const_value if v is not None else None for v in bn.inputs[1:5]]
        w = conv.inputs[1].const_value if len(conv.inputs) > 1 else None
        b_val = conv.inputs[2] if len(conv.inputs) > 2 else None
        b = b_val.const_value if b_val is not None else None
        if w is None or any(p is None for p in params) or (b_val is not None and b is None):
            continue
        gamma, beta, mean, var = (p.numpy().astype(np.float64) for p in params)
        eps_attr = bn.attributes.get("epsilon")
        eps = eps_attr.as_float() if eps_attr is not None else 1e-5
        scale = gamma / np.sqrt(var + eps)
        w_np = w.numpy()
        new_w = (w_np.astype(np.float64) * scale.reshape([-1] + [1] * (w_np.ndim - 1)))
        bias = b.numpy().astype(np.float64) if b is not None else np.zeros_like(mean)
        new_b = (bias - mean) * scale + beta

        def _init(base: str, arr: np.ndarray) -> ir.Value:
            name, i = base, 0
            while name in taken:
                i += 1
                name = f"{base}_{i}"
            taken.add(name)
            value = ir.Value(name=name, shape=ir.Shape(arr.shape),
                             type=ir.TensorType(ir.DataType.FLOAT),
                             const_value=ir.tensor(arr.astype(np.float32), name=name))
            graph.register_initializer(value)
            return value

        base = conv.inputs[1].name or "conv"
        w_new = _init(f"{base}_bnfolded", new_w)
        b_new = _init(f"{base}_bnfolded_bias", new_b)
        conv.replace_input_with(1, w_new)
        if len(conv.inputs) < 3:
            conv.resize_inputs(3)
        conv.replace_input_with(2, b_new)
        y = bn.outputs[0]
        # Conv now produces BN's output; keep BN's name (it may be a graph output).
        y_name = y.name
        y.replace_all_uses_with(x, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        x.name = y_name
        count += 1
    return count


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every node (subgraphs too) a unique non-empty name; keep good existing ones."""
    graphs: list[onnx.GraphProto] = []

    def collect(g: onnx.GraphProto) -> None:
        graphs.append(g)
        for n in g.node:
            for sg in subgraphs(n):
                collect(sg)

    collect(model.graph)
    nodes = [n for g in graphs for n in g.node]
    counts: dict[str, int] = {}
    for n in nodes:
        if n.name:
            counts[n.name] = counts.get(n.name, 0) + 1
    used = {name for name, c in counts.items() if c == 1}
    next_id: dict[str, int] = {}
    for n in nodes:
        if n.name and counts[n.name] == 1:
            continue
        base = n.name or f"{n.op_type}"
        i = next_id.get(base, 0)
        while f"{base}_{i}" in used:
            i += 1
        n.name = f"{base}_{i}"
        used.add(n.name)
        next_id[base] = i + 1


# --------------------------------------------------------------------------- the pass


class PreparePass(Pass):
    """Canonicalise an exported FP32 model so later passes see one form.

    Steps (each for a reason):
      1. opset < 13 → 13 with onnx.version_converter (per-channel QDQ needs 13);
      2. Constant nodes → initializers, initializers removed from graph inputs (weights
         must be initializers; an initializer listed as an input is an overridable input
         that blocks folding);
      3. onnxscript's optimizer: constant folding, Conv/ConvTranspose/Gemm+BatchNormalization
         fusion, Identity/Dropout removal, Pad→Conv fusion, dead-code removal, function
         inlining; standard ONNX ops only (chosen over onnxruntime's basic-level optimiser,
         which left a BatchNormalization and Cast/Expand nodes in a raw dynamo export,
         rewrote 3-D MatMul+Add into Reshape+Gemm+Reshape, and filled opset_import with
         ORT-internal domains);
      4. hand-written Conv+BN fold for what onnxscript leaves (Conv weight shared);
      5. shape inference with data propagation, written into value_info;
      6. unique non-empty node names (later passes key on them);
      7. ir_version set to what onnxruntime accepts (≤ 10 unless the opsets need more).
    The batch dimension is left as the exporter wrote it (symbolic stays symbolic).
    The input ModelProto is not modified.
    """

    def __init__(self, min_opset: int = MIN_QDQ_OPSET, fold_constants: bool = True) -> None:
        self.min_opset = min_opset
        self.fold_constants = fold_constants
        #: what the last run did, for logs and `onnxflex inspect`
        self.stats: dict[str, int] = {}

    name = "prepare"

    def run(self, graph: Graph, ctx) -> Graph:
        """Pass contract: the prepared model becomes the run's FP32 reference (``ctx.fp_model``).
        It must load in ONNX Runtime: if the optimiser's output does not, the model is prepared again
        without it; if that fails too, the user's own model is tried, to blame the right party."""
        ctx.fp_model = self.prepare(graph.model)
        problem = ort_load_error(ctx.fp_model)
        if problem and self.fold_constants:
            logger.warning("the optimised model does not load in onnxruntime (%s); preparing it without "
                           "the optimiser", problem)
            plain = PreparePass(self.min_opset, fold_constants=False)
            ctx.fp_model, self.stats = plain.prepare(graph.model), plain.stats
            problem = ort_load_error(ctx.fp_model)
        if problem:
            original = ort_load_error(graph.model)
            if original:
                raise OnnxflexError(f"the model does not load in onnxruntime: {original}; fix or re-export it")
            raise InternalError(f"internal error in preparation: the prepared model does not load in "
                                f"onnxruntime ({problem}) although the original does")
        return Graph(ctx.fp_model)

    def prepare(self, model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
        """Return the canonical form of ``model`` (a path or a ModelProto, which is not modified)."""
        if not isinstance(model, onnx.ModelProto):
            model = load_model(model)
        elif any(True for _ in _external_tensors(model)):
            raise OnnxflexError(
                "model references external data that is not loaded; load it with "
                "onnxflex's load_model(path) (or load_model(proto, base_dir=...)) first"
            )
        stats = {"opset_before": default_opset(model)}
        if not model.graph.node:
            raise OnnxflexError("model graph has no nodes; export the model again")
        bn_before = sum(n.op_type == "BatchNormalization" for n in model.graph.node)

        if default_opset(model) < self.min_opset:
            model = upgrade_opset(model, self.min_opset, "per-channel Q/DQ needs")

        irm = ir.serde.deserialize_model(model)
        try:
            ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(irm)
        except ValueError:  # e.g. a sparse Constant: lift the plain tensor ones only
            ir_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(irm)
        ir_passes.LiftSubgraphInitializersToMainGraphPass()(irm)
        ir_passes.RemoveInitializersFromInputsPass()(irm)

        if self.fold_constants:
            import onnxscript.optimizer as oso

            try:
                with _default_rewrites_without(_SKIPPED_REWRITES):
                    oso.optimize_ir(irm, input_size_limit=_FOLD_INPUT_SIZE_LIMIT)
            except Exception as exc:  # noqa: BLE001 - report which model broke the optimiser
                raise OnnxflexError(
                    f"graph optimisation (onnxscript) failed: {_short(exc)}; check that the "
                    f"model runs in onnxruntime, or pass fold_constants=False"
                ) from exc
        stats["bn_fallback_folded"] = _fold_conv_bn(irm.graph)
        ir_passes.RemoveUnusedNodesPass()(irm)

        # Shape inference; onnx-ir strips large initializers around onnx's C++ call.
        ir_passes.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(irm)

        out = ir.serde.serialize_model(irm)
        _name_nodes(out)
        out.ir_version = max(MAX_IR_VERSION, _required_ir(out))
        if out.ir_version > MAX_IR_VERSION:
            logger.warning("model needs IR version %d; onnxruntime may refuse it", out.ir_version)

        stats["opset_after"] = default_opset(out)
        stats["bn_folded"] = bn_before - sum(
            n.op_type == "BatchNormalization" for n in out.graph.node)
        stats["nodes"] = len(out.graph.node)
        self.stats = stats
        return out


# --------------------------------------------------------------------------- shapes


def static_input_shapes(
    model: onnx.ModelProto,
    batch: int,
    overrides: Mapping[str, int | Sequence[int]] | None = None,
) -> dict[str, list[int]]:
    """Concrete shapes of the graph inputs for a calibration batch.

    The first dimension of each input is the batch: if symbolic (or unknown) it becomes
    ``batch``, and any other dimension carrying the same symbol too. Other symbolic dims
    must be given in ``overrides``, by dimension name (``{"seq": 128}``) or by input name
    (``{"input_ids": [8, 128]}``, a full shape). A fixed first dim is kept as exported.
    """
    overrides = dict(overrides or {})
    if batch < 1:
        raise OnnxflexError(f"batch size must be >= 1, got {batch}")
    init_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    batch_syms = set()
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_param"):
            batch_syms.add(dims[0].dim_param)

    shapes: dict[str, list[int]] = {}
    for vi in inputs:
        if not vi.type.HasField("tensor_type"):
            raise OnnxflexError(
                f"input '{vi.name}' is not a tensor; onnxflex only feeds tensor inputs"
            )
        if vi.name in overrides:
            value = overrides[vi.name]
            if isinstance(value, int):
                raise OnnxflexError(
                    f"override for input '{vi.name}' must be a full shape list, got {value}"
                )
            shapes[vi.name] = [int(d) for d in value]
            continue
        if not vi.type.tensor_type.HasField("shape"):
            raise OnnxflexError(
                f"input '{vi.name}' has no shape in the model; give its shape in overrides, "
                f"e.g. {{'{vi.name}': [batch, ...]}}"
            )
        shape = []
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param in overrides:
                shape.append(int(overrides[d.dim_param]))  # type: ignore[arg-type]
            elif axis == 0 or (d.HasField("dim_param") and d.dim_param in batch_syms):
                shape.append(int(batch))
            else:
                label = f"'{d.dim_param}'" if d.HasField("dim_param") else "(unnamed)"
                key = d.dim_param if d.HasField("dim_param") else vi.name
                raise OnnxflexError(
                    f"input '{vi.name}' has a symbolic dimension {label} at axis {axis}; "
                    f"give its size in overrides, e.g. {{'{key}': ...}}"
                )
        shapes[vi.name] = shape
    return shapes
