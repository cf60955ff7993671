"""Perplexity of a decoder LM (ONNX) over a text, the GPTQ / FlexRound way, and its closeness to an FP32 model.

The text is tokenized as one stream and cut into consecutive, non-overlapping windows of ``seq_len`` tokens
(a trailing partial window is dropped); each window is one forward pass with an empty KV cache
(:func:`onnxflex.calib.windows.decoder_feeds`).  Within a window, tokens 1..N-1 are scored from the logits at
0..N-2, so every window scores N-1 tokens and perplexity = exp(mean NLL over all scored tokens).

With ``ref`` (the FP32 model), at the same positions: the mean KL(ref || model) of the next-token
distributions and the fraction of positions whose top-1 next token agrees, plus the reference's own
perplexity.  Log-softmax runs in float64, a chunk of positions at a time.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..calib.text import is_text_file, read_text_stream, tokenize_stream
from ..calib.windows import DEFAULT_SEQ_LEN, decoder_feeds, is_decoder, static_seq_len, token_windows
from ..errors import OnnxflexError
from .metrics import log_softmax
from .session import _ORT_TYPES, _summarize, input_specs, make_session

_CHUNK = 64  # positions per float64 log-softmax


@dataclass
class PerplexityResult:
    """What :func:`perplexity` measured; the ``ref`` fields are None without a reference model."""

    model: str
    windows: int
    seq_len: int
    tokens: int  # scored tokens: windows * (seq_len - 1)
    nll: float  # mean negative log-likelihood (nats/token)
    perplexity: float
    ref: str | None = None
    ref_perplexity: float | None = None
    kl: float | None = None  # mean KL(ref || model) per scored position (nats)
    agreement: float | None = None  # top-1 next-token agreement with ref
    output: str = "logits"

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return d

    def format_table(self) -> str:
        rows = [("model", self.model)]
        if self.ref is not None:
            rows.append(("reference", self.ref))
        rows += [("windows", f"{self.windows} x {self.seq_len} tokens"), ("tokens scored", str(self.tokens)),
                 ("perplexity", f"{self.perplexity:.4f}")]
        if self.ref is not None:
            rows += [("ref perplexity", f"{self.ref_perplexity:.4f}"), ("KL(ref||model)", f"{self.kl:.6f}"),
                     ("top-1 agreement", f"{100 * self.agreement:.2f} %")]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def _name(m: Any) -> str:
    return str(m) if isinstance(m, (str, os.PathLike)) else "<in-memory model>"


def _logits_output(sess, what: str) -> str:
    """The [batch, seq, vocab] float output: one named like ``logits``, else the only rank-3 float output."""
    outs = sess.get_outputs()
    floats = [o for o in outs if o.type in ("tensor(float)", "tensor(float16)", "tensor(double)")]
    named = [o for o in floats if "logits" in o.name.lower() and (o.shape is None or len(o.shape) == 3)]
    rank3 = [o for o in floats if o.shape is not None and len(o.shape) == 3]
    pick = named or (rank3 if len(rank3) == 1 else [])
    if not pick:
        raise OnnxflexError(f"{what} is not a decoder LM: no [batch, seq, vocab] logits output "
                            f"(outputs: {', '.join(o.name for o in outs)}); perplexity needs a causal LM")
    return pick[0].name


def _output_specs(sess) -> dict:
    return {o.name: (list(o.shape) if o.shape is not None else None, np.dtype(_ORT_TYPES.get(o.type, np.float32)))
            for o in sess.get_outputs()}


def _check_decoder(sess, what: str) -> tuple[dict, str]:
    specs = input_specs(sess)
    out = _logits_output(sess, what)
    if not is_decoder(specs, _output_specs(sess)):
        raise OnnxflexError(f"{what} is not a decoder LM (inputs: {', '.join(specs)}); perplexity needs a causal LM "
                            "with input_ids[, attention_mask, position_ids, past_key_values.*] and a logits output")
    return specs, out


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf  # NaN stays NaN


def _token_ids(text_or_ids: Any, tokenizer_dir: str | Path | None) -> np.ndarray:
    if isinstance(text_or_ids, np.ndarray) or (isinstance(text_or_ids, (list, tuple)) and
                                                all(isinstance(t, (int, np.integer)) for t in text_or_ids)):
        ids = np.asarray(text_or_ids)
        if ids.dtype.kind not in "iu":
            raise OnnxflexError(f"token ids must be integers, got {ids.dtype}")
        return ids.astype(np.int64).reshape(-1)
    if isinstance(text_or_ids, os.PathLike) or (
            isinstance(text_or_ids, str) and "\n" not in text_or_ids and len(text_or_ids) < 4096 and is_text_file(text_or_ids)):
        text = read_text_stream(text_or_ids)
    elif isinstance(text_or_ids, str):
        text = text_or_ids
    else:
        raise OnnxflexError(f"perplexity needs a text, a .txt path or token ids, not a {type(text_or_ids).__name__}")
    if tokenizer_dir is None:
        raise OnnxflexError("perplexity of a text needs --tokenizer DIR (a Hugging Face tokenizer folder with tokenizer.json)")
    return tokenize_stream(text, tokenizer_dir)


def perplexity(
    model_path: Any,
    text_or_ids: Any,
    tokenizer_dir: str | Path | None = None,
    seq_len: int | None = DEFAULT_SEQ_LEN,
    ref: Any = None,
    limit_windows: int | None = None,
    providers: Sequence[str] | str = ("cpu",),
    threads: int | None = None,
    optimization: str = "disable",
) -> PerplexityResult:
    """Perplexity of the decoder ``model_path`` (path, ModelProto or bytes) over ``text_or_ids`` (a text, a
    ``.txt`` path, or token ids) in windows of ``seq_len`` tokens (None: the model's fixed length, else 512);
    ``limit_windows`` keeps the first N windows.  With ``ref`` also KL(ref || model), top-1 agreement and
    the reference's perplexity.  See the module docstring for the protocol.
    """
    if limit_windows is not None and int(limit_windows) < 1:
        raise OnnxflexError(f"--limit must be at least 1 window, got {limit_windows}")
    what = _name(model_path)
    ids = _token_ids(text_or_ids, tokenizer_dir)  # text and tokenizer errors before any model loads
    sess = make_session(model_path, providers, threads, optimization=optimization)
    specs, out = _check_decoder(sess, what)
    fixed = static_seq_len(specs)
    if seq_len is None:
        seq_len = fixed or DEFAULT_SEQ_LEN
    elif fixed is not None and int(seq_len) != fixed:
        raise OnnxflexError(f"{what} takes exactly {fixed} tokens; use --seq-len {fixed} (got {seq_len})")
    rsess = rspecs = rout = None
    if ref is not None:
        rsess = make_session(ref, providers, threads, optimization=optimization)
        rspecs, rout = _check_decoder(rsess, _name(ref))
    windows = token_windows(ids, int(seq_len), None if limit_windows is None else int(limit_windows))
    feeds = decoder_feeds(windows, specs)
    rfeeds = decoder_feeds(windows, rspecs) if rsess is not None else None

    def run(s, name, feed, who):
        try:
            y = np.asarray(s.run([name], feed)[0])
        except Exception as e:
            raise OnnxflexError(f"{who} failed on the token windows: {_summarize(e)}; check it is a decoder LM") from None
        if y.ndim != 3 or y.shape[:2] != (1, windows.shape[1]):
            raise OnnxflexError(f"{who} output {name!r} has shape {list(y.shape)}, not [1, {windows.shape[1]}, vocab]; "
                                "perplexity needs per-position logits")
        return y[0]

    nll = rnll = kl = 0.0
    agree = count = 0
    for k, w in enumerate(windows):
        y = run(sess, out, feeds[k], what)
        ry = run(rsess, rout, rfeeds[k], _name(ref)) if rsess is not None else None
        if ry is not None and ry.shape != y.shape:
            raise OnnxflexError(f"model logits {list(y.shape)} and reference logits {list(ry.shape)} differ; "
                                "compare models with the same vocabulary")
        target = w[1:]
        if target.size and (target.max() >= y.shape[-1] or target.min() < 0):
            raise OnnxflexError(f"token id {int(target.max())} is outside the model's vocabulary of {y.shape[-1]}; "
                                "use the model's own tokenizer")
        for s in range(0, len(target), _CHUNK):
            e = min(s + _CHUNK, len(target))
            lp = log_softmax(y[s:e])
            rows = np.arange(e - s)
            nll -= float(lp[rows, target[s:e]].sum())
            if ry is not None:
                rlp = log_softmax(ry[s:e])
                rnll -= float(rlp[rows, target[s:e]].sum())
                kl += float((np.exp(rlp) * (rlp - lp)).sum())
                agree += int((y[s:e].argmax(-1) == ry[s:e].argmax(-1)).sum())
        count += len(target)
    mean = nll / count
    res = PerplexityResult(model=what, windows=int(windows.shape[0]), seq_len=int(seq_len), tokens=int(count),
                           nll=mean, perplexity=_exp(mean), output=out)
    if rsess is not None:
        res.ref = _name(ref)
        res.ref_perplexity = _exp(rnll / count)
        res.kl = max(0.0, kl / count)
        res.agreement = agree / count
    return res
