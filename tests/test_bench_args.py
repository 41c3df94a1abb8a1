"""The benchmarks' own flags: wrong values stop with a usage error before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("value", ["0", "-3"])
def test_coserve_rejects_a_min_requests_below_one(value):
    run = subprocess.run([sys.executable, str(BENCH / "coserve.py"), "--quick",
                          "--min-requests", value], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "--min-requests" in run.stderr and "Traceback" not in run.stderr
    assert run.stdout == ""  # no benchmark ran


@pytest.mark.parametrize("flag, value", [("--dtype", "float16"), ("--lora-worker", "yes")])
def test_serving_rejects_an_unknown_choice(flag, value):
    """float16 has no native CPU path and is not a benchmark dtype, and the LoRA worker is
    auto, on or off: a usage error, not a run."""
    run = subprocess.run([sys.executable, str(BENCH / "serving.py"), "--quick",
                          flag, value], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert flag in run.stderr and "Traceback" not in run.stderr
    assert run.stdout == ""
