"""What the machine can do, detected rather than assumed: CPU bf16 matrix units and the accelerator in use.

CPUs of the same cloud kind differ: one had AVX512-BF16 only, another AMX, where a bf16 matmul ran ~9x the
fp32 one through oneDNN. Every choice that depends on it (default precision on CPU) and every CPU benchmark
figure reads it from here.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

CPU_BF16_KINDS = ("amx", "avx512_bf16", "none")


@lru_cache(maxsize=1)
def cpu_bf16() -> str:
    """`amx` (AMX-BF16 tiles), `avx512_bf16`, or `none`: the fastest bf16 matrix path this CPU offers.

    /proc/cpuinfo's flags are what the OS enabled; where there are none (macOS), torch's cpuinfo answers.
    """
    flags = _cpu_flags()
    if flags:
        if {"amx_bf16", "amx_tile"} <= flags:
            return "amx"
        return "avx512_bf16" if "avx512_bf16" in flags else "none"
    import torch

    cpu = getattr(torch, "cpu", None)
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    return "avx512_bf16" if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() else "none"


def _cpu_flags() -> set[str]:
    """The `flags` of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_name() -> str:
    """The CPU's model name, for benchmark records."""
    path = Path("/proc/cpuinfo")
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    import platform

    return platform.processor() or platform.machine()


def cpu_has_fast_bf16() -> bool:
    """True where bf16 matmuls beat fp32 on this CPU (AMX or AVX512-BF16)."""
    return cpu_bf16() != "none"
