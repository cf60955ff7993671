"""Decoder (causal LM) text as fixed windows of one token stream: the GPTQ / FlexRound protocol.

A decoder LLM is calibrated and evaluated on a corpus tokenized as *one* stream (no padding, no per-line
truncation) cut into consecutive, non-overlapping windows of ``seq_len`` tokens.  Every window is fed as
one sample with an empty KV cache: ``input_ids`` [1, N], ``attention_mask`` all ones [1, N] (past + N with
past = 0), ``position_ids`` 0..N-1 [1, N] where the model has them, and every KV-cache input as a
zero-length past ([1, kv_heads, 0, head_dim] in the dtype of the model input).

What counts as a decoder (:func:`is_decoder`), in order:

1. any KV-cache input (:func:`is_past_input`: a name containing ``past``, or ``key``/``value`` together
   with ``cache``) -> decoder;
2. an input other than ``input_ids`` / ``attention_mask`` / ``position_ids`` (``token_type_ids``...), or no
   ``input_ids`` -> not a decoder (BERT-like encoders keep the padded one-text-per-line protocol);
3. a ``position_ids`` input -> decoder (encoder exports do not take it);
4. with the model's outputs known: a float output of rank 3 whose name contains ``logits``
   ([batch, seq, vocab]) -> decoder;
5. otherwise not a decoder.

A masked LM exported with only input_ids/attention_mask -> logits passes rule 4; callers that know better
force the protocol (``decoder=True/False`` in :func:`onnxflex.calib.load_calibration` and
:func:`onnxflex.api.quantize`).
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Sequence

import numpy as np

from ..errors import OnnxflexError
from .dataset import batch_axes, fmt_shape, is_static, norm_specs

DEFAULT_SEQ_LEN = 512
DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids")
_CACHE_RE = re.compile(r"(key|value).*cache|cache.*(key|value)")


def is_past_input(name: str) -> bool:
    """True for a KV-cache input: ``past_key_values.0.key``, ``past.0.value``, ``past_key_3``, ``key_cache.1``..."""
    n = name.lower()
    return "past" in n or bool(_CACHE_RE.search(n))


def _is_logits(name: str, spec: Any) -> bool:
    shape, dtype = spec
    return "logits" in name.lower() and shape is not None and len(shape) == 3 and np.dtype(dtype).kind == "f"


def is_decoder(input_specs: dict, output_specs: dict | None = None) -> bool:
    """Whether a model with these inputs (and outputs, when known) is a causal LM; rules in the module doc."""
    names = [n.lower() for n in input_specs]
    if any(is_past_input(n) for n in names):
        return True
    if "input_ids" not in names or any(n not in DECODER_INPUTS for n in names):
        return False
    if "position_ids" in names:
        return True
    return bool(output_specs) and any(_is_logits(n, s) for n, s in output_specs.items())


def proto_io_specs(model) -> tuple[dict, dict]:
    """({input name: (dims, dtype)}, {output name: (dims, dtype)}) of an onnx.ModelProto (graph inputs that
    are initializers left out); dims are ints or dim names, None when the rank is unknown."""
    import onnx

    def spec(v):
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                for d in tt.shape.dim] if tt.HasField("shape") else None
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        except Exception:  # not a tensor (sequence, map) or an undefined type
            dtype = np.dtype(object)
        return dims, dtype

    inits = {t.name for t in model.graph.initializer}
    ins = {v.name: spec(v) for v in model.graph.input if v.name not in inits}
    outs = {v.name: spec(v) for v in model.graph.output}
    return ins, outs


def token_windows(ids: Sequence[int] | np.ndarray, seq_len: int, count: int | None = None) -> np.ndarray:
    """The first ``count`` (None: all) consecutive, non-overlapping windows of ``seq_len`` tokens of one
    token stream -> int64 [k, seq_len].  A trailing partial window is dropped.

    Fewer full windows than ``count`` gives all there are, with a warning naming how many; none is an
    OnnxflexError naming the token count and a ``--seq-len`` that fits.
    """
    seq_len = int(seq_len)
    if seq_len < 2:
        raise OnnxflexError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    if count is not None and int(count) < 1:
        raise OnnxflexError(f"the number of windows must be at least 1, got {count}")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    have = ids.size // seq_len
    if have == 0:
        hint = f"use --seq-len {ids.size} or less, or a longer text" if ids.size >= 2 else "use a longer text"
        raise OnnxflexError(f"the text has {ids.size} token(s), fewer than one window of --seq-len {seq_len}; {hint}")
    k = have if count is None else min(int(count), have)
    if count is not None and have < int(count):
        warnings.warn(f"the text holds {have} full window(s) of {seq_len} tokens ({ids.size} tokens), "
                      f"fewer than the {int(count)} asked for; using those {have}", stacklevel=2)
    return ids[: k * seq_len].reshape(k, seq_len).copy()


def token_role(name: str) -> str | None:
    """ids | attention_mask | type_ids for the token inputs an encoder's text feeds fill, by name."""
    n = name.lower()
    if "token_type" in n or "segment" in n:
        return "type_ids"
    if "attention_mask" in n or "mask" in n:
        return "attention_mask"
    if "input_ids" in n or n in ("ids", "input"):
        return "ids"
    return None


def _role(name: str) -> str | None:
    """token_role plus what a decoder window also fills: KV-cache inputs and position ids."""
    n = name.lower()
    if is_past_input(n):
        return "past"
    if "position" in n:
        return "position_ids"
    return "ids" if n == "tokens" else token_role(n)


def _past_axis(name: str, shape: list, batch_axis: int | None) -> int:
    """The past-sequence axis of a KV-cache input: a dim named like past/seq/len, else its only dynamic
    dim besides the batch, else rank-2 (the [batch, kv_heads, past_seq, head_dim] layout)."""
    named = [k for k, d in enumerate(shape) if k != batch_axis and isinstance(d, str)
             and any(w in d.lower() for w in ("past", "seq", "len", "total", "cache"))]
    if named:
        return named[0]
    dynamic = [k for k, d in enumerate(shape) if k != batch_axis and not is_static(d)]
    if len(dynamic) == 1:
        return dynamic[0]
    if len(shape) < 3:
        raise OnnxflexError(f"KV-cache input {name!r} has shape {fmt_shape(shape)}; expected "
                            "[batch, kv_heads, past_seq, head_dim]; pass .npz feeds instead of text")
    return len(shape) - 2


def _empty_past(name: str, shape: list | None, dtype: np.dtype, batch_axis: int | None) -> np.ndarray:
    if shape is None:
        raise OnnxflexError(f"KV-cache input {name!r} has no shape in the model, so an empty past cannot be built; "
                            "export the model with input shapes or pass .npz feeds")
    if batch_axis is None:
        raise OnnxflexError(f"KV-cache input {name!r} is a scalar; expected [batch, kv_heads, past_seq, head_dim]")
    axis = _past_axis(name, shape, batch_axis)
    dims = []
    for k, d in enumerate(shape):
        if k == batch_axis:
            dims.append(1)
        elif k == axis:
            dims.append(0)
        elif is_static(d):
            dims.append(int(d))
        else:
            raise OnnxflexError(
                f"KV-cache input {name!r} has shape {fmt_shape(shape)} with dynamic dim {k} ({d or '?'}) besides the batch "
                "and past length, so an empty past cannot be shaped; export kv_heads/head_dim as fixed dims")
    if np.dtype(dtype).kind not in "fc":
        raise OnnxflexError(f"KV-cache input {name!r} is {np.dtype(dtype)}, not a float cache; pass .npz feeds instead of text")
    return np.zeros(dims, dtype=dtype)


def decoder_roles(input_specs: dict) -> dict[str, str]:
    """{input name: ids | attention_mask | position_ids | type_ids | past}; an input of another kind is an
    OnnxflexError naming it."""
    roles = {}
    for name in norm_specs(input_specs):
        role = _role(name)
        if role is None:
            raise OnnxflexError(
                f"model input {name!r} is not one a decoder window can fill (input_ids, attention_mask, position_ids, "
                "past_key_values.*); pass .npz feeds instead")
        roles[name] = role
    if "ids" not in roles.values():
        raise OnnxflexError("the model has no input_ids input, so it cannot be fed token windows; pass .npz feeds instead")
    return roles


def static_seq_len(input_specs: dict) -> int | None:
    """The fixed sequence length of the model's input_ids ([batch, seq] with a static seq), if any."""
    specs = norm_specs(input_specs)
    for name, role in decoder_roles(specs).items():
        shape = specs[name][0]
        if role == "ids" and shape is not None and len(shape) == 2 and is_static(shape[1]):
            return int(shape[1])
    return None


def decoder_feeds(windows: np.ndarray, input_specs: dict) -> list[dict[str, np.ndarray]]:
    """One feed dict per window ([k, N] token ids) for a decoder with ``input_specs`` ({name: (dims, dtype)}):
    input_ids [1, N]; attention_mask ones [1, N]; position_ids 0..N-1 [1, N]; token_type_ids zeros; every
    KV-cache input an empty past (length 0 on its past axis, batch 1, other dims and dtype from the spec)."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 1:
        raise OnnxflexError(f"token windows must be [count, seq_len], got shape {list(windows.shape)}")
    specs = norm_specs(input_specs)
    roles = decoder_roles(specs)
    axes = batch_axes(specs)
    n = windows.shape[1]
    for name, role in roles.items():
        shape, dtype = specs[name]
        if role == "past":
            continue
        if shape is not None and len(shape) != 2:
            raise OnnxflexError(f"model input {name!r} has shape {fmt_shape(shape)}, not [batch, seq]; pass .npz feeds instead of text")
        if shape is not None and is_static(shape[1]) and int(shape[1]) != n:
            raise OnnxflexError(f"model input {name!r} has a fixed length of {int(shape[1])} tokens; use --seq-len {int(shape[1])}")
        if role != "attention_mask" and not np.issubdtype(dtype, np.integer):
            raise OnnxflexError(f"model input {name!r} is {dtype}, not integer token data; pass .npz feeds instead of text")
        if role == "ids" and np.issubdtype(dtype, np.integer) and windows.size and windows.max() > np.iinfo(dtype).max:
            raise OnnxflexError(f"token id {int(windows.max())} does not fit the model's {dtype} input {name!r}; check the tokenizer")
    fixed = {}
    for name, role in roles.items():
        shape, dtype = specs[name]
        if role == "attention_mask":
            fixed[name] = np.ones((1, n), dtype=dtype)
        elif role == "position_ids":
            fixed[name] = np.arange(n, dtype=dtype)[None]
        elif role == "type_ids":
            fixed[name] = np.zeros((1, n), dtype=dtype)
        elif role == "past":
            fixed[name] = _empty_past(name, shape, dtype, axes.get(name, 0))
    out = []
    for w in windows:
        sample = {}
        for name, role in roles.items():
            sample[name] = w[None].astype(specs[name][1]) if role == "ids" else fixed[name].copy()
        out.append(sample)
    return out
