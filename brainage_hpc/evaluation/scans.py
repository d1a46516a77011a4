"""What ``brainage predict`` scores: one :class:`ScanItem` per scan, from files, folders or a table.

A cohort run must know, before it starts, exactly which scans it owes an answer
for: the list is written once into the run's plan (``plan.json``) so that K SLURM
array tasks, a rerun after a kill, and the merge all agree on it.

Sources (in ``inputs``, mixed freely):

* NIfTI files (``*.nii``, ``*.nii.gz``);
* folders, searched recursively for NIfTI files (sorted);
* CSV/TSV tables with a ``path`` column and optional ``subject, session, age, sex,
  site, cohort, group`` (relative paths are relative to the table's folder).

An input that is missing, empty or unreadable becomes a :class:`ScanFailure` (an
error row in the output), never an exception.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "NIFTI_SUFFIXES",
    "ScanFailure",
    "ScanItem",
    "collect_scans",
    "find_nifti",
    "scan_key",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_TABLE_SUFFIXES = (".csv", ".tsv")
_SEX_CODES = {"0": 0, "1": 1, "f": 0, "m": 1, "female": 0, "male": 1}
_MISSING = {"", "n/a", "na", "nan", "none"}


@dataclass(frozen=True)
class ScanItem:
    """One scan to score, with what the source knows about it (the fields of contract 6's ScanRecord).

    Attributes:
        path: the NIfTI file as given (absolute when it came from a table or folder).
        subject: subject ID (the file name without suffix when the source has none).
        session: session label, or ``""``.
        age: true age in years when the source gives it, else None.
        sex: 0 = F, 1 = M, None = unknown.
        site, cohort, group: labels for the report ("" when unknown).
    """

    path: str
    subject: str = ""
    session: str = ""
    age: float | None = None
    sex: int | None = None
    site: str = ""
    cohort: str = ""
    group: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; inverse of :meth:`from_dict`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScanItem:
        """Build from :meth:`to_dict` output (unknown keys are ignored, so newer plans stay readable)."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class ScanFailure:
    """An input that did not yield a scan: what was given and the one-line reason."""

    source: str
    error: str


def scan_key(path: str | Path) -> tuple[str, int, int]:
    """Identity of a scan's content for resuming: (absolute path, size in bytes, mtime in ns).

    A rerun skips a scan whose key matches a scored record; replacing or touching the
    file changes the key, so the scan is scored again.

    Raises:
        OSError: the file cannot be stat'ed.
    """
    st = os.stat(path)
    return (os.path.abspath(path), int(st.st_size), int(st.st_mtime_ns))


def _is_nifti(p: Path) -> bool:
    return p.name.endswith(NIFTI_SUFFIXES)


def _stem(p: Path) -> str:
    name = p.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


def find_nifti(inputs: Sequence[str | Path]) -> tuple[list[Path], list[ScanFailure]]:
    """Expand files and folders into NIfTI files (folders recursively, sorted).

    Returns:
        (files, failures for inputs that do not exist or hold no NIfTI file).
    """
    files: list[Path] = []
    failures: list[ScanFailure] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _is_nifti(q))
            if not found:
                failures.append(ScanFailure(str(p), f"{p}: folder holds no .nii or .nii.gz file"))
            files += found
        elif p.exists():
            files.append(p)
        else:
            failures.append(ScanFailure(str(p), f"{p}: no such file or folder"))
    return files, failures


def _parse_age(text: str) -> float | None:
    if text.strip().lower() in _MISSING:
        return None
    age = float(text)
    if not math.isfinite(age) or not 0 <= age <= 130:
        raise ValueError(f"age {text!r} is not a plausible age in years")
    return age


def _parse_sex(text: str) -> int | None:
    t = text.strip().lower()
    if t in _MISSING:
        return None
    if t not in _SEX_CODES:
        raise ValueError(f"sex {text!r} is not valid (use M/F, male/female or 1/0)")
    return _SEX_CODES[t]


def _read_table(table: Path) -> tuple[list[ScanItem], list[ScanFailure]]:
    """One ScanItem per row of a CSV/TSV table with a ``path`` column; bad rows become failures."""
    delimiter = "\t" if table.name.endswith(".tsv") else ","
    try:
        with open(table, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh, delimiter=delimiter))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [], [ScanFailure(str(table), f"{table}: cannot read table ({type(exc).__name__}: {exc})")]
    if not rows or "path" not in (rows[0].keys() if rows else ()):
        return [], [ScanFailure(str(table), f"{table}: table has no rows or no 'path' column (columns: subject,path,age,sex)")]
    items: list[ScanItem] = []
    failures: list[ScanFailure] = []
    for line, row in enumerate(rows, start=2):
        raw_path = (row.get("path") or "").strip()
        where = f"{table}:{line}"
        if not raw_path:
            failures.append(ScanFailure(where, f"{where}: empty path"))
            continue
        path = Path(raw_path) if os.path.isabs(raw_path) else table.parent / raw_path
        try:
            age = _parse_age(row.get("age") or "")
            sex = _parse_sex(row.get("sex") or "")
        except ValueError as exc:
            failures.append(ScanFailure(str(path), f"{where}: {exc}"))
            continue
        items.append(ScanItem(
            path=str(path),
            subject=(row.get("subject") or "").strip() or _stem(path),
            session=(row.get("session") or "").strip(),
            age=age,
            sex=sex,
            site=(row.get("site") or "").strip(),
            cohort=(row.get("cohort") or "").strip() or table.stem,
            group=(row.get("group") or "").strip(),
        ))
    return items, failures


def collect_scans(inputs: Sequence[str | Path]) -> tuple[list[ScanItem], list[ScanFailure]]:
    """Every scan named by ``inputs`` (files, folders, tables), in order, without duplicates.

    Returns:
        (scans, failures). A scan listed twice (same absolute path) is kept once.
    """
    items: list[ScanItem] = []
    failures: list[ScanFailure] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_file() and p.name.endswith(_TABLE_SUFFIXES):
            got, bad = _read_table(p)
            items += got
            failures += bad
            continue
        files, bad = find_nifti([p])
        failures += bad
        items += [ScanItem(path=str(f.absolute()) if p.is_dir() else str(f), subject=_stem(f)) for f in files]
    seen: set[str] = set()
    unique: list[ScanItem] = []
    for it in items:
        key = os.path.abspath(it.path)
        if key not in seen:
            seen.add(key)
            unique.append(it)
    return unique, failures
