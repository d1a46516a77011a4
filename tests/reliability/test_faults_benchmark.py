"""``benchmarks.faults --quick`` runs and reports the headline in the common JSON result (contract 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.bench]
REPO = Path(__file__).resolve().parents[2]


def test_quick_fault_benchmark_writes_its_result(tmp_path):
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.faults", "--quick", "--out", str(out)], cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "faults" and result["quick"] is True
    assert result["injected"] >= 10 and result["clean_or_recovered"] == result["injected"]
    assert result["silent_or_destructive"] == 0
    assert "faults injected" in proc.stdout and "silent or destructive 0" in proc.stdout


def test_other_parts_can_register_cases():
    from benchmarks.faults import FAULTS, Verdict, fault

    @fault("X-test-only", "test", "registration works")
    def _case(ctx):
        return Verdict("recovery")

    try:
        assert FAULTS["X-test-only"].run(None).outcome == "recovery"
        with pytest.raises(ValueError, match="registered twice"):
            fault("X-test-only", "test", "again")(_case)
    finally:
        FAULTS.pop("X-test-only")
