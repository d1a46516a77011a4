"""What ``brainage predict`` scores: one ``ScanRecord`` per scan, from any mix of cohort sources.

A cohort run must know, before it starts, exactly which scans it owes an answer
for: the list is written once into the run's plan (``plan.json``) so that K SLURM
array tasks, a rerun after a kill, and the merge all agree on it.

Each input is read by :func:`brainage_hpc.ingest.cohorts.read_cohort` (contract 6),
the same reader ``brainage preprocess`` uses: NIfTI files or folders (no ages), a
BIDS root (``participants.tsv`` ages, sex, site; one row per session), an HCP root,
or a CSV/TSV table (``subject, path, age, sex`` + optional ``site, session, group``);
``[NAME=][KIND:]PATH`` names the cohort or forces the kind. An input that cannot be
read, or a row that cannot be used, is a ``Failure`` (an error row in the output),
never an exception.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from brainage_hpc.ingest.cohorts import CohortError, Failure, ScanRecord, read_cohort

__all__ = ["Failure", "ScanRecord", "collect_scans", "failure_message", "scan_key"]


def scan_key(path: str | Path) -> tuple[str, int, int]:
    """Identity of a scan's content for resuming: (absolute path, size in bytes, mtime in ns).

    A rerun skips a scan whose key matches a scored record; replacing or touching the
    file changes the key, so the scan is scored again.

    Raises:
        OSError: the file cannot be stat'ed.
    """
    st = os.stat(path)
    return (os.path.abspath(path), int(st.st_size), int(st.st_mtime_ns))


def failure_message(failure: Failure) -> str:
    """One line naming the file (or subject) and the reason."""
    where = failure.file or failure.subject
    return failure.reason if where in failure.reason else f"{where}: {failure.reason}"


def collect_scans(inputs: Sequence[str | Path]) -> tuple[list[ScanRecord], list[Failure]]:
    """Every scan named by ``inputs``, in input order (each source sorted by scan ID), without duplicates.

    Returns:
        (scans, failures). A scan listed twice (same absolute path) is kept once.
    """
    records: list[ScanRecord] = []
    failures: list[Failure] = []
    for raw in inputs:
        try:
            got, bad = read_cohort(str(raw))
        except (CohortError, OSError) as exc:
            failures.append(Failure(Path(str(raw)).name, str(raw), str(exc).strip().splitlines()[0]))
            continue
        if not got and not bad and Path(str(raw)).is_dir():
            failures.append(Failure(Path(str(raw)).name, str(raw), "folder holds no .nii or .nii.gz file"))
        records += got
        failures += bad
    seen: set[str] = set()
    unique: list[ScanRecord] = []
    for rec in records:
        key = os.path.abspath(rec.path)
        if key not in seen:
            seen.add(key)
            unique.append(rec)
    return unique, failures
