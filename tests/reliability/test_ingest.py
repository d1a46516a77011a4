"""Issue 14, ingestion cases: S2, S4, item 6 (implausible inputs), U3, P5. Each fails on the main of 2026-12-02.

Small cohort (10 subjects, 4 mm) made once per module; every test works on its own copy.
"""

from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainage_hpc.cli import main
from brainage_hpc.data.shards import ShardReader, load_manifest
from brainage_hpc.ingest.hcp import T1W_RELPATH
from brainage_hpc.ingest.prepare import ScanError, prepare_scan
from brainage_hpc.ingest.preprocess import PreprocessConfig, preprocess_volume

ARGS = ["--shape", "32", "40", "32", "--voxel-mm", "5", "--shard-size", "4", "--no-progress", "--max-fail-fraction", "0.6"]
N = 10


@pytest.fixture(autouse=True)
def _not_an_array_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)


@pytest.fixture(scope="module")
def cohort10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from brainage_hpc.ingest.synthetic import SynthConfig, make_cohort

    out = tmp_path_factory.mktemp("cohort10")
    make_cohort(out, SynthConfig(n_subjects=N, seed=3, voxel_mm=4.0), progress=False, workers=1)
    return out


@pytest.fixture
def hcp(cohort10: Path, tmp_path: Path) -> Path:
    root = tmp_path / "hcp"
    shutil.copytree(cohort10, root)
    return root


def _ids(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "T1w").is_dir())


def _preprocess(root: Path, out: Path, *extra: str) -> int:
    return main(["preprocess", "--hcp-root", str(root), "--out", str(out), *ARGS, *extra])


def _failures(out: Path) -> dict[str, dict[str, str]]:
    return {r["subject"]: r for r in csv.DictReader((out / "failures.csv").open())}


def _save_like(path: Path, data: np.ndarray) -> None:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(data, img.affine), path)


def test_S2_rerun_redoes_shards_whose_inputs_changed(hcp: Path, tmp_path: Path, caplog):
    ids = _ids(hcp)
    fixed, replaced, donor = ids[1], ids[6], ids[9]
    t1 = {s: hcp / s / T1W_RELPATH for s in ids}
    good = t1[fixed].read_bytes()
    t1[fixed].write_bytes(good[: len(good) // 2])  # truncated
    out = tmp_path / "out"
    assert _preprocess(hcp, out) == 0
    assert fixed in _failures(out)
    before = ShardReader(out).read(replaced)

    t1[fixed].write_bytes(good)  # the truncated T1 fixed
    shutil.copyfile(t1[donor], t1[replaced])  # another T1 replaced
    with caplog.at_level("INFO"):
        assert _preprocess(hcp, out) == 0
    assert "input of" in caplog.text and "changed" in caplog.text
    m = load_manifest(out)
    assert fixed in m.subjects and not _failures(out)
    cfg = PreprocessConfig.from_dict(m.preprocess)
    after = ShardReader(out).read(replaced)[0]
    np.testing.assert_array_equal(after, preprocess_volume(t1[replaced], cfg))
    assert not np.array_equal(after, before[0])
    untouched = sorted(out.glob("shard-00002.*"))
    stamp = [p.stat().st_mtime_ns for p in untouched]
    caplog.clear()
    with caplog.at_level("INFO"):
        assert _preprocess(hcp, out) == 0  # nothing changed: nothing redone
    assert caplog.text.count("already done") == 3
    assert [p.stat().st_mtime_ns for p in untouched] == stamp
    caplog.clear()
    with caplog.at_level("INFO"):
        assert _preprocess(hcp, out, "--force") == 0
    assert caplog.text.count("redoing it (--force)") == 3


def _flip_undetected_by_nibabel(path: Path) -> Path:
    """XOR 64 bytes of the deflate stream where zlib still decodes (nibabel reads garbage) but the CRC fails."""
    raw = path.read_bytes()
    good = np.asarray(nib.load(path).dataobj)
    for start in range(512, len(raw) - 80, 211):
        bad = bytearray(raw)
        for j in range(64):
            bad[start + j] ^= 0xFF
        path.write_bytes(bytes(bad))
        try:
            garbage = np.asarray(nib.load(path).dataobj)
        except Exception:  # noqa: BLE001  (zlib noticed this one; try the next offset)
            continue
        with pytest.raises(gzip.BadGzipFile, match="CRC"):
            gzip.decompress(bytes(bad))
        assert (garbage != good).mean() > 0.05  # what nibabel alone would have stored
        return path
    raise AssertionError("no offset found")  # pragma: no cover


def test_S4_bad_gzip_crc_is_a_failure_row_and_a_scan_error(hcp: Path, tmp_path: Path):
    ids = _ids(hcp)
    victim = _flip_undetected_by_nibabel(hcp / ids[4] / T1W_RELPATH)
    out = tmp_path / "out"
    assert _preprocess(hcp, out) == 0
    row = _failures(out)[ids[4]]
    assert row["file"] == str(victim) and "bad gzip CRC" in row["reason"]
    assert ids[4] not in load_manifest(out).subjects and len(load_manifest(out).subjects) == N - 1
    with pytest.raises(ScanError, match="bad gzip CRC") as info:  # the reader predict uses
        prepare_scan(victim, PreprocessConfig(shape=(32, 40, 32), voxel_mm=5.0))
    assert str(info.value).startswith(str(victim)) and "\n" not in str(info.value)


def test_U3_all_negative_volume_says_not_skull_stripped(hcp: Path, tmp_path: Path):
    ids = _ids(hcp)
    path = hcp / ids[2] / T1W_RELPATH
    data = np.asarray(nib.load(path).dataobj).astype(np.float32)
    _save_like(path, -np.abs(data) - 1.0)
    out = tmp_path / "out"
    assert _preprocess(hcp, out) == 0
    assert _failures(out)[ids[2]]["reason"] == "no voxels > 0 (not skull-stripped?)"
    with pytest.raises(ScanError, match=r"no voxels > 0 \(not skull-stripped\?\)"):
        prepare_scan(path, PreprocessConfig(shape=(32, 40, 32), voxel_mm=5.0))


def _phantom(kind: str) -> nib.Nifti1Image:
    rng = np.random.default_rng(0)
    if kind == "noise_cube":  # 160 mm of +-noise at 4 mm: half the voxels > 0, scattered
        data = rng.standard_normal((40, 40, 40)).astype(np.float32)
        voxel = 4.0
    elif kind == "box":  # a solid 120 mm box (1.7 L) filling the field of view
        data = np.full((40, 40, 40), 100.0, dtype=np.float32) + rng.random((40, 40, 40), dtype=np.float32)
        voxel = 3.0
    elif kind == "small_32mm":  # a brain-shaped blob 32 mm across
        g = np.linspace(-1, 1, 32)
        r = np.sqrt(sum(a**2 for a in np.meshgrid(g, g, g, indexing="ij")))
        data = np.where(r < 0.9, 500 + 100 * rng.random((32, 32, 32)), 0).astype(np.float32)
        voxel = 1.0
    else:  # "head": a 176 x 216 x 192 mm ellipsoid, 3.8 L (skull and scalp included)
        g = [np.linspace(-1, 1, n) for n in (44, 54, 48)]
        r = np.sqrt(sum(a**2 for a in np.meshgrid(*g, indexing="ij")))
        data = np.where(r < 1.0, 300 + 100 * rng.random(r.shape), 0).astype(np.float32)
        voxel = 4.0
    affine = np.diag([voxel, voxel, voxel, 1.0])
    return nib.Nifti1Image(data, affine)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("noise_cube", "not a solid object"),
        ("box", "of the field of view is foreground"),
        ("small_32mm", "implausibly small"),
        ("head", "brain volume 3"),
    ],
)
def test_I6_implausible_inputs_are_failure_rows_not_ages(hcp: Path, tmp_path: Path, kind: str, reason: str):
    ids = _ids(hcp)
    path = hcp / ids[5] / T1W_RELPATH
    nib.save(_phantom(kind), path)
    out = tmp_path / "out"
    assert _preprocess(hcp, out) == 0
    row = _failures(out)[ids[5]]
    assert reason in row["reason"], row
    assert set(load_manifest(out).subjects) == set(ids) - {ids[5]}  # the rest processed
    with pytest.raises(ScanError, match=reason):
        prepare_scan(path, PreprocessConfig(shape=(32, 40, 32), voxel_mm=5.0))


def test_P5_restricted_age_contradicting_its_bin_is_a_failure_row(hcp: Path, tmp_path: Path):
    ids = _ids(hcp)
    path = hcp / "restricted.csv"
    rows = list(csv.reader(path.open()))
    rows = [[r[0], "55", r[2]] if r[0] == ids[3] else r for r in rows]
    path.write_text("".join(",".join(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert _preprocess(hcp, out) == 0
    reason = _failures(out)[ids[3]]["reason"]
    assert "restricted Age_in_Yrs 55 contradicts the unrestricted age bin" in reason
    assert ids[3] not in load_manifest(out).subjects
