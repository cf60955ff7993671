"""Greedy decoding with an ONNX decoder LM, to check that a quantized export still generates the same text
and to time onnxruntime's decode loop.

Two export forms are supported, told apart by their inputs (:func:`onnxflex.calib.windows.is_past_input`):

* **no cache** (``input_ids``, ``attention_mask`` [, ``position_ids``] -> ``logits``): every step re-runs the
  whole sequence; simple and exact, but quadratic.
* **KV cache** (plus ``past_key_values.*`` inputs -> ``present.*`` outputs): the prompt is fed once with an
  empty past, then one token a step with the previous step's presents as the next past.

Pairing rule (:func:`pair_cache`): the past input ``P`` is fed from the output named ``P`` with its first
``past_key_values`` replaced by ``present`` (``past_key_values.0.key`` -> ``present.0.key``, the
transformers / optimum / onnxruntime-genai convention), else with its first ``past`` replaced by ``present``
(``past.0.value`` -> ``present.0.value``, ``past_key_3`` -> ``present_key_3``).  Names are matched exactly
(case included) and no two inputs may share an output; pairing by position is never guessed, since a
swapped key/value would decode garbage without an error.

Batch 1, no sampling and no end-of-sequence stop: ``steps`` tokens are always generated, so runs of two
models compare token for token and timings cover a fixed amount of work.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from ..calib.windows import decoder_feeds, decoder_roles, is_past_input
from ..errors import OnnxflexError
from .perplexity import _logits_output
from .session import _summarize, input_specs, make_session


def pair_cache(inputs: Sequence[str], outputs: Sequence[str]) -> dict[str, str]:
    """{past input: the present output that feeds it next step} for every KV-cache input in ``inputs``
    (rule in the module doc); OnnxflexError naming the inputs that find no output, or that share one."""
    outs = set(outputs)
    pairs: dict[str, str] = {}
    missing = []
    for name in inputs:
        if not is_past_input(name):
            continue
        cands = [name.replace(old, "present", 1) for old in ("past_key_values", "past") if old in name]
        hit = next((c for c in cands if c in outs and c != name), None)
        if hit is None:
            missing.append(name)
        else:
            pairs[name] = hit
    if missing:
        raise OnnxflexError(
            f"KV-cache input(s) {', '.join(map(repr, missing))} have no matching output (expected the name with "
            f"'past_key_values' or 'past' replaced by 'present'; outputs: {', '.join(outputs)}); "
            "export the model with present.* outputs named after its past_key_values.* inputs")
    shared: dict[str, list[str]] = {}
    for p, o in pairs.items():
        shared.setdefault(o, []).append(p)
    dup = {o: ps for o, ps in shared.items() if len(ps) > 1}
    if dup:
        o, ps = next(iter(dup.items()))
        raise OnnxflexError(f"KV-cache inputs {', '.join(map(repr, ps))} would all be fed from output {o!r}; "
                            "export the model with one present output per past input")
    return pairs


class _Decoder:
    """One greedy decoding state over a session: :meth:`prefill` a prompt, then :meth:`step` a token at a
    time; both return the next token's logits [vocab]."""

    def __init__(self, sess):
        self.sess = sess
        self.specs = input_specs(sess)
        self.roles = decoder_roles(self.specs)  # OnnxflexError for inputs a decoder cannot fill
        self.logits = _logits_output(sess, "the model")
        self.outputs = [o.name for o in sess.get_outputs()]
        self.pairs = pair_cache(list(self.specs), self.outputs)
        self.kv = bool(self.pairs)
        self.fetch = [self.logits] + list(self.pairs.values())
        self.ids: list[int] = []
        self.past: dict[str, np.ndarray] = {}

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        try:
            out = self.sess.run(self.fetch, feeds)
        except Exception as e:
            raise OnnxflexError(f"the decoder rejected its inputs: {_summarize(e)}; check it is a causal LM export "
                                "with input_ids [batch, seq] and logits [batch, seq, vocab]") from None
        if self.kv:
            for (past, _), arr in zip(self.pairs.items(), out[1:]):
                want = self.specs[past][1]
                self.past[past] = arr if arr.dtype == want else arr.astype(want)
        return out[0][0, -1]

    def _full(self, ids: list[int]) -> dict[str, np.ndarray]:
        """Feeds for the whole sequence with an empty past (decoder_feeds: mask ones, positions 0..N-1)."""
        return decoder_feeds(np.asarray([ids], dtype=np.int64), self.specs)[0]

    def prefill(self, prompt: Sequence[int]) -> np.ndarray:
        ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
        if not ids:
            raise OnnxflexError("the prompt is empty; pass at least one token id")
        self.ids = ids
        self.past = {}
        logits = self._run(self._full(ids))
        if self.kv:
            for past, arr in self.past.items():
                rank = self.specs[past][0]
                if rank is not None and arr.ndim != len(rank):
                    raise OnnxflexError(f"output {self.pairs[past]!r} has rank {arr.ndim} but it feeds input {past!r} "
                                        f"of rank {len(rank)}; the past/present names pair the wrong tensors")
        return logits

    def step(self, token: int) -> np.ndarray:
        if not self.kv:
            self.ids.append(int(token))
            return self._run(self._full(self.ids))
        past_len = len(self.ids)  # tokens already in the cache
        self.ids.append(int(token))
        feeds: dict[str, Any] = dict(self.past)
        for name, role in self.roles.items():
            dtype = self.specs[name][1]
            if role == "ids":
                feeds[name] = np.array([[token]], dtype=dtype)
            elif role == "attention_mask":
                feeds[name] = np.ones((1, past_len + 1), dtype=dtype)
            elif role == "position_ids":
                feeds[name] = np.array([[past_len]], dtype=dtype)
            elif role == "type_ids":
                feeds[name] = np.zeros((1, 1), dtype=dtype)
        return self._run(feeds)


def _session(model, providers, optimization, threads):
    if hasattr(model, "run") and hasattr(model, "get_inputs"):  # an InferenceSession already
        return model
    return make_session(model, providers=providers, threads=threads, optimization=optimization)


def greedy(model, prompt_ids: Sequence[int], steps: int = 32, providers=("cpu",), optimization: str = "all",
           threads: int | None = None) -> list[int]:
    """The ``steps`` tokens (prompt excluded) that greedy decoding (argmax, batch 1, no EOS stop) appends to
    ``prompt_ids`` with the ONNX decoder ``model`` (path, ModelProto, bytes or an InferenceSession), in
    either export form (module doc).  Used to check a quantized model generates what the FP32 one does."""
    steps = int(steps)
    if steps < 0:
        raise OnnxflexError(f"steps must be >= 0, got {steps}")
    dec = _Decoder(_session(model, providers, optimization, threads))
    if steps == 0:
        return []
    tokens = [int(np.argmax(dec.prefill(prompt_ids)))]
    while len(tokens) < steps:
        tokens.append(int(np.argmax(dec.step(tokens[-1]))))
    return tokens


def tokens_per_second(model, prompt_ids: Sequence[int], steps: int = 32, providers=("cpu",),
                      optimization: str = "all", threads: int | None = None) -> tuple[int, float]:
    """(tokens, seconds) of ``steps`` greedy decode steps, for an onnxruntime tokens/s figure.

    Session creation, the prompt's prefill and one decode step (warm-up: ORT plans and allocates for the new
    shapes on its first runs) are left out; what is timed is the steady-state loop of ``steps`` one-token
    steps (the whole sequence each step for a no-cache export).
    """
    steps = int(steps)
    if steps < 1:
        raise OnnxflexError(f"steps must be >= 1 to time decoding, got {steps}")
    dec = _Decoder(_session(model, providers, optimization, threads))
    tok = int(np.argmax(dec.prefill(prompt_ids)))
    tok = int(np.argmax(dec.step(tok)))  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = int(np.argmax(dec.step(tok)))
    return steps, time.perf_counter() - t0
