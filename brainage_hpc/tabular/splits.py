"""Train/val/test subjects of a FreeSurfer table: the shards' manifest, or the shards' splitter.

Using the manifest's split (or, without one, the same ``make_splits`` with the same
seed) keeps the tabular baseline and the deep models on identical test subjects.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from brainage_hpc.tabular.data import (
    SPLIT_NAMES,
    TabularData,
    TabularDataError,
    add_note,
    normalise_subject_id,
    preview_ids,
)

__all__ = ["resolve_splits"]


def _splits_from_manifest(path: Path, subjects: list[str], notes: list[str]) -> dict[str, list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    try:
        splits = json.loads(path.read_text())["splits"]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TabularDataError(f"{path}: not valid JSON ({exc})") from None
    except (KeyError, TypeError):
        raise TabularDataError(f"{path}: no 'splits' key (expected splits: {{train, val, test}})") from None
    if not isinstance(splits, dict) or any(not isinstance(splits.get(k, []), list) for k in SPLIT_NAMES):
        raise TabularDataError(f"{path}: 'splits' must map train/val/test to lists of subject IDs")
    known = set(subjects)
    out: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for name in SPLIT_NAMES:
        ids = [normalise_subject_id(s) for s in splits.get(name, [])]
        for s in ids:
            if s in seen and seen[s] != name:
                raise TabularDataError(f"{path}: subject {s} is in both '{seen[s]}' and '{name}'")
            seen[s] = name
        absent = [s for s in ids if s not in known]
        if absent:
            add_note(
                notes,
                f"{path.name}: {len(absent)} {name} subject(s) not in the joined table, skipped: {preview_ids(absent)}",
            )
        out[name] = [s for s in ids if s in known]
    outside = [s for s in subjects if s not in seen]
    if outside:
        add_note(
            notes, f"{path.name}: {len(outside)} subject(s) of the table are in no split, unused: {preview_ids(outside)}"
        )
    return out


def _make_splits(labels: pd.DataFrame, fractions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """The shards' splitter on the joined subjects (stratum age bin x sex, families kept whole)."""
    from brainage_hpc.ingest.splits import make_splits

    records = [
        {
            "id": str(s),
            "age_bin": int(r.age_bin),
            "sex": -1 if pd.isna(r.sex) else int(r.sex),  # unknown sex: its own stratum
            "family_id": r.family_id,
        }
        for s, r in labels.iterrows()
    ]
    try:
        result = make_splits(records, fractions=fractions, seed=seed)
    except ValueError as exc:
        raise TabularDataError(f"cannot split the subjects: {exc}") from None
    return {name: [str(s) for s in result.get(name, [])] for name in SPLIT_NAMES}


def resolve_splits(
    data: TabularData,
    manifest: str | Path | None = None,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> tuple[dict[str, list[str]], str]:
    """Train/val/test subject IDs: the shards' manifest when given, else a stratified split.

    Without a manifest the subjects are split by ``brainage_hpc.ingest.splits.make_splits``,
    the splitter of ``brainage preprocess``: stratified by age bin x sex, families kept
    whole when ``Family_ID`` is known, seeded. The same subjects and seed therefore get
    the same split as the shards. Notes go to ``data.notes``.

    Returns:
        ``(splits, source)``: ``{"train": [...], "val": [...], "test": [...]}`` and a short
        description of where the split came from.

    Raises:
        FileNotFoundError: the manifest does not exist.
        TabularDataError: malformed manifest, or an empty train or test split.
    """
    subjects = list(data.labels.index)
    if manifest is not None:
        splits = _splits_from_manifest(Path(manifest), subjects, data.notes)
        source = f"manifest {manifest}"
    else:
        splits = _make_splits(data.labels, fractions, seed)
        source = f"stratified family-aware split (make_splits, seed {seed})"
    for name in ("train", "test"):
        if not splits[name]:
            raise TabularDataError(f"the {name} split is empty after joining with the table ({source})")
    return splits, source
