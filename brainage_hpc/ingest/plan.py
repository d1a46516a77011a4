"""The plan of a ``brainage preprocess`` run: which scans, which labels, which split, which shard.

A plan is plain JSON (``plan.json``): the same plan gives the same shards, and
SLURM array tasks rebuild it independently and get the same bytes. Several
cohorts merge here: every subject row carries ``cohort``, ``site`` and ``group``,
and the split is stratified by site x age x sex and keeps each group together.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from brainage_hpc.data.ages import age_to_bin
from brainage_hpc.ingest.cohorts import CohortError, CohortSpec, ScanRecord, read_cohorts
from brainage_hpc.ingest.splits import age_strata, import_seed_splits, make_splits

__all__ = ["PLAN_FORMAT", "SUBJECT_KEYS", "build_plan", "subject_rows"]

logger = logging.getLogger("brainage_hpc.preprocess")
PLAN_FORMAT = 1
# keys of a plan subject that are stored with it in shards, sidecars and the manifest
SUBJECT_KEYS = ("id", "age", "age_bin", "sex", "family_id", "cohort", "site", "group", "session")


def subject_rows(records: Sequence[tuple[str, ScanRecord]], kinds: dict[str, str]) -> list[dict[str, Any]]:
    """Plan rows (JSON-ready) for ``(id, record)`` pairs, with the split stratum of each.

    The age stratum is the HCP seed bin for HCP cohorts (their task is the bin) and
    the age quartile within the cohort otherwise.
    """
    quartile: dict[str, int] = {}
    for cohort in sorted({r.cohort for _, r in records}):
        members = [(sid, r) for sid, r in records if r.cohort == cohort]
        for (sid, _), q in zip(members, age_strata([r.age for _, r in members]), strict=True):
            quartile[sid] = q
    rows = []
    for sid, r in records:
        age_bin = r.age_bin if r.age_bin is not None else age_to_bin(float(r.age))  # type: ignore[arg-type]
        age_stratum = f"bin{age_bin}" if kinds.get(r.cohort) == "hcp" else f"q{quartile[sid]}"
        rows.append(
            {
                "id": sid,
                "t1w": r.path,
                "age": r.age,
                "age_bin": int(age_bin),
                "sex": int(r.sex),  # type: ignore[arg-type]  # training_failure() removed unknown sex
                "family_id": r.family_id,
                "cohort": r.cohort,
                "site": r.site,
                "group": r.group,
                "session": r.session,
                "stratum": f"{r.site}|{age_stratum}|{r.sex}",
            }
        )
    return rows


def build_plan(
    specs: list[CohortSpec],
    preprocess: dict[str, Any],
    preprocess_hash: str,
    *,
    shard_size: int,
    compression: str,
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    split_seed: int = 0,
    seed_splits: str | None = None,
) -> dict[str, Any]:
    """Read the cohorts, make (or import) the splits and return the plan dict.

    Raises:
        CohortError: a cohort cannot be read, or no scan is usable.
        FileNotFoundError, ValueError: bad seed splits or split fractions.
    """
    pairs, failures = read_cohorts(specs)
    for f in failures:
        logger.warning("skipping subject %s: %s (%s)", f.subject, f.reason, f.file)
    if not pairs:
        where = ", ".join(s.path for s in specs)
        raise CohortError(f"{where}: no usable subjects ({len(failures)} failed); see the warnings")
    kinds = {s.cohort_name: s.kind for s in specs}
    rows = subject_rows(pairs, kinds)
    ids = {r["id"] for r in rows}
    if seed_splits:
        imported = import_seed_splits(seed_splits)
        splits = {k: [s for s in v if s in ids] for k, v in imported.items()}
        unknown = sum(len(v) for v in imported.values()) - sum(len(v) for v in splits.values())
        unassigned = len(ids - {s for v in splits.values() for s in v})
        if unknown or unassigned:
            logger.warning("seed splits: %d IDs not in this cohort ignored; %d subjects in no split", unknown, unassigned)
        split_info: dict[str, Any] = {"method": "imported", "source": str(Path(seed_splits).resolve())}
    else:
        splits = make_splits(rows, tuple(split_fractions), seed=split_seed)
        split_info = {
            "method": "stratified site x age x sex, group-aware (family or subject)",
            "seed": split_seed,
            "fractions": list(split_fractions),
        }
    cohorts = []
    for s in specs:
        entry = {"name": s.cohort_name, "kind": s.kind, "path": str(Path(s.path).resolve())}
        if s.kind == "hcp":
            from brainage_hpc.ingest.hcp import find_csv

            root = Path(s.path)
            u = Path(s.unrestricted) if s.unrestricted else find_csv(root, "unrestricted")
            r = Path(s.restricted) if s.restricted else find_csv(root, "restricted")
            entry.update(unrestricted=str(u.resolve()) if u else None, restricted=str(r.resolve()) if r else None)
        cohorts.append(entry)
    source: dict[str, Any] = {"cohorts": cohorts}
    if len(specs) == 1 and specs[0].kind == "hcp":  # the keys HCP-only manifests always had
        source.update(hcp_root=cohorts[0]["path"], unrestricted=cohorts[0]["unrestricted"],
                      restricted=cohorts[0]["restricted"])
    return {
        "format_version": PLAN_FORMAT,
        "preprocess": preprocess,
        "preprocess_hash": preprocess_hash,
        "shard_size": shard_size,
        "compression": compression,
        "subjects": rows,
        "failures": [dataclasses.asdict(f) for f in failures],
        "splits": splits,
        "split_info": split_info,
        "source": source,
    }
