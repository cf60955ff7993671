"""Text for decoder-LM calibration and evaluation, from gensim's wheel (PyPI; no network at run time).

* calibration: :func:`lee_text` -- ``gensim/test/test_data/lee_background.cor``, 300 Australian news
  documents (one per line, 360,082 characters, 59,890 whitespace words; ASCII).
* evaluation: :func:`wiki_articles` -- the first ``n`` (default 53) articles of the shortened English
  Wikipedia dump ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, in dump order,
  markup removed with ``gensim.corpora.wikicorpus.filter_wiki``.  The dump holds 206 pages: 100 redirects
  and 106 non-empty articles; the first 53 are the evaluation set, the other 53 are left alone (held out).
  Calibration and evaluation never share text.

:func:`write_text` saves texts as a corpus file for ``onnxflex quantize --calib`` / ``eval --data``
(decoders read the whole file as one token stream).
"""
from __future__ import annotations

from pathlib import Path

EVAL_ARTICLES = 53
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gensim") is not None


def test_data_dir() -> Path:
    """gensim's ``test/test_data`` folder (inside the installed wheel)."""
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise ImportError("the text corpora need gensim's test data: pip install gensim") from None
    return Path(datapath(LEE_FILE)).parent


def lee_text() -> str:
    """The whole of ``lee_background.cor`` (one document per line), decoded as UTF-8, else Latin-1."""
    raw = (test_data_dir() / LEE_FILE).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _is_redirect(text: str) -> bool:
    return text.lstrip().lower().startswith("#redirect")


def wiki_articles(n: int | None = EVAL_ARTICLES) -> list[str]:
    """The first ``n`` (None: all 106) non-empty, non-redirect articles of the shortened Wikipedia dump,
    in dump order, as plain text (``filter_wiki``; surrounding whitespace stripped)."""
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out: list[str] = []
    with bz2.open(test_data_dir() / WIKI_FILE) as f:
        for _title, text, _pageid in extract_pages(f):
            if n is not None and len(out) >= n:
                break
            if not text or _is_redirect(text):
                continue
            plain = filter_wiki(text).strip()
            if plain:
                out.append(plain)
    return out


def write_text(path, texts) -> Path:
    """Write ``texts`` (a string or a list of strings, joined by blank lines) as UTF-8 to ``path``;
    returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = texts if isinstance(texts, str) else "\n\n".join(t.strip() for t in texts)
    path.write_text(body.rstrip("\n") + "\n", encoding="utf-8")
    return path
