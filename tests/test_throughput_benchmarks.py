"""The training-throughput benchmarks still run end to end in smoke mode (tiny random model, a few steps) and end
with their summary line; their numbers come from quiet-machine runs, never from here."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def last_line_fields(script: str, *args: str) -> dict[str, str]:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", *args], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(pair.split("=") for pair in done.stdout.strip().splitlines()[-1].split())


def test_preference_throughput_compares_ours_with_trl_and_reports_the_bf16_path():
    fields = last_line_fields("preference_throughput.py", "--sides", "dpo_ours,dpo_ours_bf16,dpo_trl")
    assert list(fields)[:3] == ["useful_tokens_per_s_ratio_vs_trl", "padding_fraction", "peak_rss_ratio"]
    assert float(fields["useful_tokens_per_s_ratio_vs_trl"]) > 0 and float(fields["peak_rss_ratio"]) > 0
    assert float(fields["padding_fraction"]) == 0.0  # packed rows: every position is a real token
    assert fields["cpu_bf16"] in ("amx", "avx512_bf16", "none") and float(fields["bf16_over_fp32"]) > 0


def test_sft_throughput_reports_the_bf16_side_over_the_fp32_side():
    fields = last_line_fields("sft_throughput.py", "--trainers", "ours,ours_bf16")
    assert list(fields) == ["cpu_bf16", "bf16_over_fp32"]
    assert fields["cpu_bf16"] in ("amx", "avx512_bf16", "none") and float(fields["bf16_over_fp32"]) > 0
