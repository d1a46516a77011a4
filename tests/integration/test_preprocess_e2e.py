"""``brainage preprocess`` / ``verify`` end to end on a 32-subject synthetic cohort (4 mm, small grid).

Covers the acceptance of issue 4: every good subject exactly once with the right
labels, bad inputs in failures.csv, exit codes, byte-identical resume after
``kill -9``, SLURM-array slices + ``--merge``, verify naming a corrupted shard,
family-disjoint splits, and that ``preprocess_volume`` on the raw file reproduces
the stored volume (what ``brainage predict`` relies on).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from brainage_hpc.cli import main
from brainage_hpc.data.ages import age_to_bin
from brainage_hpc.data.shards import ShardReader, load_manifest
from brainage_hpc.ingest.hcp import T1W_RELPATH
from brainage_hpc.ingest.preprocess import PreprocessConfig, preprocess_volume
from tests.integration.slurm_fixtures import wait_job_done

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--shape", "40", "48", "40", "--voxel-mm", "4", "--shard-size", "6", "--no-progress"]
N_SUBJECTS = 32


@pytest.fixture(autouse=True)
def _not_an_array_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests may run inside a SLURM job; an inherited SLURM_ARRAY_TASK_ID would slice every run."""
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)


@pytest.fixture(scope="session")
def cohort4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 synthetic subjects at 4 mm (about 10 s with 2 workers)."""
    from brainage_hpc.ingest.synthetic import SynthConfig, make_cohort

    out = tmp_path_factory.mktemp("cohort4mm")
    make_cohort(out, SynthConfig(n_subjects=N_SUBJECTS, seed=4, voxel_mm=4.0), progress=False, workers=2)
    return out


def _truth(root: Path) -> dict[str, dict]:
    return {s["subject"]: s for s in json.loads((root / "truth.json").read_text())["subjects"]}


def _preprocess(hcp: Path, out: Path, *extra: str) -> int:
    return main(["preprocess", "--hcp-root", str(hcp), "--out", str(out), *ARGS, *extra])


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".h5", ".json", ".csv")}


@pytest.fixture(scope="module")
def clean_run(cohort4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards_clean")
    assert _preprocess(cohort4, out) == 0
    return out


def test_every_subject_exactly_once_with_its_labels(cohort4: Path, clean_run: Path, capsys):
    truth = _truth(cohort4)
    m = load_manifest(clean_run)
    assert set(m.subjects) == set(truth) and m.extra["n_failures"] == 0
    seen: list[str] = []
    for k, entry in enumerate(m.shards):
        with h5py.File(clean_run / entry["file"]) as f:
            ids = [s.decode() for s in f["subject_id"][()]]
            seen += ids
            assert f["image"].shape == (len(ids), 1, 40, 48, 40) and f["image"].dtype == np.float16
            for i, sid in enumerate(ids):
                t = truth[sid]
                assert m.subjects[sid]["shard"] == k and m.subjects[sid]["index"] == i
                assert f["age"][i] == t["age_years"] == m.subjects[sid]["age"]
                assert f["age_bin"][i] == m.subjects[sid]["age_bin"] == age_to_bin(t["age_years"])
                assert f["sex"][i] == m.subjects[sid]["sex"] == (t["sex"] == "M")
                assert m.subjects[sid]["family_id"] == t["family_id"]
    assert sorted(seen) == sorted(truth)  # exactly once
    assert (clean_run / "failures.csv").read_text() == "subject,file,reason\n"
    assert main(["verify", str(clean_run), "--no-progress"]) == 0
    assert "verify: OK" in capsys.readouterr().out


def test_verify_names_a_shard_with_one_flipped_byte(clean_run: Path, tmp_path: Path, capsys):
    copy = tmp_path / "shards"
    shutil.copytree(clean_run, copy)
    path = copy / "shard-00002.h5"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["verify", str(copy), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "shard-00002.h5: sha256 mismatch" in err
    assert all(f"shard-0000{k}.h5" not in err for k in (0, 1, 3, 4, 5))


def test_splits_are_family_disjoint_and_complete(cohort4: Path, clean_run: Path):
    m = load_manifest(clean_run)
    assert sorted(s for ids in m.splits.values() for s in ids) == sorted(m.subjects)
    fams = {name: {m.subjects[s]["family_id"] for s in ids} for name, ids in m.splits.items()}
    assert not (fams["train"] & fams["val"] or fams["train"] & fams["test"] or fams["val"] & fams["test"])
    assert len(m.split_ids("train")) > len(m.split_ids("val")) > 0


def test_stored_volume_equals_preprocess_volume_on_the_raw_file(cohort4: Path, clean_run: Path):
    m = load_manifest(clean_run)
    cfg = PreprocessConfig.from_dict(m.preprocess)
    assert cfg.config_hash() == m.preprocess_hash
    sid = sorted(m.subjects)[7]
    again = preprocess_volume(cohort4 / sid / T1W_RELPATH, cfg)
    np.testing.assert_array_equal(ShardReader(clean_run).read(sid)[0], again)


def test_rerun_skips_finished_shards(cohort4: Path, clean_run: Path, caplog):
    before = {p.name: p.stat().st_mtime_ns for p in clean_run.glob("shard-*.h5")}
    snapshot = _outputs(clean_run)
    with caplog.at_level("INFO"):
        assert _preprocess(cohort4, clean_run) == 0
    assert {p.name: p.stat().st_mtime_ns for p in clean_run.glob("shard-*.h5")} == before
    assert _outputs(clean_run) == snapshot
    assert caplog.text.count("already done") == len(before)


def test_two_workers_give_identical_bytes(cohort4: Path, clean_run: Path, tmp_path: Path):
    assert _preprocess(cohort4, tmp_path, "--workers", "2") == 0
    assert _outputs(tmp_path) == _outputs(clean_run)


def test_slices_then_merge_equal_one_run(cohort4: Path, clean_run: Path, tmp_path: Path, capsys):
    # 32 subjects / 6 per shard = 6 shards starting at 0, 6, 12, 18, 24, 30
    assert _preprocess(cohort4, tmp_path, "--plan-only") == 0
    assert (tmp_path / "plan.json").is_file() and not list(tmp_path.glob("*.h5"))
    assert _preprocess(cohort4, tmp_path, "--subjects-from", "0", "--subjects-to", "10") == 0
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["shard-00000.h5", "shard-00001.h5"]
    assert not (tmp_path / "manifest.json").exists()
    assert main(["preprocess", "--merge", "--out", str(tmp_path)]) == 1
    assert "4 of 6 shards unfinished or stale (2, 3, 4, 5)" in capsys.readouterr().err
    assert _preprocess(cohort4, tmp_path, "--subjects-from", "10", "--subjects-to", "25") == 0
    assert _preprocess(cohort4, tmp_path, "--subjects-from", "25") == 0
    assert main(["preprocess", "--merge", "--out", str(tmp_path)]) == 0
    assert _outputs(tmp_path) == _outputs(clean_run)


def test_slurm_array_task_ids_select_shards(cohort4: Path, clean_run: Path, tmp_path: Path, monkeypatch):
    for task in range(4):  # 2 shards per task: tasks 0-2 do shards 0..5, task 3 has nothing to do
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        assert _preprocess(cohort4, tmp_path, "--shards-per-task", "2") == 0
        assert len(list(tmp_path.glob("*.h5"))) == min(2 * task + 2, 6)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert main(["preprocess", "--merge", "--out", str(tmp_path)]) == 0
    assert _outputs(tmp_path) == _outputs(clean_run)


def test_histogram_mode_and_seed_splits(cohort4: Path, tmp_path: Path):
    ids = sorted(_truth(cohort4))
    seed = tmp_path / "seed"
    seed.mkdir()
    np.save(seed / "train.npy", np.array([int(s) for s in ids[:20]]))
    np.save(seed / "val.npy", np.array(ids[20:26]))
    np.save(seed / "test.npy", np.array(ids[26:] + ["123456"]))  # an ID outside the cohort is ignored
    out = tmp_path / "hist"
    assert _preprocess(cohort4, out, "--intensity", "histogram", "--seed-splits", str(seed)) == 0
    m = load_manifest(out)
    marks = m.preprocess["landmarks"]
    assert marks is not None and len(marks) == 11 and marks[0] == 0.0 and marks[-1] == 1.0
    assert m.splits == {"train": ids[:20], "val": ids[20:26], "test": ids[26:]}
    assert m.extra["split_info"]["method"] == "imported"
    vol = ShardReader(out).read(ids[3]).astype(np.float32)
    assert -0.5 < vol.min() and vol.max() < 1.5
    cfg = PreprocessConfig.from_dict(m.preprocess)
    np.testing.assert_array_equal(
        ShardReader(out).read(ids[3])[0], preprocess_volume(cohort4 / ids[3] / T1W_RELPATH, cfg)
    )
    snapshot = _outputs(out)
    assert _preprocess(cohort4, out, "--intensity", "histogram", "--seed-splits", str(seed)) == 0  # landmarks reused
    assert _outputs(out) == snapshot


# ----------------------------------------------------------------------------- bad inputs


def _save_like(src: Path, data: np.ndarray) -> None:
    img = nib.load(src)
    nib.save(nib.Nifti1Image(data, img.affine), src)


@pytest.fixture(scope="module")
def bad_cohort(cohort4: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of the cohort with 8 broken subjects; returns (root, {subject: expected reason fragment})."""
    root = tmp_path_factory.mktemp("bad") / "hcp"
    shutil.copytree(cohort4, root)
    ids = sorted(_truth(root))
    t1 = {s: root / s / T1W_RELPATH for s in ids}
    data = {s: np.asarray(nib.load(t1[s]).dataobj) for s in ids[:5]}
    raw = t1[ids[0]].read_bytes()
    t1[ids[0]].write_bytes(raw[: len(raw) // 2])
    _save_like(t1[ids[1]], np.stack([data[ids[1]]] * 2, axis=-1))
    _save_like(t1[ids[2]], data[ids[2]][:, :, 20].copy())
    nan = data[ids[3]].astype(np.float32)
    nan[10:12, 10:12, 10:12] = np.nan
    _save_like(t1[ids[3]], nan)
    _save_like(t1[ids[4]], np.zeros_like(data[ids[4]]))
    t1[ids[5]].unlink()
    csv_path = root / "unrestricted.csv"
    rows = list(csv.reader(csv_path.open()))
    rows = [r for r in rows if r[0] != ids[6]]
    rows = [[r[0], r[1], "41-45"] if r[0] == ids[7] else r for r in rows]
    csv_path.write_text("".join(",".join(r) + "\n" for r in rows))
    expected = {
        ids[0]: "truncated or corrupt",
        ids[1]: "is 4D",
        ids[2]: "is 2D",
        ids[3]: "NaN/Inf voxels",
        ids[4]: "all zeros",
        ids[5]: "T1w file missing",
        ids[6]: "absent from unrestricted.csv",
        ids[7]: "unknown age bin '41-45'",
    }
    return root, expected


def test_bad_inputs_land_in_failures_csv(bad_cohort, tmp_path: Path, caplog):
    root, expected = bad_cohort
    with caplog.at_level("WARNING"):
        assert _preprocess(root, tmp_path, "--max-fail-fraction", "0.3") == 0
    rows = list(csv.DictReader((tmp_path / "failures.csv").open()))
    assert [r["subject"] for r in rows] == sorted(expected)
    for r in rows:
        assert expected[r["subject"]] in r["reason"], r
        assert r["file"]
        assert r["subject"] in caplog.text
    m = load_manifest(tmp_path)
    assert set(m.subjects) == set(_truth(root)) - set(expected)
    assert m.extra["n_failures"] == len(expected)
    assert not set(expected) & {s for ids in m.splits.values() for s in ids}
    assert main(["verify", str(tmp_path), "--no-progress"]) == 0


def test_too_many_failures_exit_1(bad_cohort, tmp_path: Path, capsys):
    root, expected = bad_cohort
    assert _preprocess(root, tmp_path, "--max-fail-fraction", "0.1") == 1
    err = capsys.readouterr().err
    assert f"{len(expected)} of {N_SUBJECTS} subjects failed" in err and "failures.csv" in err
    assert not (tmp_path / "manifest.json").exists() and (tmp_path / "failures.csv").exists()


@pytest.mark.parametrize("problem", ["no_root", "root_is_file", "no_csv", "bad_columns", "explicit_missing_csv"])
def test_unreadable_root_or_csv_is_a_one_line_error(cohort4: Path, tmp_path: Path, capsys, problem: str):
    root, extra = tmp_path / "hcp", []
    root.mkdir()
    (root / "100206" / "T1w").mkdir(parents=True)
    if problem == "no_root":
        root = tmp_path / "absent"
    elif problem == "root_is_file":
        root = tmp_path / "file"
        root.write_text("x")
    elif problem == "bad_columns":
        (root / "unrestricted_x_2024.csv").write_text("Subject,Sex\n100206,M\n")
    elif problem == "explicit_missing_csv":
        extra = ["--unrestricted", str(tmp_path / "nope.csv")]
    assert _preprocess(root, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("brainage preprocess: error: ") and "\n" not in err


# ----------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill9_then_rerun_is_byte_identical(cohort4: Path, clean_run: Path, tmp_path: Path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "brainage_hpc.cli", "preprocess", "--hcp-root", str(cohort4), "--out", str(out), *ARGS]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "shard-00000.json"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the first shard was never written"
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    done = len(list(out.glob("shard-*.json")))
    assert done < 6
    assert _preprocess(cohort4, out) == 0
    assert not list(out.glob("*.tmp"))
    assert _outputs(out) == _outputs(clean_run)


# ----------------------------------------------------------------------------- SLURM array


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_array_script_on_local_cluster(cohort4, clean_run, tmp_path, slurm_cluster, slurm_jobs):
    """slurm/preprocess_array.sh: plan job -> 6-task array -> merge + verify; same bytes as one local run."""
    out = tmp_path / "array"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env.update(
        HCP_ROOT=str(cohort4),
        OUT=str(out),
        SHARD_SIZE="6",
        CPUS="1",
        TIME="10",
        BRAINAGE_HOME=str(REPO),
        VENV=str(Path(sys.executable).parents[1]),
        PREPROCESS_ARGS=" ".join(ARGS),
    )
    proc = subprocess.run(
        ["bash", str(REPO / "slurm" / "preprocess_array.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("submitted:"))
    ids = [tok for tok in line.replace("(", " ").split() if tok.isdigit()]
    plan, array, merge = ids[0], ids[1], ids[-1]
    slurm_jobs += [plan, array, merge]
    assert "(0-5, 6 subjects each)" in line
    wait_job_done(merge, timeout=300)
    logs = "\n".join(p.read_text() for p in sorted((out / "logs").glob("*.out")))
    assert "verify: OK: 6 shards, 32 subjects" in logs, logs[-3000:]
    assert _outputs(out) == _outputs(clean_run)
