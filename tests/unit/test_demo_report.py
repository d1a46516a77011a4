"""The demo's report and the benchmarks' BENCHMARKS.md are rebuilt from result files alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from brainage_hpc.demo_report import summarise, write_demo_report


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _eval_metrics(mae: float, mean_mae: float) -> dict:
    return {
        "n": 30,
        "classification": {"4class": {"f1_micro": 0.6}, "2class": {"f1_micro": 0.8}},
        "regression": {"mae": mae, "r2": 0.7},
        "regression_bias_corrected": {"mae": mae * 0.9},
        "baselines": {"regression": {"mae": mean_mae}},
    }


@pytest.mark.parametrize("mae, ok", [(1.5, True), (2.5, False)])
def test_summary_ratio_and_report(tmp_path: Path, mae: float, ok: bool) -> None:
    _write(tmp_path / "eval_cnn" / "metrics.json", _eval_metrics(mae, 4.0))
    _write(tmp_path / "generate" / "generate.json", {"csf": {
        "youngest_age": 22, "oldest_age": 37, "youngest_mean": 0.05, "oldest_mean": 0.08, "oldest_larger": True}})
    _write(tmp_path / "explain" / "faithfulness.json", {"methods": {"gradcam": {
        "enrichment": 3.87, "spearman": 0.22, "aopc_deletion": 6.2, "n_zero_maps": 0, "n_subjects": 8, "seconds": 11.0}}})
    report = write_demo_report(tmp_path, {"synth": 10.0, "train_cnn": 100.0})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["explain"]["gradcam"]["enrichment"] == pytest.approx(3.87)
    assert "| gradcam | 3.87 |" in report.read_text()
    assert summary["mae_ratio"] == pytest.approx(mae / 4.0)
    assert summary["mae_ratio_ok"] is ok
    assert summary["total_s"] == pytest.approx(110.0)
    text = report.read_text()
    assert f"{mae / 4.0:.0%}" in text
    assert ("**met**" in text) is ok
    assert "0.0800" in text  # CSF fraction of the oldest generated brains
    assert not list(tmp_path.glob(".tmp-*"))


def test_missing_cnn_metrics_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="eval_cnn/metrics.json"):
        summarise(tmp_path, {})


def test_benchmarks_markdown_skips_quick_results(tmp_path: Path) -> None:
    from benchmarks.common import make_ratio, make_result
    from benchmarks.run_all import render

    machine = {"cpu": "test cpu", "cores": 2, "torch": "x", "python": "3"}
    full = make_result("amp", "AMP on CPU", ["--steps", "5"], quick=False, config={"batch": 2}, headers=["mode", "vol/s"],
                       rows=[["fp32", "1.0"], ["bf16", "1.5"]], ratio=make_ratio("bf16/fp32", 1.5, None), machine=machine)
    quick = dict(full, benchmark="loader", title="Loader", quick=True)
    _write(tmp_path / "amp.json", full)
    _write(tmp_path / "loader.json", quick)
    out = render(tmp_path, tmp_path / "BENCHMARKS.md")
    text = out.read_text()
    assert "| bf16 | 1.5 |" in text
    assert "python -m benchmarks.amp --steps 5" in text
    assert "Only a `--quick` smoke run exists" in text
    assert "Not run yet: `python -m benchmarks.ddp_scaling`" in text
