"""CPU bf16 capability is read from the machine: /proc/cpuinfo's flags decide, torch answers where none."""

from __future__ import annotations

import medgpt.hardware as hardware


def detect(monkeypatch, flags: set[str]) -> str:
    hardware.cpu_bf16.cache_clear()
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: flags)
    try:
        return hardware.cpu_bf16()
    finally:
        hardware.cpu_bf16.cache_clear()


def test_cpu_bf16_follows_the_flags(monkeypatch):
    assert detect(monkeypatch, {"avx512f", "amx_bf16", "amx_tile", "avx512_bf16"}) == "amx"
    assert detect(monkeypatch, {"avx512f", "avx512_bf16"}) == "avx512_bf16"
    assert detect(monkeypatch, {"avx2", "fma"}) == "none"


def test_cpu_bf16_of_this_machine_matches_its_cpuinfo():
    flags = hardware._cpu_flags()
    kind = hardware.cpu_bf16()
    assert kind in hardware.CPU_BF16_KINDS
    if flags:
        assert (kind == "amx") == ({"amx_bf16", "amx_tile"} <= flags)
        assert (kind == "none") == ("avx512_bf16" not in flags and not {"amx_bf16", "amx_tile"} <= flags)
    assert hardware.cpu_has_fast_bf16() == (kind != "none")
