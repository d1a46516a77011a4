"""Cohort report numbers: brain-age gap per site, throughput from session records, the files written."""

from __future__ import annotations

import pytest

from brainage_hpc.evaluation.cohort_report import cohort_stats, throughput, write_cohort_report
from brainage_hpc.evaluation.merge import MergeSummary


def _rows():
    rows = [{"file": f"f{i}", "age": 20.0 + i, "pred_age": 20.0 + i + (2.0 if i % 2 else -1.0), "site": "AB"[i % 2],
             "warnings": "", "error": None} for i in range(10)]
    rows.append({"file": "bad", "age": 50.0, "pred_age": None, "site": "A", "warnings": "", "error": "bad: unreadable"})
    rows.append({"file": "odd", "age": None, "pred_age": 33.0, "site": "", "warnings": "QC edge", "ood_flag": True,
                 "error": None})
    return rows


def test_gap_overall_and_per_site():
    stats = cohort_stats(_rows())
    assert stats["n_pred"] == 11
    assert stats["gap"]["n"] == 10 and stats["gap"]["mean"] == pytest.approx(0.5)
    assert stats["gap_by_site"]["A"] == pytest.approx({"n": 5, "mean": -1.0, "sd": 0.0, "mae": 1.0})
    assert stats["gap_by_site"]["B"]["mean"] == pytest.approx(2.0)


def test_throughput_per_process_and_whole_run():
    sessions = [
        {"event": "start", "time": 100.0, "workers": 1, "device": "cpu", "part": "p0"},
        {"event": "end", "time": 110.0, "scored": 18, "failed": 2, "elapsed_s": 10.0, "prepare_s": 8.0, "infer_s": 1.0,
         "stopped_by": None, "part": "p0"},
        {"event": "start", "time": 100.0, "workers": 1, "device": "cpu", "part": "p1"},
        {"event": "end", "time": 105.0, "scored": 5, "failed": 0, "elapsed_s": 5.0, "stopped_by": 10, "part": "p1"},
        {"event": "end", "time": 120.0, "scored": 0, "failed": 0, "elapsed_s": 1.0, "part": "p1"},  # nothing to do
    ]
    tp = throughput(sessions)
    assert tp["scans"] == 25 and tp["sessions"] == 2
    assert tp["per_process_scans_per_s"] == pytest.approx(25 / 15) and tp["run_scans_per_s"] == pytest.approx(25 / 10)
    assert tp["prepare_s_per_scan"] == pytest.approx(8 / 25)
    assert throughput([]) == {}


def test_report_lists_failed_and_flagged_scans(tmp_path):
    rows = _rows()
    summary = MergeSummary(rows=rows, n_ok=11, n_failed=1)
    md = write_cohort_report(tmp_path / "pred.csv", summary, tmp_path / "pred.csv.parts").read_text()
    assert "| `bad` | bad: unreadable |" in md
    assert "## Flagged (1)" in md and "QC edge; ood_flag" in md
    assert "| B | 5 | +2.00 |" in md
    assert (tmp_path / "pred_report.png").read_bytes()[:4] == b"\x89PNG"


def test_launch_predict_plans_with_the_key_its_tasks_check(tmp_path, monkeypatch, capsys):
    """A calibrated run adds its calibration to the plan key; `launch predict` must write that same key,
    or every array task refuses the plan as 'scored with other weights'."""
    from types import SimpleNamespace

    import torch

    import brainage_hpc.evaluation.predict_job as job
    from brainage_hpc.evaluation.cohort_predict import scoring_key
    from brainage_hpc.evaluation.cohort_run import ScoreOptions

    lm = SimpleNamespace(model=torch.nn.Linear(2, 1), calibration={"bias": {"alpha": 1.0, "beta": 0.0}})
    seen: list[str] = []

    def stop_at_plan(parts_dir, inputs, tasks, model):
        seen.append(model)
        raise ValueError("stop before submitting")

    monkeypatch.setattr(job, "load_for_scoring", lambda checkpoint, device: (lm, None))
    monkeypatch.setattr(job, "array_plan", stop_at_plan)
    rc = job.main(["--checkpoint", "run", "--input", str(tmp_path), "--out", str(tmp_path / "pred.csv"),
                   "--executor", "local", "--tasks", "2"])
    assert rc == 2 and "stop before submitting" in capsys.readouterr().err
    assert seen == [scoring_key(lm, ScoreOptions())] and "+cal:" in seen[0]
