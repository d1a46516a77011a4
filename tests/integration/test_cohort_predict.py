"""``brainage predict`` on a cohort: resume, kill -9, damaged parts, locks, array tasks, signals, report."""

from __future__ import annotations

import doctest
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brainage_hpc.cli import main
from brainage_hpc.evaluation.parts import parts_dir_for, read_records
from tests import predict_fixtures
from tests.predict_fixtures import make_scans, subject_scans

# fixtures of tests/predict_fixtures.py used here
scan_dir = predict_fixtures.scan_dir
synth_subjects = predict_fixtures.synth_subjects
tiny_model = predict_fixtures.tiny_model

REPO = Path(__file__).resolve().parents[2]


def _predict(model: Path, inputs: list, out: Path, *extra: str) -> int:
    return main(["predict", "--checkpoint", str(model), "--input", *map(str, inputs), "--out", str(out),
                 "--workers", "0", "--no-progress", *extra])


def _scan_records(out: Path) -> list[dict]:
    recs = []
    for part in sorted(parts_dir_for(out).glob("part-*.jsonl")):
        recs += [r for r in read_records(part)[0] if r["kind"] == "scan"]
    return recs


def _ok_counts(out: Path) -> Counter:
    return Counter(r["file"] for r in _scan_records(out) if not r["error"])


def _spawn(model: Path, inputs: list, out: Path, *extra: str, hold: float = 0.5) -> subprocess.Popen:
    env = dict(os.environ, BRAINAGE_PREDICT_HOLD_S=str(hold), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "brainage_hpc.cli", "predict", "--checkpoint", str(model), "--input",
           *map(str, inputs), "--out", str(out), "--batch-size", "1", "--no-progress", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_records(proc: subprocess.Popen, out: Path, n: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while len(_scan_records(out)) < n:
        if proc.poll() is not None:
            raise AssertionError(f"predict ended early ({proc.returncode}): {proc.communicate()}")
        assert time.monotonic() < deadline, "no records in time"
        time.sleep(0.2)


def test_rerun_skips_scored_scans_and_rescores_changed_ones(tmp_path, tiny_model, scan_dir, capsys):
    out = tmp_path / "pred.csv"
    assert _predict(tiny_model, [scan_dir], out) == 0
    first = pd.read_csv(out)
    assert len(first) == 6 and first["pred_age"].notna().all()
    capsys.readouterr()
    assert _predict(tiny_model, [scan_dir], out) == 0
    assert "6 scan(s) already scored, 0 to do" in capsys.readouterr().err
    assert len(_scan_records(out)) == 6
    pd.testing.assert_frame_equal(pd.read_csv(out), first)

    changed = sorted(scan_dir.iterdir())[2]
    os.utime(changed, ns=(time.time_ns(), time.time_ns()))  # same path, new mtime: scored again
    make_scans(tmp_path / "more", 1, scan_dir)  # and a scan added to the inputs
    assert _predict(tiny_model, [scan_dir, tmp_path / "more"], out) == 0
    assert "6 scan(s) already scored, 1 to do" not in capsys.readouterr().err
    counts = _ok_counts(out)
    assert counts[str(changed)] == 2 and sum(counts.values()) == 8
    assert len(pd.read_csv(out)) == 7


def test_rerun_with_other_weights_scores_everything_again(tmp_path, tiny_model, scan_dir, capsys):
    from tests.predict_fixtures import make_model_bundle

    out = tmp_path / "pred.csv"
    assert _predict(tiny_model, [scan_dir], out) == 0
    first = pd.read_csv(out)["pred_age"].to_numpy()
    other = make_model_bundle(tmp_path / "other" / "model.pt", seed=7, spread=30.0)
    capsys.readouterr()
    assert _predict(other, [scan_dir], out) == 0
    assert "already scored" not in capsys.readouterr().err
    second = pd.read_csv(out)["pred_age"].to_numpy()
    assert np.abs(second - first).max() > 0.1  # the new model's ages, not the old ones reused
    assert len({r["model"] for r in _scan_records(out)}) == 2
    # an array run refuses a folder planned with other weights
    assert _predict(tiny_model, [scan_dir], tmp_path / "arr.csv", "--tasks", "2", "--task-id", "0") == 0
    assert _predict(other, [scan_dir], tmp_path / "arr.csv", "--tasks", "2", "--task-id", "1") == 2
    assert "scored with other weights" in capsys.readouterr().err


def test_kill_9_mid_run_loses_only_the_scans_in_flight(tmp_path, tiny_model, synth_subjects):
    scans = make_scans(tmp_path / "in", 12, synth_subjects)
    out = tmp_path / "pred.csv"
    proc = _spawn(tiny_model, [tmp_path / "in"], out, "--workers", "1", hold=0.5)
    try:
        _wait_records(proc, out, 3)
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    kept = _scan_records(out)
    assert 3 <= len(kept) < 12 and not out.exists()
    assert _predict(tiny_model, [tmp_path / "in"], out) == 0
    assert set(_ok_counts(out).values()) == {1}  # every scan scored exactly once over both runs
    df = pd.read_csv(out)
    assert df["file"].tolist() == [str(s) for s in scans] and df["pred_age"].notna().all()


def test_torn_and_damaged_records_are_dropped_and_rescored(tmp_path, tiny_model, scan_dir, capsys):
    out = tmp_path / "pred.csv"
    assert _predict(tiny_model, [scan_dir], out) == 0
    part = next(parts_dir_for(out).glob("part-*.jsonl"))
    lines = part.read_bytes().split(b"\n")
    flipped = bytearray(lines[2])
    i = flipped.index(b"pred_age") + 11
    flipped[i] = ord("9") if flipped[i] != ord("9") else ord("8")  # a digit of the age changes: JSON still valid
    lines[2] = bytes(flipped)
    # lines: session start, 6 scans, session end; keep up to the 6th scan and tear that one half-way
    part.write_bytes(b"\n".join(lines[:6]) + b"\n" + lines[6][:40])
    damaged = {r["file"] for r in read_records(part)[0] if r["kind"] == "scan"}
    assert len(damaged) == 4 and read_records(part)[1] == 2
    capsys.readouterr()
    assert main(["predict", "--merge", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "skipped 2 torn or damaged record line(s)" in err and "has no record for 2 scan(s)" in err
    assert _predict(tiny_model, [scan_dir], out) == 0
    assert "4 scan(s) already scored, 2 to do" in capsys.readouterr().err
    assert pd.read_csv(out)["pred_age"].notna().all()


def test_second_process_on_the_same_part_is_refused_with_one_line(tmp_path, tiny_model, scan_dir, capsys):
    from brainage_hpc.evaluation.parts import PartWriter

    out = tmp_path / "pred.csv"
    parts_dir_for(out).mkdir()
    with PartWriter(parts_dir_for(out) / "part-00000-of-00001.jsonl"):
        assert _predict(tiny_model, [scan_dir], out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("brainage predict: error: ") and "\n" not in err
    assert f"pid {os.getpid()}" in err and "is writing this part" in err


def test_array_tasks_merge_at_the_end_and_a_missing_part_is_named(tmp_path, tiny_model, scan_dir, capsys):
    out = tmp_path / "pred.csv"
    assert _predict(tiny_model, [scan_dir], out, "--tasks", "3", "--task-id", "2") == 0
    assert not out.exists() and "merge later" in capsys.readouterr().out
    assert main(["predict", "--merge", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "part part-00000-of-00003.jsonl is missing: 2 scan(s) not scored" in err
    assert "part part-00001-of-00003.jsonl is missing" in err
    df = pd.read_csv(out)
    assert len(df) == 6 and df["pred_age"].notna().sum() == 2
    assert df["error"].str.contains("part-00000-of-00003.jsonl is missing").sum() == 2

    # the same folder with another task count: refused, one line
    assert _predict(tiny_model, [scan_dir], out, "--tasks", "2", "--task-id", "0") == 2
    assert "holds a plan for 3 task(s)" in capsys.readouterr().err

    assert _predict(tiny_model, [scan_dir], out, "--tasks", "3", "--task-id", "0") == 0
    assert _predict(tiny_model, [scan_dir], out, "--tasks", "3", "--task-id", "1") == 0  # the last one merges
    assert "6 scan(s): 6 scored, 0 failed, 0 not scored" in capsys.readouterr().out + capsys.readouterr().err
    df = pd.read_csv(out)
    assert df["pred_age"].notna().all() and set(_ok_counts(out).values()) == {1}
    assert sorted({r["task"] for r in _scan_records(out)}) == [0, 1, 2]


@pytest.mark.parametrize("sig, code", [(signal.SIGUSR1, 3), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_signals_stop_between_scans_with_the_contract_exit_code(tmp_path, tiny_model, synth_subjects, sig, code):
    make_scans(tmp_path / "in", 40, synth_subjects)
    out = tmp_path / "pred.csv"
    proc = _spawn(tiny_model, [tmp_path / "in"], out, "--workers", "1", hold=0.3)
    try:
        _wait_records(proc, out, 2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert f"got {signal.Signals(sig).name}: stopping" in err and "Traceback" not in err
    df = pd.read_csv(out)  # a single run writes its CSV also when stopped; unscored scans say so
    scored = len(_scan_records(out))
    assert len(df) == 40 and df["pred_age"].notna().sum() == scored < 40
    assert df["error"].dropna().str.contains("has no record for it").all()


def test_table_with_ages_and_sites_gives_gaps_and_a_report(tmp_path, tiny_model, synth_subjects):
    scans = make_scans(tmp_path / "in", 8, synth_subjects)
    table = tmp_path / "cohort.csv"
    lines = ["subject,path,age,sex,site"]
    lines += [f"s{i},in/{p.name},{20 + 3 * i},{'MF'[i % 2]},{'AB'[i % 2]}" for i, p in enumerate(scans)]
    lines.append("s9,in/missing.nii.gz,40,F,A")
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "res" / "pred.csv"
    assert _predict(tiny_model, [table], out) == 1  # the missing file is an error row
    df = pd.read_csv(out)
    assert df["subject"].tolist() == [f"s{i}" for i in range(8)] + ["s9"]
    ok = df.iloc[:8]
    assert np.allclose(ok["brain_age_gap"], ok["pred_age"] - ok["age"])
    assert ok["sex"].tolist() == list("MFMFMFMF") and df["error"].iloc[8].endswith("no such file")
    md = (tmp_path / "res" / "pred_report.md").read_text()
    assert "| A | 4 |" in md and "| B | 4 |" in md and "## Throughput" in md and "missing.nii.gz" in md
    png = tmp_path / "res" / "pred_report.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra, expect", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--tasks", "0", "--task-id", "0"], "--tasks must be >= 1"),
    (["--tasks", "2", "--task-id", "2"], "--task-id 2 is outside 0..1"),
    (["--tasks", "2"], "--tasks and --task-id go together"),
])
def test_nonsense_options_are_one_line_errors(tmp_path, tiny_model, scan_dir, capsys, extra, expect):
    assert _predict(tiny_model, [scan_dir], tmp_path / "pred.csv", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("brainage predict: error: ") and expect in err and "\n" not in err, err
    assert not list(tmp_path.glob("pred.csv.parts/part-*"))


def test_docstring_examples():
    import brainage_hpc.evaluation.scan_input as scan_input

    assert doctest.testmod(scan_input).failed == 0


def test_bids_root_with_sessions_gives_one_row_per_session(tmp_path, tiny_model, synth_subjects):
    from brainage_hpc.ingest.bids_writer import BidsScan, write_bids

    src = subject_scans(synth_subjects)
    scans = [BidsScan(f"{p}{i}", ses, str(src[(2 * i + j) % len(src)]), 30.0 + i + 2 * j, "MF"[i % 2], f"site{p}")
             for p in "ab" for i in range(2) for j, ses in enumerate(("1", "2"))]
    root = write_bids(tmp_path / "bids", scans)
    out = tmp_path / "pred.csv"
    assert _predict(tiny_model, [root], out) == 0
    df = pd.read_csv(out, dtype={"session": str})
    assert len(df) == 8 and df["pred_age"].notna().all()
    assert sorted(zip(df["subject"], df["session"]))[:2] == [("sub-a0", "1"), ("sub-a0", "2")]
    assert set(df["site"]) == {"sitea", "siteb"} and df["age"].notna().all()
    assert "| sitea | 4 |" in (tmp_path / "pred_report.md").read_text()
