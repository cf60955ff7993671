"""Give freed memory back to the operating system between large steps.

glibc raises its mmap threshold after a large block is freed, so later tensors of a few MB come from the
heap and, once freed, stay in the process: probing a decoder's intermediates left 7 GB of free heap
behind (SmolLM2, 512 tokens). ``malloc_trim`` returns those pages; elsewhere this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def trim() -> None:
    """Return free heap pages to the OS (glibc ``malloc_trim(0)``); a no-op without glibc."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
