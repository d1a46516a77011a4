"""HCP discovery and CSV parsing on a tiny fake layout (empty T1w files: nothing is loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from brainage_hpc.data.ages import age_bin_label, age_to_bin, bin_centre, bin_to_class, sex_code
from brainage_hpc.ingest.hcp import T1W_RELPATH, HCPError, discover_subjects, find_csv


def _layout(root: Path, subjects: list[str], t1w: bool = True) -> None:
    for s in subjects:
        (root / s / "T1w").mkdir(parents=True)
        if t1w:
            (root / s / T1W_RELPATH).write_bytes(b"")


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture
def hcp(tmp_path: Path) -> Path:
    _layout(tmp_path, ["100206", "100307", "100408", "100510"])
    _csv(
        tmp_path / "unrestricted_jdoe_6_1_2024_10_0_0.csv",
        "Subject,Release,Gender,Age",
        ["100206,Q1,M,26-30", "100307,Q1,F,22-25", "100408,Q2,M,36+", "100510,Q2,F,31-35", "999999,Q3,F,22-25"],
    )
    _csv(
        tmp_path / "RESTRICTED_jdoe_6_1_2024_10_0_0.csv",
        "Subject,Age_in_Yrs,Family_ID,Mother_ID",
        ["100206,27,51488_81352,1", "100307,23,51488_81352,1", "100408,36,52123_82222,2"],
    )
    return tmp_path


def test_bins_and_sex_helpers():
    assert [age_to_bin(a) for a in (22, 25.9, 26, 30, 31, 35, 36, 40)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert age_bin_label(3) == "36+" and bin_to_class(1, 2) == 0 and bin_to_class(2, 2) == 1
    assert bin_centre(0) == 23.5
    assert sex_code(" m ") == 1 and sex_code("F") == 0
    with pytest.raises(ValueError, match="Gender"):
        sex_code("X")


def test_discover_joins_both_csvs(hcp: Path):
    cohort = discover_subjects(hcp)
    assert [r.id for r in cohort.records] == ["100206", "100307", "100408", "100510"]
    r0, r3 = cohort.records[0], cohort.records[3]
    assert (r0.age, r0.age_bin, r0.sex, r0.family_id) == (27.0, 1, 1, "51488_81352")
    assert (r3.age, r3.age_bin, r3.sex, r3.family_id) == (None, 2, 0, None)  # not in the restricted CSV
    assert r0.t1w == str(hcp / "100206" / T1W_RELPATH)
    assert cohort.failures == [] and cohort.n_csv_only == 1
    assert cohort.restricted is not None and cohort.restricted.name.startswith("RESTRICTED_")


def test_discover_without_restricted(hcp: Path):
    next(hcp.glob("RESTRICTED_*")).unlink()
    cohort = discover_subjects(hcp)
    assert cohort.restricted is None
    assert all(r.age is None and r.family_id is None for r in cohort.records)


@pytest.mark.parametrize("name", ["unrestricted.csv", "UNRESTRICTED_x_1_2_2024.CSV", "unrestricted_jdoe.csv"])
def test_find_csv_accepts_synthetic_and_hcp_names(tmp_path: Path, name: str):
    (tmp_path / name).write_text("Subject\n")
    (tmp_path / "restricted.csv").write_text("Subject\n")
    assert find_csv(tmp_path, "unrestricted").name == name
    assert find_csv(tmp_path, "restricted").name == "restricted.csv"


def test_find_csv_ambiguous_is_an_error(tmp_path: Path):
    (tmp_path / "unrestricted_a.csv").write_text("Subject\n")
    (tmp_path / "unrestricted_b.csv").write_text("Subject\n")
    with pytest.raises(HCPError, match="--unrestricted"):
        find_csv(tmp_path, "unrestricted")


def test_explicit_csv_paths(hcp: Path, tmp_path_factory: pytest.TempPathFactory):
    elsewhere = tmp_path_factory.mktemp("csv")
    for p in list(hcp.glob("*.csv")):
        p.rename(elsewhere / p.name.lower())
    with pytest.raises(HCPError, match="no unrestricted"):
        discover_subjects(hcp)
    cohort = discover_subjects(
        hcp, elsewhere / "unrestricted_jdoe_6_1_2024_10_0_0.csv", elsewhere / "restricted_jdoe_6_1_2024_10_0_0.csv"
    )
    assert len(cohort.records) == 4 and cohort.records[0].age == 27.0


def test_bad_subjects_become_failures(hcp: Path):
    (hcp / "100408" / T1W_RELPATH).unlink()  # folder without the T1w file
    _layout(hcp, ["200000"])  # folder absent from the CSV
    (hcp / "notes").mkdir()  # neither in the CSV nor a T1w folder: ignored
    csv_path = next(hcp.glob("unrestricted_*"))
    text = csv_path.read_text().replace("100510,Q2,F,31-35", "100510,Q2,F,41-45").replace("100307,Q1,F", "100307,Q1,?")
    csv_path.write_text(text)
    cohort = discover_subjects(hcp)
    assert [r.id for r in cohort.records] == ["100206"]
    reasons = {f.subject: f.reason for f in cohort.failures}
    assert set(reasons) == {"100307", "100408", "100510", "200000"}
    assert "T1w file missing" in reasons["100408"]
    assert "absent from" in reasons["200000"]
    assert "unknown age bin '41-45'" in reasons["100510"]
    assert "Gender" in reasons["100307"]


def test_missing_column_is_one_line_error(hcp: Path):
    _csv(next(hcp.glob("unrestricted_*")), "Subject,Sex,Age", ["100206,M,26-30"])
    with pytest.raises(HCPError, match=r"unrestricted_.*missing column\(s\) Gender") as info:
        discover_subjects(hcp)
    assert "\n" not in str(info.value)


def test_bom_and_whitespace_are_tolerated(tmp_path: Path):
    _layout(tmp_path, ["100206"])
    (tmp_path / "unrestricted.csv").write_bytes("\ufeffSubject , Gender,Age\n100206 , M ,22-25\n".encode())
    assert discover_subjects(tmp_path).records[0].sex == 1


def test_unreadable_root(tmp_path: Path):
    with pytest.raises(HCPError, match="not a readable directory"):
        discover_subjects(tmp_path / "nope")
    with pytest.raises(HCPError, match="cannot read CSV"):
        _layout(tmp_path, ["100206"])
        discover_subjects(tmp_path, unrestricted=tmp_path / "missing.csv")
