"""Live calibration tensors for the FP and quantized streams, spilled to disk past a memory budget.

Reconstruction keeps every calibration sample of each live tensor (never silently truncating);
when they no longer fit in the budget, new arrays go to numpy memmaps in a temporary folder.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np


class TensorStore:
    """name -> array with the calibration samples on axis 0."""

    def __init__(self, budget_bytes: float, spill_dir: str | None = None):
        self.budget = float(budget_bytes)
        self._arrays: dict[str, np.ndarray] = {}
        self._dir = None
        self._spill_root = spill_dir
        self.spilled: set[str] = set()
        self.peak_bytes = 0

    def _in_memory(self) -> int:
        return sum(a.nbytes for n, a in self._arrays.items() if n not in self.spilled)

    def put(self, name: str, array: np.ndarray) -> None:
        self.drop(name)
        if self._in_memory() + array.nbytes > self.budget and array.dtype != object:  # per-unit arrays stay in memory
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="onnxflex-spill-", dir=self._spill_root))
            fname = self._dir / f"{len(self.spilled)}_{abs(hash(name))}.npy"
            mm = np.lib.format.open_memmap(fname, mode="w+", dtype=array.dtype, shape=array.shape)
            mm[...] = array
            mm.flush()
            self._arrays[name] = mm
            self.spilled.add(name)
        else:
            self._arrays[name] = np.ascontiguousarray(array)
        self.peak_bytes = max(self.peak_bytes, self._in_memory())

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self._arrays

    def names(self) -> list[str]:
        return list(self._arrays)

    def drop(self, name: str) -> None:
        arr = self._arrays.pop(name, None)
        if name in self.spilled:
            self.spilled.discard(name)
            fname = getattr(arr, "filename", None)
            del arr
            if fname:
                Path(fname).unlink(missing_ok=True)

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
