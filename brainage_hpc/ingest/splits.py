"""Train/val/test splits: stratified (site x age x sex), group-aware, deterministic.

HCP is a twin and sibling study: about half of the subjects share a family with
someone else, and siblings' brains are alike. A split that puts two siblings on
both sides of the train/test line leaks. When ``Family_ID`` is known, whole
families are assigned to one split; subjects without one are their own family.
The same holds for the sessions of one subject in a longitudinal BIDS cohort:
records carry a ``group`` (family or subject) and no group crosses a split.
Merged cohorts are stratified by site as well as age, so every site is in every
split in proportion (a site-confounded test set flatters a model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SPLIT_NAMES", "age_strata", "import_seed_splits", "make_splits", "split_proportions"]

SPLIT_NAMES = ("train", "val", "test")


def _field(rec: Any, name: str) -> Any:
    return rec[name] if isinstance(rec, Mapping) else getattr(rec, name)


def _optional(rec: Any, name: str) -> Any:
    return rec.get(name) if isinstance(rec, Mapping) else getattr(rec, name, None)


def age_strata(ages: Sequence[float | None], n_strata: int = 4) -> list[int]:
    """Age quantile (0..n_strata-1) of each age within the given list; -1 for ``None``.

    Used as the age stratum of cohorts with exact ages over a wide range, where
    HCP's young-adult bins would put almost everyone in the last bin.

    Examples:
        >>> age_strata([20, 30, 40, 50, None, 60, 70, 80, 90], n_strata=4)
        [0, 0, 1, 1, -1, 2, 2, 3, 3]
    """
    known = np.array([a for a in ages if a is not None], dtype=np.float64)
    if known.size == 0:
        return [-1] * len(ages)
    edges = np.quantile(known, np.linspace(0, 1, n_strata + 1)[1:-1])
    return [-1 if a is None else int(np.searchsorted(edges, a, side="right")) for a in ages]


def make_splits(
    subjects: Sequence[Any], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, list[str]]:
    """Stratified, group-aware train/val/test split.

    Groups (a ``group`` field when records have one, else the ``family_id``, else
    the subject alone) are shuffled with ``seed``, then placed largest first, each
    into the split whose per-stratum counts are furthest below their target
    ``fraction x total``. The stratum is the record's ``stratum`` field when it has
    one (e.g. ``"site|age-quartile|sex"``), else age_bin x sex.

    Args:
        subjects: records (dicts or objects) with ``id``, ``age_bin``, ``sex``,
            ``family_id`` (``None`` when unknown) and optionally ``group`` and ``stratum``.
        fractions: (train, val, test) fractions, non-negative, summing to 1.
        seed: shuffling seed; the same seed and subjects give the same split.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, IDs sorted within each split.

    Raises:
        ValueError: bad fractions or duplicate subject IDs.

    Examples:
        >>> recs = [{"id": str(i), "age_bin": i % 4, "sex": i % 2, "family_id": None} for i in range(100)]
        >>> {k: len(v) for k, v in make_splits(recs, seed=0).items()}
        {'train': 68, 'val': 16, 'test': 16}
    """
    fr = np.asarray([float(f) for f in fractions], dtype=np.float64)
    if fr.shape != (3,) or np.any(fr < 0) or abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions must be 3 non-negative numbers summing to 1 (train, val, test), got {list(fractions)}"
        )
    ids = [str(_field(r, "id")) for r in subjects]
    if len(set(ids)) != len(ids):
        dup = next(s for s in ids if ids.count(s) > 1)
        raise ValueError(f"subject {dup} appears more than once")
    strata: dict[Any, int] = {}
    families: dict[str, list[tuple[str, int]]] = {}
    for rec, sid in zip(subjects, ids, strict=True):
        stratum = _optional(rec, "stratum")
        key = stratum if stratum is not None else (int(_field(rec, "age_bin")), int(_field(rec, "sex")))
        col = strata.setdefault(key, len(strata))
        group = _optional(rec, "group")
        fam = _field(rec, "family_id")
        families.setdefault(str(group) if group else f"family:{fam}" if fam else f"subject:{sid}", []).append((sid, col))
    n_strata = max(len(strata), 1)
    totals = np.zeros(n_strata)
    for members in families.values():
        for _, col in members:
            totals[col] += 1
    target = fr[:, None] * totals[None, :]  # (3, S) wanted subjects per split and stratum
    size_target = fr * len(ids)

    rng = np.random.default_rng(seed)
    names = sorted(families)
    order = [names[i] for i in rng.permutation(len(names))]
    order.sort(key=lambda name: -len(families[name]))  # stable: big families first, shuffled within a size
    counts = np.zeros((3, n_strata))
    sizes = np.zeros(3)
    out: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for name in order:
        members = families[name]
        comp = np.zeros(n_strata)
        for _, col in members:
            comp[col] += 1
        # fraction of each split's target still missing, in this family's strata and overall
        rel = ((target - counts) / np.maximum(target, 1e-9) * comp[None, :]).sum(axis=1) / comp.sum()
        size_rel = (size_target - sizes) / np.maximum(size_target, 1e-9)
        score = rel + 0.5 * size_rel
        score[fr == 0] = -np.inf
        best = int(np.argmax(score))
        counts[best] += comp
        sizes[best] += len(members)
        out[SPLIT_NAMES[best]].extend(sid for sid, _ in members)
    return {k: sorted(v) for k, v in out.items()}


def split_proportions(splits: Mapping[str, Sequence[str]], labels: Mapping[str, Any]) -> dict[str, dict[Any, float]]:
    """Fraction of each label value in each split (and in ``"all"``), for checking stratification.

    Args:
        splits: split name -> subject IDs.
        labels: subject ID -> label (e.g. age bin, sex, or an (age_bin, sex) tuple).

    Returns:
        split name -> {label: fraction}; key ``"all"`` holds the whole cohort.
    """
    groups = dict(splits)
    groups["all"] = [s for ids in splits.values() for s in ids]
    values = sorted({labels[s] for s in groups["all"]}, key=str)
    out: dict[str, dict[Any, float]] = {}
    for name, ids in groups.items():
        n = max(len(ids), 1)
        out[name] = {v: sum(1 for s in ids if labels[s] == v) / n for v in values}
    return out


def _normalise_id(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    return str(value).strip()


def import_seed_splits(directory: str | Path) -> dict[str, list[str]]:
    """Read the seed project's ``train.npy``, ``val.npy``, ``test.npy`` (arrays of subject IDs).

    Integer, float and string arrays are accepted; IDs become strings
    (``100206.0`` -> ``"100206"``). ``val.npy``/``test.npy`` may be absent.

    Args:
        directory: folder with the ``.npy`` files.

    Returns:
        split name -> sorted subject IDs.

    Raises:
        FileNotFoundError: no ``train.npy`` in ``directory``.
        ValueError: a file is not a 1-D array of IDs, or an ID is in two splits.
    """
    directory = Path(directory)
    if not (directory / "train.npy").is_file():
        raise FileNotFoundError(f"{directory}: no train.npy (expected train.npy, val.npy, test.npy of subject IDs)")
    out: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for name in SPLIT_NAMES:
        path = directory / f"{name}.npy"
        if not path.is_file():
            continue
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(
                f"{path}: not a plain array of IDs ({exc}); re-save it with np.save(path, np.asarray(ids, dtype=str))"
            ) from exc
        if arr.ndim != 1:
            raise ValueError(f"{path}: expected a 1-D array of subject IDs, got shape {arr.shape}")
        ids = sorted({_normalise_id(v) for v in arr.tolist()})
        for sid in ids:
            if sid in seen:
                raise ValueError(f"{path}: subject {sid} is also in {seen[sid]}.npy")
            seen[sid] = name
        out[name] = ids
    return out
