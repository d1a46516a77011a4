"""Cohort sources on tiny fake trees (empty NIfTI files: nothing is loaded): BIDS, CSV tables, HCP, merging."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainage_hpc.ingest.cohorts import (
    CohortError,
    CohortSpec,
    parse_cohort_arg,
    read_cohort,
    read_cohorts,
    training_failure,
)
from brainage_hpc.ingest.hcp import T1W_RELPATH
from brainage_hpc.ingest.plan import subject_rows
from brainage_hpc.ingest.splits import make_splits


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture
def bids(tmp_path: Path) -> Path:
    root = tmp_path / "ds001"
    root.mkdir()
    (root / "participants.tsv").write_text(
        "participant_id\tage\tsex\tsite\n"
        "sub-01\t30\tM\tA\n"
        "sub-02\tn/a\tF\tB\n"  # no age
        "sub-03\t71.5\tfemale\tn/a\n"  # site n/a -> cohort name
        "04\t89+\tM\tA\n"  # id without sub-, age not a number
        "sub-05\t40\tF\tA\n"  # no scan
        "sub-06\t50\tX\tB\n"  # sex not M/F
    )
    _touch(root / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz")
    _touch(root / "sub-01/ses-2/anat/sub-01_ses-2_run-1_T1w.nii.gz")
    _touch(root / "sub-01/ses-2/anat/sub-01_ses-2_run-2_T1w.nii.gz")
    _touch(root / "sub-01/ses-2/anat/sub-01_ses-2_T2w.nii.gz")  # not a T1w
    (root / "sub-01/sub-01_sessions.tsv").write_text("session_id\tage\nses-1\t30.0\nses-2\t32.5\n")
    _touch(root / "sub-02/anat/sub-02_T1w.nii")
    _touch(root / "sub-03/anat/sub-03_acq-mprage_T1w.nii.gz")
    _touch(root / "sub-04/anat/sub-04_T1w.nii.gz")
    _touch(root / "sub-06/anat/sub-06_T1w.nii.gz")
    _touch(root / "sub-07/anat/sub-07_T1w.nii.gz")  # not in participants.tsv
    _touch(root / "derivatives/x/sub-01/anat/sub-01_T1w.nii.gz")  # never searched
    return root


def test_bids_sessions_runs_entities_and_ages(bids: Path):
    records, failures = read_cohort(CohortSpec("bids", str(bids)))
    by_id = {r.scan_id: r for r in records}
    assert sorted(by_id) == [
        "sub-01_ses-1", "sub-01_ses-2_run-1", "sub-01_ses-2_run-2", "sub-02", "sub-03_acq-mprage", "sub-04", "sub-06",
    ]
    assert by_id["sub-01_ses-1"].age == 30.0 and by_id["sub-01_ses-2_run-2"].age == 32.5  # sessions.tsv ages
    assert by_id["sub-01_ses-2_run-2"].run == "2" and by_id["sub-01_ses-2_run-2"].session == "2"
    assert {by_id[k].group for k in by_id if k.startswith("sub-01")} == {"ds001/subject:sub-01"}
    assert by_id["sub-01_ses-1"].site == "A" and by_id["sub-03_acq-mprage"].site == "ds001"
    assert by_id["sub-03_acq-mprage"].sex == 0 and by_id["sub-03_acq-mprage"].age == 71.5
    assert all(r.cohort == "ds001" for r in records)
    assert [(f.subject, f.reason) for f in failures] == [
        ("sub-05", "no anat/*_T1w.nii[.gz] found"),
        ("sub-07", "sub-07 is not in participants.tsv"),
    ]
    assert training_failure(by_id["sub-02"]) == "age is n/a or missing"
    assert training_failure(by_id["sub-04"]) == "age '89+' is not a number of years in [0, 130)"
    assert training_failure(by_id["sub-06"]) == "sex 'X' is not M/F/male/female"
    assert training_failure(by_id["sub-01_ses-1"]) is None


def test_bids_without_participants_tsv_is_a_one_line_error(bids: Path):
    (bids / "participants.tsv").unlink()
    with pytest.raises(CohortError, match="no participants.tsv") as info:
        read_cohort(str(bids))
    assert "\n" not in str(info.value)


def test_csv_table_relative_paths_and_optional_columns(tmp_path: Path):
    _touch(tmp_path / "scans/a.nii.gz")
    table = tmp_path / "my cohort.csv"
    table.write_text(
        "Subject,Path,Age,Sex,Site,Session,Group\n"
        "a,scans/a.nii.gz,40,M,s1,,famX\n"
        f"b,{tmp_path / 'scans/b.nii.gz'},n/a,F,,2,\n"
        ",scans/c.nii.gz,1,M,,,\n"
    )
    records, failures = read_cohort(str(table))
    a, b = records
    assert a.path == str(tmp_path / "scans/a.nii.gz") and a.site == "s1" and a.group == "my_cohort/group:famX"
    assert b.session == "2" and b.scan_id == "b_ses-2" and b.age is None and b.site == "my_cohort"
    assert [f.reason for f in failures] == ["empty subject"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("subject\tage\n")
    with pytest.raises(CohortError, match="missing column"):
        read_cohort(str(bad))


def test_parse_cohort_arg(bids: Path, tmp_path: Path):
    assert parse_cohort_arg(f"x=bids:{bids}") == CohortSpec("bids", str(bids), name="x")
    assert parse_cohort_arg(str(bids)).kind == "bids"
    (tmp_path / "hcp").mkdir()
    (tmp_path / "hcp" / "unrestricted_x.csv").write_text("Subject,Gender,Age\n")
    assert parse_cohort_arg(str(tmp_path / "hcp")).kind == "hcp"
    with pytest.raises(CohortError, match="unknown kind 'bdis'"):
        parse_cohort_arg(f"bdis:{bids}")
    with pytest.raises(CohortError, match="no such file"):
        parse_cohort_arg(str(tmp_path / "absent"))


def _hcp(root: Path) -> Path:
    for s in ("100206", "100307", "100408"):
        _touch(root / s / T1W_RELPATH)
    (root / "unrestricted.csv").write_text("Subject,Gender,Age\n100206,M,26-30\n100307,F,22-25\n100408,M,22-25\n")
    (root / "restricted.csv").write_text("Subject,Age_in_Yrs,Family_ID\n100206,27,F1\n100307,23,F1\n100408,55,F2\n")
    return root


def test_P5_restricted_age_contradicting_the_bin_is_a_failure(tmp_path: Path):
    records, failures = read_cohort(CohortSpec("hcp", str(_hcp(tmp_path / "hcp"))))
    assert [r.subject for r in records] == ["100206", "100307"]
    assert records[0].group == records[1].group == "hcp/family:F1"
    (f,) = failures
    assert f.subject == "100408" and "Age_in_Yrs 55 contradicts the unrestricted age bin 22-25" in f.reason


def test_merged_cohorts_prefix_ids_and_keep_groups_together(bids: Path, tmp_path: Path):
    specs = [CohortSpec("hcp", str(_hcp(tmp_path / "hcp"))), parse_cohort_arg(f"ixi=bids:{bids}")]
    pairs, failures = read_cohorts(specs)
    ids = [sid for sid, _ in pairs]
    assert ids == [
        "hcp_100206", "hcp_100307", "ixi_sub-01_ses-1", "ixi_sub-01_ses-2_run-1", "ixi_sub-01_ses-2_run-2",
        "ixi_sub-03_acq-mprage",
    ]
    reasons = {f.subject: f.reason for f in failures}
    assert set(reasons) == {"hcp_100408", "ixi_sub-02", "ixi_sub-04", "ixi_sub-05", "ixi_sub-06", "ixi_sub-07"}
    rows = subject_rows(pairs, {"hcp": "hcp", "ixi": "bids"})
    assert rows[0]["stratum"].startswith("hcp|bin1|") and rows[2]["stratum"].startswith("A|q")
    for seed in range(5):
        splits = make_splits(rows, (0.4, 0.3, 0.3), seed=seed)
        where = {sid: name for name, ids_ in splits.items() for sid in ids_}
        assert len({where[s] for s in ids if s.startswith("ixi_sub-01")}) == 1  # sessions never split
        assert where["hcp_100206"] == where["hcp_100307"]  # one family
    with pytest.raises(CohortError, match="both named 'ixi'"):
        read_cohorts([parse_cohort_arg(f"ixi=bids:{bids}"), parse_cohort_arg(f"ixi=bids:{bids}")])


def test_flat_folder_of_sub_files_is_files_not_bids(bids: Path, tmp_path: Path):
    """``sub-01_T1w.nii.gz`` files side by side are a plain folder of scans; ``sub-*`` folders make BIDS."""
    from brainage_hpc.ingest.cohorts import detect_kind

    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "sub-01_T1w.nii.gz").write_bytes(b"")
    (flat / "sub-02_T1w.nii.gz").write_bytes(b"")
    assert detect_kind(flat) == "files"
    assert detect_kind(bids) == "bids"
