"""Every benchmark script still runs (``--quick`` smoke runs; the measurements live in BENCHMARKS.md).

One test per entry of ``benchmarks.run_all.BENCHMARKS`` (contract 8: a benchmark added
there without a smoke run here fails ``test_every_benchmark_has_a_smoke_run``). Each run
writes its JSON into a temp folder, never into ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run_all import BENCHMARKS

pytestmark = [pytest.mark.slow, pytest.mark.bench]

REPO = Path(__file__).resolve().parents[2]
DDP_SHAPE = ["--shape", "48", "56", "48"]

# name -> extra arguments of its quick run (smallest inputs that still exercise every code path)
SMOKE: dict[str, list[str]] = {
    "preprocess": ["--workers", "1", "2"],
    "predict_throughput": [],
    "loader": [],
    "trainer_overhead": [],
    "ddp_scaling": DDP_SHAPE,
    "syncs": [],
    "amp": ["--configs", "cnn_demo"],
    "exit_stress": ["--runs", "2"],
    "raw_pipeline": [],
    "explain_faithfulness": ["--work", "bench_out/explain_faithfulness_smoke", "--threads", "1", "--no-cvae",
                             "--occlusion-subjects", "1"],  # the CVAE counterfactual: tests/unit/test_explain.py
    "gpu": ["--device", "cpu", "--models", "cnn3d", "--cnn-shape", "96", "96", "96", "--loader-config", "cnn_demo",
            "--loader-shape", "48", "56", "48", "--loader-voxel-mm", "3", "--loader-subjects", "16", "--loader-batch", "4",
            "--loader-steps", "4", "--workers", "0", "--threads", "1"],
}


# benchmarks whose --quick run is asserted by a test of their own (not run twice)
SMOKE_ELSEWHERE: dict[str, str] = {
    "faults": "tests/reliability/test_faults_benchmark.py",
    "trust_calibration": "tests/integration/test_calibration_e2e.py",
}


def test_every_benchmark_has_a_smoke_run() -> None:
    assert sorted([*SMOKE, *SMOKE_ELSEWHERE]) == sorted(BENCHMARKS)
    for path in SMOKE_ELSEWHERE.values():
        assert (REPO / path).is_file(), path


@pytest.mark.parametrize("name", list(SMOKE))
def test_quick_benchmark_writes_its_result(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out), *SMOKE[name]],
                          cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == name and result["quick"] is True
    assert result["table"]["rows"], result
    assert {"loadavg_1m_start", "noisy"} <= set(result["load"]), result["load"]
    assert result["ratios"] and all(r["value"] == r["value"] for r in result["ratios"]), result["ratios"]  # no NaN headline
    assert "ratio:" in proc.stdout


def test_renderer_writes_benchmarks_md_and_the_readme_block(tmp_path: Path) -> None:
    """BENCHMARKS.md and the README block come from the JSON files; quick results are refused."""
    from benchmarks.common import make_ratio, make_result
    from benchmarks.run_all import README_END, render, render_readme

    results = tmp_path / "results"
    results.mkdir()
    ratio = make_ratio("x", 1.25, 1.0, ">=", text="HDF5 loader vs fastest alternative = 1.25×")
    r = make_result("loader", "Loader", [], quick=False, config={}, headers=["a"], rows=[["1"]], ratio=ratio,
                    machine={"cores_usable": 2, "loadavg_1m": 3.0, "cpu_busy": 0.9})
    (results / "loader.json").write_text(json.dumps(r))
    q = make_result("amp", "AMP", [], quick=True, config={}, headers=["a"], rows=[["1"]], ratio=None, machine={})
    (results / "amp.json").write_text(json.dumps(q))
    (results / "faults.json").write_text(json.dumps({**r, "benchmark": "faults", "title": "Faults"}))  # not registered
    md = render(results, tmp_path / "BENCHMARKS.md").read_text()
    assert "**HDF5 loader vs fastest alternative = 1.25×: met**" in md and "**NOISY**" in md
    assert "Only a `--quick` smoke run exists" in md and "## Faults" in md and "Not run yet" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n<!-- benchmarks:begin old -->\nstale numbers\n{README_END}\nrest\n")
    text = render_readme(results, readme).read_text()
    assert "stale numbers" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| `loader` | HDF5 loader vs fastest alternative = 1.25× | met |" in text and "(noisy machine)" in text
