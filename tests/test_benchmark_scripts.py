"""The benchmark scripts still run (smoke mode on CPU); their numbers come from real runs, not from here."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_runs_in_tiny_cpu_mode():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu",
                          "--steps", "3", "--warmup", "1"], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tokens_per_s"] > 0 and result["attention"] == "sdpa"
