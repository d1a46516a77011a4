"""Splits: family-aware, stratified (age bin x sex) within +-5 points, deterministic; seed import."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from brainage_hpc.ingest.hcp import SubjectRecord
from brainage_hpc.ingest.splits import import_seed_splits, make_splits, split_proportions


def _hcp_like(n: int, seed: int) -> list[dict]:
    """HCP-like metadata: families of 1-5 (twins/siblings), bins 25/43/31/1 %, 45 % male, a few without family."""
    rng = np.random.default_rng(seed)
    recs, fam = [], 0
    while len(recs) < n:
        fam += 1
        for _ in range(int(rng.choice([1, 2, 3, 4, 5], p=[0.45, 0.25, 0.18, 0.08, 0.04]))):
            if len(recs) >= n:
                break
            u = rng.random()
            age_bin = 3 if u < 0.01 else 0 if u < 0.26 else 1 if u < 0.69 else 2
            family = f"F{fam:05d}" if rng.random() > 0.02 else None
            recs.append(
                {
                    "id": str(100000 + 7 * len(recs)),
                    "age_bin": age_bin,
                    "sex": int(rng.random() < 0.45),
                    "family_id": family,
                }
            )
    return recs


@pytest.mark.parametrize("n, seed", [(300, 0), (600, 1), (1113, 2)])
def test_families_never_cross_and_strata_are_balanced(n, seed):
    recs = _hcp_like(n, seed)
    splits = make_splits(recs, seed=seed)
    assert sorted(s for ids in splits.values() for s in ids) == sorted(r["id"] for r in recs)
    family = {r["id"]: r["family_id"] for r in recs}
    fams = [{family[s] for s in ids if family[s]} for ids in splits.values()]
    assert not (fams[0] & fams[1] or fams[0] & fams[2] or fams[1] & fams[2])
    for key in ("age_bin", "sex"):
        labels = {r["id"]: r[key] for r in recs}
        props = split_proportions(splits, labels)
        for name in splits:
            for value, whole in props["all"].items():
                assert abs(props[name][value] - whole) <= 0.05, (key, name, value)
    joint = split_proportions(splits, {r["id"]: (r["age_bin"], r["sex"]) for r in recs})
    assert max(abs(joint[k][v] - joint["all"][v]) for k in splits for v in joint["all"]) <= 0.05
    for name, frac in zip(("train", "val", "test"), (0.7, 0.15, 0.15), strict=True):
        assert abs(len(splits[name]) / n - frac) < 0.02


def test_deterministic_for_a_seed_and_accepts_records():
    recs = _hcp_like(200, 3)
    assert make_splits(recs, seed=7) == make_splits(list(reversed(recs)), seed=7)
    assert make_splits(recs, seed=7) != make_splits(recs, seed=8)
    objs = [SubjectRecord(r["id"], "", None, r["age_bin"], r["sex"], r["family_id"]) for r in recs]
    assert make_splits(objs, seed=7) == make_splits(recs, seed=7)


def test_without_families_and_custom_fractions():
    recs = [{"id": str(i), "age_bin": i % 4, "sex": i % 2, "family_id": None} for i in range(100)]
    splits = make_splits(recs, fractions=(0.8, 0.2, 0.0), seed=0)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (80, 20, 0)


@pytest.mark.parametrize("fractions", [(0.7, 0.2), (0.5, 0.5, 0.5), (1.2, -0.1, -0.1)])
def test_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        make_splits([{"id": "1", "age_bin": 0, "sex": 0, "family_id": None}], fractions=fractions)


def test_duplicate_ids_rejected():
    rec = {"id": "1", "age_bin": 0, "sex": 0, "family_id": None}
    with pytest.raises(ValueError, match="more than once"):
        make_splits([rec, dict(rec)])


def test_import_seed_splits(tmp_path: Path):
    np.save(tmp_path / "train.npy", np.array([100206, 100307]))
    np.save(tmp_path / "val.npy", np.array(["100408"]))
    np.save(tmp_path / "test.npy", np.array([100510.0]))
    assert import_seed_splits(tmp_path) == {"train": ["100206", "100307"], "val": ["100408"], "test": ["100510"]}
    (tmp_path / "test.npy").unlink()
    assert set(import_seed_splits(tmp_path)) == {"train", "val"}


def test_import_seed_splits_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no train.npy"):
        import_seed_splits(tmp_path)
    np.save(tmp_path / "train.npy", np.array([1, 2]))
    np.save(tmp_path / "val.npy", np.array([2]))
    with pytest.raises(ValueError, match="also in train.npy"):
        import_seed_splits(tmp_path)
    np.save(tmp_path / "val.npy", np.array([[3]]))
    with pytest.raises(ValueError, match="1-D"):
        import_seed_splits(tmp_path)
    np.save(tmp_path / "val.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="re-save"):
        import_seed_splits(tmp_path)
