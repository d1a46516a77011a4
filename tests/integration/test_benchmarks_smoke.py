"""The benchmark scripts still run (``--quick`` smoke runs; the measurements live in BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name, extra", [
    ("amp", ["--configs", "cnn_demo"]),
    ("trainer_overhead", []),
    ("predict_throughput", []),
])
def test_quick_benchmark_writes_its_result(name: str, extra: list[str], tmp_path: Path) -> None:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out), *extra],
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == name and result["quick"] is True
    assert result["table"]["rows"], result
    assert result["ratio"] is not None and result["ratio"]["value"] > 0
    assert "ratio:" in proc.stdout
