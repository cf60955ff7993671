"""What this machine's CPU gives onnxruntime's int8 kernels: one place reads /proc/cpuinfo.

On x86, onnxruntime's fused u8 x s8 kernels (QLinearConv, MatMulIntegerToFloat, QGemm) multiply with
VPMADDUBSW when the CPU has AVX2 but no VNNI: it adds two u8 x s8 products into an int16 that
saturates at 32767, and 2 x 255 x 127 reaches 64770. With weights on a 7-bit grid ([-63, 63]) the
pair sum stays below 2 x 255 x 63 = 32130, which is onnxruntime's own remedy (``reduce_range``).
VNNI (VPDPBUSD) and AMX add into int32 and do not saturate.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Iterable, Optional

# flags whose int8 dot products accumulate in int32 (no int16 pair saturation)
INT32_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# the flags a timing table names (which kernels onnxruntime picks depends on them)
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset:
    """The first CPU's feature flags (an empty set where /proc/cpuinfo is absent: macOS, Windows)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def int8_kernels_saturate(flags: Optional[Iterable[str]] = None) -> bool:
    """True on an x86 CPU with AVX2 and no VNNI/AMX: onnxruntime's u8s8 kernels saturate there with
    full-range int8 weights (measured, README "Measuring a QDQ model")."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    return "avx2" in flags and not flags & INT32_DOT_FLAGS


def describe_cpu(flags: Optional[Iterable[str]] = None) -> str:
    """'x86_64, avx2 yes, avx512f no, ...': the line a benchmark prints beside its timings."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    return f"{platform.machine()}, " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in REPORTED_FLAGS)
