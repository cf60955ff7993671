"""Live calibration tensors for the FP and quantized streams, compact in memory and spilled to files
past a memory budget.

Reconstruction keeps every calibration sample of each live tensor (never silently truncating). Two
things keep that bounded (issue 11: a 224-px CNN's widest tensors are 1.2 GB per stream at 256 images):

* **compact**: a float32 tensor of a compact store is held as float16 (half the bytes; its rounding,
  about 5e-4 relative, lies far below 8-bit quantization noise: bench/stream_precision.py measures
  it), and read back as float32. A tensor whose values leave float16's range is widened to float32.
* **spilled**: a tensor that would take the store past its budget goes to a file written batch by
  batch and read with plain file reads: the page cache holds it, not this process (a memory map
  would count every page it touched as resident).

Producers write a tensor batch by batch (:meth:`TensorStore.allocate`) so no joined copy is ever
made; readers index a :class:`StoredArray` like a numpy array and get the tensor's own dtype.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

FLOAT16_SAFE = 65000.0  # beyond this a value would round to inf in float16


def _index_rows(key):
    """(rows, rest) for a key that indexes axis 0 (a slice, an int array, or a tuple starting with one)."""
    if isinstance(key, tuple):
        return (key[0] if key else slice(None)), key[1:]
    return key, ()


class StoredArray:
    """One stored tensor: ``shape`` and ``dtype`` are the tensor's; the bytes may be float16 or on disk."""

    def __init__(self, shape: tuple, dtype, storage, data: np.ndarray | None = None, path: Path | None = None):
        self.shape, self.dtype, self.storage = tuple(shape), np.dtype(dtype), np.dtype(storage)
        self._data, self.path = data, path
        self._fd = None if path is None else os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if self._fd is not None:
            os.ftruncate(self._fd, self.nbytes)
        self._row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.storage.itemsize if self.shape else 0

    # -- what numpy-style readers use
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes as stored."""
        return self.size * self.storage.itemsize

    @property
    def on_disk(self) -> bool:
        return self._fd is not None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if not self.on_disk:
            return _cast(np.asarray(self._data[key]), self.dtype)
        rows, rest = _index_rows(key)
        out = self._read_rows(rows)
        return out[(slice(None),) + rest] if rest else out

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype, copy=False)

    def _read_rows(self, rows) -> np.ndarray:
        n = self.shape[0]
        if isinstance(rows, (int, np.integer)):
            r = int(rows) % n
            return self._read(r, r + 1)[0]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return self._read(start, max(start, stop))
            rows = np.arange(start, stop, step)
        rows = np.asarray(rows).reshape(-1)
        if not rows.size:
            return np.empty((0,) + self.shape[1:], self.dtype)
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)  # one read per run of consecutive rows
        parts = [self._read(int(r[0]), int(r[-1]) + 1) for r in runs]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _read(self, start: int, stop: int) -> np.ndarray:
        raw = np.empty((stop - start,) + self.shape[1:], self.storage)
        _pread_into(self._fd, raw, start * self._row)
        return _cast(raw, self.dtype)

    # -- what producers use
    def write(self, start: int, part: np.ndarray) -> None:
        """Rows [start, start + len(part)) on axis 0; a float16 store widens when ``part`` needs it."""
        part = np.asarray(part)
        if self.storage == np.float16 and part.size and not _fits_float16(part):
            self._widen()
        if not self.on_disk:
            _assign(self._data[start:start + len(part)], part)
            return
        _pwrite_all(self._fd, _cast(part, self.storage), start * self._row)

    def _widen(self) -> None:
        """float16 -> float32 storage, keeping what is written."""
        old_fd, old_row, n = self._fd, self._row, self.shape[0]
        self.storage, self._row = np.dtype(np.float32), old_row * 2
        if not self.on_disk:
            self._data = _cast(self._data, np.float32)
            return
        self._fd = os.open(str(self.path) + ".f32", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self._fd, self.nbytes)
        step = max(1, (64 << 20) // max(old_row, 1))
        for s in range(0, n, step):
            block = np.empty((min(n, s + step) - s,) + self.shape[1:], np.float16)
            _pread_into(old_fd, block, s * old_row)
            _pwrite_all(self._fd, _cast(block, np.float32), s * self._row)
        os.close(old_fd)
        Path(self.path).unlink(missing_ok=True)
        self.path = Path(str(self.path) + ".f32")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            Path(self.path).unlink(missing_ok=True)
        self._data = None

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _pread_into(fd: int, arr: np.ndarray, offset: int) -> None:
    """Fill ``arr`` (contiguous) from the file at ``offset``, straight into its memory."""
    view = memoryview(arr.reshape(-1).view(np.uint8))
    while len(view):  # a short read happens only past 2 GB
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise OSError("short read from a spill file")
        view, offset = view[got:], offset + got


def _pwrite_all(fd: int, arr: np.ndarray, offset: int) -> None:
    """Write ``arr`` to the file at ``offset`` from its own memory (no bytes copy)."""
    view = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    while len(view):
        got = os.pwrite(fd, view, offset)
        view, offset = view[got:], offset + got


def _fits_float16(a: np.ndarray) -> bool:
    """No finite value beyond float16's range (inf and nan stay what they are)."""
    t = _torch().from_numpy(np.ascontiguousarray(a))
    lo, hi = _torch().aminmax(t)
    big = max(-float(lo), float(hi))
    if big <= FLOAT16_SAFE:
        return True
    if math.isfinite(big):
        return False
    t = t.abs()  # inf or nan present: look at the finite values only
    return not bool(((t > FLOAT16_SAFE) & _torch().isfinite(t)).any())


# numpy converts float16 one element at a time (0.4 GB/s here); torch's vectorised copies are ~10x faster
_TORCH_TYPES = (np.float16, np.float32)


def _torch():
    import torch

    return torch


def _cast(a: np.ndarray, dtype, copy: bool = False) -> np.ndarray:
    """``a`` as ``dtype`` (float16 <-> float32 through torch)."""
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a.copy() if copy else a
    if a.dtype in _TORCH_TYPES and dtype in _TORCH_TYPES and a.size:
        out = np.empty(a.shape, dtype)
        _assign(out, a)
        return out
    return a.astype(dtype)


def _assign(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src, converting float16 <-> float32 through torch."""
    if dst.dtype != src.dtype and dst.dtype in _TORCH_TYPES and src.dtype in _TORCH_TYPES and dst.flags.writeable:
        torch = _torch()
        torch.from_numpy(dst).copy_(torch.from_numpy(np.ascontiguousarray(src)))
    else:
        dst[...] = src


class TensorStore:
    """name -> stored array with the calibration samples on axis 0 (or as the tensor's layout says)."""

    def __init__(self, budget_bytes: float, spill_dir: str | None = None, compact: bool = False):
        self.budget = float(budget_bytes)
        self.compact = compact
        self._arrays: dict[str, object] = {}
        self._dir = None
        self._spill_root = spill_dir
        self.peak_bytes = 0

    @property
    def spilled(self) -> set:
        return {n for n, a in self._arrays.items() if isinstance(a, StoredArray) and a.on_disk}

    def _in_memory(self) -> int:
        return sum(a.nbytes for a in self._arrays.values() if not getattr(a, "on_disk", False))

    def _storage(self, dtype, compact: bool | None):
        dtype = np.dtype(dtype)
        use = self.compact if compact is None else compact
        return np.dtype(np.float16) if use and dtype == np.float32 else dtype

    def allocate(self, name: str, shape: tuple, dtype, spillable: bool = True,
                 compact: bool | None = None) -> StoredArray:
        """An empty tensor to be written batch by batch (rows on axis 0): in memory while the store stays
        within its budget, else (when ``spillable``) in a file."""
        self.drop(name)
        storage = self._storage(dtype, compact)
        nbytes = int(np.prod(shape, dtype=np.int64)) * storage.itemsize
        if spillable and self._in_memory() + nbytes > self.budget:
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="onnxflex-spill-", dir=self._spill_root))
            arr = StoredArray(shape, dtype, storage, path=self._dir / f"{len(os.listdir(self._dir))}_{abs(hash(name))}.bin")
        else:
            arr = StoredArray(shape, dtype, storage, data=np.empty(shape, storage))
        self._arrays[name] = arr
        self.peak_bytes = max(self.peak_bytes, self._in_memory())
        return arr

    def put(self, name: str, array: np.ndarray, compact: bool | None = None) -> None:
        """A whole tensor at once (object arrays of a locked graph's units are kept as they are)."""
        array = np.asarray(array) if not isinstance(array, StoredArray) else array
        if isinstance(array, StoredArray) or array.dtype == object or array.ndim == 0:
            self.drop(name)
            self._arrays[name] = array
        elif self._storage(array.dtype, compact) == array.dtype and self._in_memory() + array.nbytes <= self.budget:
            self.drop(name)  # kept as it is: no copy
            self._arrays[name] = StoredArray(array.shape, array.dtype, array.dtype, data=np.ascontiguousarray(array))
        else:
            self.allocate(name, array.shape, array.dtype, compact=compact).write(0, array)
        self.peak_bytes = max(self.peak_bytes, self._in_memory())

    def __getitem__(self, name: str):
        return self._arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self._arrays

    def names(self) -> list[str]:
        return list(self._arrays)

    def release(self, name: str):
        """Hand a tensor over to the caller: the store forgets it and will not close it."""
        return self._arrays.pop(name)

    def drop(self, name: str) -> None:
        arr = self._arrays.pop(name, None)
        if isinstance(arr, StoredArray):
            arr.close()

    def keep_only(self, names: set) -> None:
        for n in list(self._arrays):
            if n not in names:
                self.drop(n)

    def close(self) -> None:
        for n in list(self._arrays):
            self.drop(n)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
