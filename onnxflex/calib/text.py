"""Text calibration: a text file -> token feeds, with the model's own tokenizer.

Encoders (BERT-like): one text per line, tokenized with a Hugging Face tokenizer folder
(``tokenizer.json``, or a BERT ``vocab.txt``), every text padded to one common length so samples batch
together; the :class:`~onnxflex.calib.CalibrationSet`'s ``token_mask`` marks the padding, so that padded
positions do not skew activation ranges.

Decoders (causal LMs, see :func:`onnxflex.calib.windows.is_decoder`): the whole file is one token stream
cut into windows of ``seq_len`` tokens (:func:`load_decoder_text`); nothing is padded, so ``token_mask``
is None (every position counts).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import OnnxflexError
from .dataset import CalibrationSet, fmt_shape, is_static, norm_specs, static_batch
from .windows import DEFAULT_SEQ_LEN, decoder_feeds, static_seq_len, token_role, token_windows

TEXT_EXTENSIONS = (".txt", ".text")
TOKEN_INPUTS = "input_ids / ids / input, attention_mask / mask, token_type_ids / segment_ids"


def is_text_file(path: Any) -> bool:
    """True for a ``.txt``/``.text`` path, so callers can route ``--calib sentences.txt`` here."""
    return isinstance(path, (str, Path)) and Path(path).suffix.lower() in TEXT_EXTENSIONS


def _read_bytes(p: Path, what: str, hint: str) -> bytes:
    """The bytes of a text file, or one error line saying what is wrong with the path."""
    if not p.exists():
        raise OnnxflexError(f"{what} {p} does not exist; check the path")
    if p.is_dir():
        raise OnnxflexError(f"{p} is a folder, not a text file; pass {hint}")
    try:
        return p.read_bytes()
    except PermissionError:
        raise OnnxflexError(f"cannot read {p} (permission denied); fix its permissions") from None
    except OSError as e:
        raise OnnxflexError(f"cannot read {p} ({e.strerror or e}); check the file") from None


def read_texts(path: str | Path) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file (one text per line), in file order."""
    p = Path(path)
    raw = _read_bytes(p, "calibration text file", "a UTF-8 .txt file with one text per line")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise OnnxflexError(f"{p} is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8, one text per line") from None
    texts = [line.strip() for line in text.split("\n")]
    texts = [t for t in texts if t]
    if not texts:
        raise OnnxflexError(f"{p} holds no text; put one calibration text per line")
    return texts


def read_text_stream(path: str | Path) -> str:
    """The whole UTF-8 (else Latin-1) text of a file, line ends normalised to ``\\n``: one token stream."""
    p = Path(path)
    raw = _read_bytes(p, "text file", "a UTF-8 .txt file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # every byte decodes; older corpora (gensim's lee.cor) are Latin-1
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise OnnxflexError(f"{p} holds no text")
    return text


def tokenize_stream(text: str, tokenizer_folder: str | Path) -> np.ndarray:
    """``text`` as one int64 token stream: no padding, no truncation, the tokenizer's own special tokens
    (e.g. one BOS at the start) as ``transformers`` adds them."""
    tok = load_tokenizer(tokenizer_folder)
    tok.no_padding()
    tok.no_truncation()
    try:
        ids = tok.encode(text).ids
    except Exception as e:
        raise OnnxflexError(f"tokenizing the text failed ({type(e).__name__}: {e}); check the tokenizer") from None
    return np.asarray(ids, dtype=np.int64)


def load_decoder_text(
    path: str | Path, input_specs: dict, tokenizer: str | Path | None, seq_len: int | None = None, size: int | None = None
) -> CalibrationSet:
    """A text file -> :class:`CalibrationSet` of ``size`` windows of ``seq_len`` tokens (the GPTQ/FlexRound
    decoder protocol): the file tokenized as one stream, cut into consecutive non-overlapping windows, each
    one sample fed as :func:`~onnxflex.calib.windows.decoder_feeds` builds it (empty KV cache).

    ``seq_len`` None: the model's fixed sequence length, else 512.  ``size`` None: every full window.
    ``token_mask`` is None: no position is padding.
    """
    if tokenizer is None:
        raise OnnxflexError("decoder text calibration needs --tokenizer DIR (a Hugging Face tokenizer folder with tokenizer.json)")
    if size is not None and int(size) < 1:
        raise OnnxflexError(f"calibration size must be at least 1, got {size}")
    specs = norm_specs(input_specs)
    fixed = static_seq_len(specs)
    if seq_len is None:
        seq_len = fixed or DEFAULT_SEQ_LEN
    elif fixed is not None and int(seq_len) != fixed:
        raise OnnxflexError(f"the model takes exactly {fixed} tokens; use --seq-len {fixed} (got {seq_len})")
    ids = tokenize_stream(read_text_stream(path), tokenizer)
    windows = token_windows(ids, int(seq_len), None if size is None else int(size))
    samples = decoder_feeds(windows, specs)
    return CalibrationSet(samples, list(specs), str(path), None, static_batch(specs), specs, token_mask=None)


def _read_config(folder: Path) -> dict:
    f = folder / "tokenizer_config.json"
    if not f.is_file():
        return {}
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OnnxflexError(f"{f} is not readable JSON ({type(e).__name__}: {e}); fix or delete it") from None
    return cfg if isinstance(cfg, dict) else {}


def _token(v: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def load_tokenizer(folder: str | Path, max_length: int = 128, length: int | None = None):
    """A ``tokenizers`` tokenizer from a Hugging Face folder, set to truncate at ``max_length`` and pad a
    batch to its longest text (or to exactly ``length`` when given: a model with a static sequence dim).

    ``tokenizer.json`` is preferred; with only ``vocab.txt`` a BERT WordPiece tokenizer is built, with
    ``do_lower_case`` etc. from ``tokenizer_config.json``.  Pad token: the tokenizer's own padding setting,
    else ``pad_token`` from the config, else ``[PAD]`` if in the vocab, else id 0; pad side: the config's
    ``padding_side`` (default right), as ``transformers`` does.
    """
    try:
        import tokenizers
    except ImportError:
        raise OnnxflexError("text calibration needs the tokenizers library; pip install tokenizers") from None
    folder = Path(folder)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise OnnxflexError(f"tokenizer folder {folder} {what}; pass a Hugging Face tokenizer folder with tokenizer.json or vocab.txt")
    if max_length < 1:
        raise OnnxflexError(f"max token length must be at least 1, got {max_length}")
    cfg = _read_config(folder)
    try:
        if (folder / "tokenizer.json").is_file():
            tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.txt").is_file():
            names = ("unk_token", "sep_token", "cls_token", "pad_token", "mask_token")
            special = {k: _token(cfg[k]) for k in names if _token(cfg.get(k))}
            tok = tokenizers.BertWordPieceTokenizer(
                str(folder / "vocab.txt"),
                lowercase=bool(cfg.get("do_lower_case", True)),
                strip_accents=cfg.get("strip_accents"),
                handle_chinese_chars=bool(cfg.get("tokenize_chinese_chars", True)),
                **special,
            )
        else:
            raise OnnxflexError(
                f"tokenizer folder {folder} has neither tokenizer.json nor vocab.txt; pass the model's Hugging Face tokenizer folder"
            )
    except OnnxflexError:
        raise
    except Exception as e:
        raise OnnxflexError(f"cannot load the tokenizer in {folder} ({type(e).__name__}: {e}); check its tokenizer files") from None

    own = tok.padding or {}
    cfg_pad = _token(cfg.get("pad_token"))
    if own.get("pad_token") is not None:
        pad_token, pad_id, pad_type = own["pad_token"], int(own.get("pad_id", 0)), int(own.get("pad_type_id", 0))
    elif cfg_pad is not None and tok.token_to_id(cfg_pad) is not None:
        pad_token, pad_id, pad_type = cfg_pad, tok.token_to_id(cfg_pad), 0
    elif tok.token_to_id("[PAD]") is not None:
        pad_token, pad_id, pad_type = "[PAD]", tok.token_to_id("[PAD]"), 0
    else:
        pad_token, pad_id, pad_type = tok.id_to_token(0) or "[PAD]", 0, 0
    side = str(cfg.get("padding_side", "right")).lower()
    if side not in ("left", "right"):
        raise OnnxflexError(f"padding_side {side!r} in {folder / 'tokenizer_config.json'} is not left or right; fix it")
    tok.enable_padding(direction=side, pad_id=pad_id, pad_type_id=pad_type, pad_token=pad_token, length=length)
    tok.enable_truncation(max_length=int(length if length is not None else max_length))
    return tok


def tokenize_feeds(
    texts: Sequence[str], tokenizer_folder: str | Path, input_specs: dict, max_length: int = 128
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Tokenize ``texts`` for a model with ``input_specs`` ({name: (dims, dtype)}) -> (feeds, mask).

    Every text is padded to one length: the longest encoded text capped at ``max_length``, or the model's
    static sequence dim when it has one.  ``feeds`` maps each model input to an [N, S] array in its dtype;
    ``mask`` is the [N, S] int64 attention mask (1 = token, 0 = padding).
    """
    specs = norm_specs(input_specs)
    roles, static_len = {}, set()
    for name, (shape, dtype) in specs.items():
        role = token_role(name)
        if role is None:
            raise OnnxflexError(
                f"model input {name!r} is not a token input text calibration can fill (known: {TOKEN_INPUTS}); pass .npz feeds instead"
            )
        if shape is not None and len(shape) != 2:
            raise OnnxflexError(
                f"model input {name!r} has shape {fmt_shape(shape)}, not [batch, seq]; pass .npz feeds instead of text"
            )
        if not (np.issubdtype(dtype, np.integer) or (role == "attention_mask" and dtype.kind in "fb")):
            raise OnnxflexError(f"model input {name!r} is {dtype}, not integer token data; pass .npz feeds instead of text")
        if shape is not None and is_static(shape[1]):
            static_len.add(int(shape[1]))
        roles[name] = role
    if len(static_len) > 1:
        raise OnnxflexError(f"the model's token inputs have different fixed lengths {sorted(static_len)}; pass .npz feeds instead")
    tok = load_tokenizer(tokenizer_folder, max_length, next(iter(static_len), None))
    try:
        encs = tok.encode_batch(list(texts))
    except Exception as e:
        raise OnnxflexError(f"tokenizing the calibration texts failed ({type(e).__name__}: {e}); "
                            "check --max-length and the tokenizer") from None
    arrays = {
        "ids": np.array([e.ids for e in encs], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
        "type_ids": np.array([e.type_ids for e in encs], dtype=np.int64),
    }
    feeds = {name: arrays[role].astype(specs[name][1]) for name, role in roles.items()}
    return feeds, arrays["attention_mask"]


def load_text_calibration(
    path: str | Path, input_specs: dict, tokenizer: str | Path | None, max_length: int = 128, size: int | None = None
) -> CalibrationSet:
    """A text file (one text per line) -> :class:`CalibrationSet` with ``token_mask`` set.

    ``size`` keeps the first N texts; they are tokenized with the ``tokenizer`` folder (see
    :func:`tokenize_feeds`) and each becomes one sample of [1, S] arrays.
    """
    if tokenizer is None:
        raise OnnxflexError("text calibration needs --tokenizer DIR (a Hugging Face tokenizer folder with tokenizer.json or vocab.txt)")
    if size is not None and int(size) < 1:
        raise OnnxflexError(f"calibration size must be at least 1, got {size}")
    specs = norm_specs(input_specs)
    texts = read_texts(path)
    if size is not None:
        texts = texts[: int(size)]
    feeds, mask = tokenize_feeds(texts, tokenizer, specs, max_length)
    samples = [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(len(texts))]
    return CalibrationSet(samples, list(specs), str(path), None, static_batch(specs), specs, token_mask=mask)


def infer_token_mask(calib: CalibrationSet) -> np.ndarray | None:
    """The [N, S] 0/1 attention mask of a calibration set built from .npz files or dicts, if one input is
    an attention mask (named ``*attention_mask*`` or ``mask``, 2-D, integer/bool, values 0/1); else None."""
    names = [n for n in calib.input_names if "attention_mask" in n.lower() or n.lower() == "mask"]
    if len(names) != 1 or not calib.samples:
        return None
    try:
        arr = calib.stacked()[names[0]]
    except OnnxflexError:  # samples of different lengths
        return None
    if arr.ndim != 2 or arr.dtype.kind not in "iub" or not np.isin(arr, (0, 1)).all():
        return None
    return arr.astype(np.int64)
