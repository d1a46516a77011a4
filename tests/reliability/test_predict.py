"""Issue 14 cases of ``brainage predict`` / ``brainage export``: T5, S5, T3 (one test per case)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainage_hpc.cli import main
from tests import predict_fixtures
from tests.predict_fixtures import make_scans, subject_scans, write_volume

# fixtures of tests/predict_fixtures.py used here
synth_subjects = predict_fixtures.synth_subjects
tiny_model = predict_fixtures.tiny_model
tiny_run = predict_fixtures.tiny_run
unwritable_dir = predict_fixtures.unwritable_dir


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"brainage {command}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_T5_one_all_negative_volume_among_good_ones_is_an_error_row(tmp_path, tiny_model, synth_subjects, capsys):
    good = make_scans(tmp_path / "in", 3, synth_subjects)
    img = nib.load(good[0])
    negative = tmp_path / "in" / "scan-neg_T1w.nii.gz"
    nib.save(nib.Nifti1Image(-np.asarray(img.dataobj, dtype=np.float32) - 1.0, img.affine), negative)
    out = tmp_path / "pred.csv"
    rc = main(["predict", "--checkpoint", str(tiny_model), "--input", str(tmp_path / "in"), "--out", str(out),
               "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    df = pd.read_csv(out)
    assert len(df) == 4
    bad = df[df["file"] == str(negative)].iloc[0]
    assert np.isnan(bad["pred_age"]) and "no voxels > 0" in bad["error"] and str(negative) in bad["error"]
    assert df[df["file"] != str(negative)]["pred_age"].notna().all()
    assert df[df["file"] != str(negative)]["error"].isna().all()


def test_T5_any_exception_for_one_file_is_that_files_error(tmp_path, tiny_model, synth_subjects, monkeypatch, capsys):
    """A library RuntimeError while preparing one scan, and a model failure on another, cost only those two."""
    import brainage_hpc.evaluation.predict as predict
    import brainage_hpc.evaluation.scan_input as scan_input

    files = make_scans(tmp_path / "in", 6, synth_subjects)
    real_prepare, real_predict = scan_input.prepare_scan, predict.predict_batch

    def flaky_prepare(path, pcfg):
        if str(path) == str(files[1]):
            raise RuntimeError("grid_sampler(): expected a non-empty tensor\nmore text")
        return real_prepare(path, pcfg)

    calls = {"n": 0}

    def flaky_predict(lm, image, sex):
        calls["n"] += 1
        if calls["n"] in (1, 3):  # the first batch fails as a whole, then one scan of its one-by-one retry
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_predict(lm, image, sex)

    monkeypatch.setattr(scan_input, "prepare_scan", flaky_prepare)
    monkeypatch.setattr(predict, "predict_batch", flaky_predict)
    out = tmp_path / "pred.csv"
    rc = main(["predict", "--checkpoint", str(tiny_model), "--input", *map(str, files), "--out", str(out),
               "--workers", "0", "--batch-size", "4", "--no-progress"])
    assert rc == 1 and "Traceback" not in capsys.readouterr().err
    df = pd.read_csv(out)
    assert df["file"].tolist() == [str(f) for f in files]
    errors = df["error"].fillna("").tolist()
    assert errors[1] == f"{files[1]}: RuntimeError: grid_sampler(): expected a non-empty tensor"
    assert errors[2] == f"{files[2]}: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert [i for i, e in enumerate(errors) if not e] == [0, 3, 4, 5]
    assert df["pred_age"].notna().tolist() == [True, False, False, True, True, True]


def test_T5_a_scan_that_kills_its_worker_is_that_scans_error(tmp_path, tiny_model, synth_subjects, monkeypatch, capsys):
    """A segfault or the OOM killer in a preprocessing process: that scan's error row, the others scored once."""
    import os
    import signal

    import brainage_hpc.evaluation.scan_input as scan_input

    files = make_scans(tmp_path / "in", 8, synth_subjects)
    real_prepare = scan_input.prepare_scan

    def deadly_prepare(path, pcfg):
        if str(path) == str(files[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # runs in the forked worker
        return real_prepare(path, pcfg)

    monkeypatch.setattr(scan_input, "prepare_scan", deadly_prepare)
    out = tmp_path / "pred.csv"
    rc = main(["predict", "--checkpoint", str(tiny_model), "--input", *map(str, files), "--out", str(out),
               "--workers", "2", "--batch-size", "2", "--no-progress"])
    assert rc == 1 and "Traceback" not in capsys.readouterr().err
    df = pd.read_csv(out)
    assert df["file"].tolist() == [str(f) for f in files]
    assert df["pred_age"].notna().tolist() == [True, True, True, False, True, True, True, True]
    assert df["error"][3].startswith(f"{files[3]}: the preprocessing process died while preparing it")
    from brainage_hpc.evaluation.parts import parts_dir_for, read_records

    recs = [r for p in parts_dir_for(out).glob("part-*.jsonl") for r in read_records(p)[0] if r["kind"] == "scan"]
    assert sorted(r["file"] for r in recs) == sorted(map(str, files))  # each scan recorded exactly once


def test_T5_a_worker_dying_while_a_batch_is_written_scores_that_batch_once(tmp_path, tiny_model, synth_subjects,
                                                                            monkeypatch, capsys):
    """torch raises a dead worker's error from its SIGCHLD handler wherever the main process is: here right after
    the first batch's records were written. The retry must not score that batch again."""
    import os
    import signal
    import time

    import brainage_hpc.evaluation.scan_input as scan_input
    from brainage_hpc.evaluation.parts import PartWriter, parts_dir_for, read_records

    files = make_scans(tmp_path / "in", 6, synth_subjects)
    real_prepare, real_append = scan_input.prepare_scan, PartWriter.append
    dying = tmp_path / "dying"

    def deadly_prepare(path, pcfg):
        if str(path) == str(files[3]):
            dying.write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)  # the second worker, while the main process writes batch 1
        return real_prepare(path, pcfg)

    def slow_append(self, records):
        real_append(self, records)
        if not dying.exists():  # first batch: wait here until the other worker has died
            deadline = time.monotonic() + 120
            while not dying.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # SIGCHLD arrives now, after the records are on disk

    monkeypatch.setattr(scan_input, "prepare_scan", deadly_prepare)
    monkeypatch.setattr(PartWriter, "append", slow_append)
    out = tmp_path / "pred.csv"
    rc = main(["predict", "--checkpoint", str(tiny_model), "--input", *map(str, files), "--out", str(out),
               "--workers", "2", "--batch-size", "2", "--no-progress"])
    assert rc == 1 and "Traceback" not in capsys.readouterr().err and dying.exists()
    recs = [r for p in parts_dir_for(out).glob("part-*.jsonl") for r in read_records(p)[0] if r["kind"] == "scan"]
    assert sorted(r["file"] for r in recs) == sorted(map(str, files))  # each scan recorded exactly once
    assert pd.read_csv(out)["pred_age"].notna().tolist() == [True, True, True, False, True, True]


def _implausible_volumes(folder: Path, synth_subjects: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    box = np.zeros((80, 96, 80), dtype=np.float32)
    box[10:70, 10:86, 10:70] = 500 + 50 * rng.standard_normal((60, 76, 60))
    yy, xx, zz = np.mgrid[:32, :32, :32]
    ellipsoid = ((((xx - 15.5) / 14) ** 2 + ((yy - 15.5) / 15) ** 2 + ((zz - 15.5) / 13) ** 2) <= 1).astype(np.float32)
    real = nib.load(subject_scans(synth_subjects)[0])
    out = {
        "noise cube 60^3": write_volume(folder / "noise.nii.gz", rng.random((60, 60, 60)) * 1000, 1.0),
        "box phantom": write_volume(folder / "box.nii.gz", box, 2.0),
        "32 mm wide brain": write_volume(folder / "tiny.nii.gz", ellipsoid * (400 + 40 * rng.random((32, 32, 32))), 1.0),
        "32 mm voxels": write_volume(folder / "coarse.nii.gz", np.asarray(real.dataobj, dtype=np.float32), 32.0),
    }
    return out


def test_S5_implausible_inputs_are_error_rows_not_ages(tmp_path, tiny_model, synth_subjects, capsys):
    bad = _implausible_volumes(tmp_path / "bad", synth_subjects)
    good = make_scans(tmp_path / "good", 1, synth_subjects)
    out = tmp_path / "pred.csv"
    rc = main(["predict", "--checkpoint", str(tiny_model), "--input", *map(str, [*good, *bad.values()]),
               "--out", str(out), "--workers", "0", "--no-progress"])
    assert rc == 1 and "Traceback" not in capsys.readouterr().err
    df = pd.read_csv(out).set_index("file")
    assert np.isfinite(df.loc[str(good[0]), "pred_age"])
    for what, path in bad.items():
        row = df.loc[str(path)]
        assert np.isnan(row["pred_age"]), f"{what} got an age"
        assert isinstance(row["error"], str) and row["error"].startswith(f"{path}: "), what


def test_T3_predict_out_is_a_folder(tmp_path, tiny_model, synth_subjects, capsys):
    scans = make_scans(tmp_path / "in", 1, synth_subjects)
    (tmp_path / "folder").mkdir()
    rc = main(["predict", "--checkpoint", str(tiny_model), "--input", str(scans[0]), "--out", str(tmp_path / "folder")])
    assert rc == 2
    assert "is a folder" in _one_line_error(capsys, "predict")


def test_T3_predict_out_on_a_read_only_folder(tmp_path, tiny_model, synth_subjects, unwritable_dir, capsys):
    scans = make_scans(tmp_path / "in", 1, synth_subjects)
    rc = main(["predict", "--checkpoint", str(tiny_model), "--input", str(scans[0]),
               "--out", str(unwritable_dir / "pred.csv")])
    assert rc == 2
    assert str(unwritable_dir) in _one_line_error(capsys, "predict")


def test_T3_predict_out_under_a_file(tmp_path, tiny_model, synth_subjects, capsys):
    scans = make_scans(tmp_path / "in", 1, synth_subjects)
    (tmp_path / "file.txt").write_text("x")
    rc = main(["predict", "--checkpoint", str(tiny_model), "--input", str(scans[0]),
               "--out", str(tmp_path / "file.txt" / "pred.csv")])
    assert rc == 2
    assert "is not a folder" in _one_line_error(capsys, "predict")


@pytest.mark.parametrize("where", ["folder", "read-only", "under a file"])
def test_T3_export_out_unwritable(tmp_path, tiny_run, unwritable_dir, capsys, where):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    out, expect = {"folder": (tmp_path / "folder", "is a folder"),
                   "read-only": (unwritable_dir / "model.pt", str(unwritable_dir)),
                   "under a file": (tmp_path / "file.txt" / "model.pt", "is not a folder")}[where]
    rc = main(["export", "--run-dir", str(tiny_run), "--out", str(out)])
    assert rc == 2
    assert expect in _one_line_error(capsys, "export")
