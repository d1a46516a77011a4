"""BIDS (with sessions) and CSV cohorts of 24 subjects -> one shard set with cohort and site per subject.

Acceptance of issue 15.1: each cohort preprocesses to 24/24 subjects with their
sites; merged, they form one shard set whose splits keep every participant's
sessions together and are stratified by site.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from brainage_hpc.cli import main
from brainage_hpc.data.shards import ShardReader, load_manifest
from brainage_hpc.ingest.bids_writer import pair_sessions, write_bids
from brainage_hpc.ingest.hcp import T1W_RELPATH

ARGS = ["--shape", "32", "40", "32", "--voxel-mm", "5", "--shard-size", "8", "--no-progress"]
N = 24


@pytest.fixture(autouse=True)
def _not_an_array_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)


@pytest.fixture(scope="module")
def cohort24(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    from brainage_hpc.ingest.synthetic import SynthConfig, make_cohort

    out = tmp_path_factory.mktemp("synth24")
    make_cohort(out, SynthConfig(n_subjects=N, seed=7, voxel_mm=4.0), progress=False, workers=2)
    truth = json.loads((out / "truth.json").read_text())["subjects"]
    return out, truth


@pytest.fixture(scope="module")
def bids24(cohort24, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    root, truth = cohort24
    items = [(t["subject"], str(root / t["subject"] / T1W_RELPATH), t["age"], t["sex"]) for t in truth]
    scans = pair_sessions(items, sites=("siteA", "siteB", "siteC"), sessions=2)
    return write_bids(tmp_path_factory.mktemp("bids") / "ds24", scans), scans


@pytest.fixture(scope="module")
def table24(cohort24, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, truth = cohort24
    path = tmp_path_factory.mktemp("table") / "clinic.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "path", "age", "sex", "site"])
        for i, t in enumerate(truth):
            w.writerow([f"c{i:02d}", str(root / t["subject"] / T1W_RELPATH), t["age"], t["sex"], f"scanner{i % 2}"])
    return path


def _shard_strings(out: Path, key: str) -> dict[str, str]:
    vals = {}
    for f in sorted(out.glob("shard-*.h5")):
        with h5py.File(f) as h:
            vals.update(zip([s.decode() for s in h["subject_id"][()]], [s.decode() for s in h[key][()]], strict=True))
    return vals


def test_bids_with_sessions_24_of_24_with_sites(bids24, tmp_path: Path):
    root, scans = bids24
    assert main(["preprocess", "--cohort", str(root), "--out", str(tmp_path), *ARGS]) == 0
    m = load_manifest(tmp_path)
    assert len(m.subjects) == N and m.extra["n_failures"] == 0
    want = {f"sub-{s.participant}_ses-{s.session}": s for s in scans}
    assert set(m.subjects) == set(want)
    sites = _shard_strings(tmp_path, "site")
    for sid, s in want.items():
        rec = m.subjects[sid]
        assert rec["site"] == sites[sid] == s.site and rec["cohort"] == "ds24" and rec["session"] == s.session
        assert rec["age"] == pytest.approx(s.age, abs=1e-3) and rec["sex"] == (s.sex == "M")
        assert rec["group"] == f"ds24/subject:sub-{s.participant}"
    where = {sid: name for name, ids in m.splits.items() for sid in ids}
    for part in {s.participant for s in scans}:
        assert len({where[sid] for sid in want if sid.startswith(f"sub-{part}_")}) == 1
    assert m.extra["source"]["cohorts"][0]["kind"] == "bids"
    assert main(["verify", str(tmp_path), "--no-progress"]) == 0


def test_csv_table_24_of_24_with_sites(cohort24, table24, tmp_path: Path):
    root, truth = cohort24
    assert main(["preprocess", "--cohort", f"clinic=csv:{table24}", "--out", str(tmp_path), *ARGS]) == 0
    m = load_manifest(tmp_path)
    assert sorted(m.subjects) == [f"c{i:02d}" for i in range(N)]
    assert _shard_strings(tmp_path, "site") == {f"c{i:02d}": f"scanner{i % 2}" for i in range(N)}
    assert set(_shard_strings(tmp_path, "cohort").values()) == {"clinic"}
    for name in ("train", "val", "test"):  # stratified by site: both scanners in every split
        assert {m.subjects[s]["site"] for s in m.splits[name]} == {"scanner0", "scanner1"}, name
    # the same scan gives the same volume whatever the cohort source
    hcp_out = tmp_path / "hcp"
    assert main(["preprocess", "--hcp-root", str(root), "--out", str(hcp_out), *ARGS]) == 0
    np.testing.assert_array_equal(ShardReader(tmp_path).read("c03"), ShardReader(hcp_out).read(truth[3]["subject"]))
    assert "cohort" not in load_manifest(hcp_out).extra["source"]


def test_merged_bids_csv_hcp_into_one_shard_set(cohort24, bids24, table24, tmp_path: Path):
    root, _ = cohort24
    bids_root, _ = bids24
    rc = main(["preprocess", "--hcp-root", str(root), "--cohort", f"ds={bids_root}", "--cohort", f"clinic={table24}",
               "--out", str(tmp_path), *ARGS])
    assert rc == 0
    m = load_manifest(tmp_path)
    assert len(m.subjects) == 3 * N
    counts = {c: sum(1 for r in m.subjects.values() if r["cohort"] == c) for c in ("hcp", "ds", "clinic")}
    assert counts == {"hcp": N, "ds": N, "clinic": N}
    assert all(sid.startswith(f"{r['cohort']}_") for sid, r in m.subjects.items())
    sites = {r["site"] for r in m.subjects.values()}
    assert sites == {"hcp", "siteA", "siteB", "siteC", "scanner0", "scanner1"}
    for name in ("train", "val"):
        assert {m.subjects[s]["cohort"] for s in m.splits[name]} == {"hcp", "ds", "clinic"}
