"""HCP Young Adult conventions: file layout, demographics CSVs, subject discovery.

The unrestricted HCP table gives age only as a bin string; exact age and
families need the restricted table (HCP restricted access).
"""

from __future__ import annotations

import csv
import fnmatch
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from brainage_hpc.data.ages import AGE_BINS, age_to_bin, sex_code

__all__ = [
    "T1W_RELPATH",
    "Cohort",
    "Failure",
    "HCPError",
    "SubjectRecord",
    "discover_subjects",
    "find_csv",
    "read_restricted",
    "read_unrestricted",
]

logger = logging.getLogger(__name__)

T1W_RELPATH = "T1w/T1w_acpc_dc_restore_brain.nii.gz"

# ----------------------------------------------------------------------------- discovery


class HCPError(ValueError):
    """A problem with ``--hcp-root`` or a demographics CSV, reported as one line."""


@dataclass(frozen=True)
class SubjectRecord:
    """One usable subject: where its T1w volume is and what we know about it.

    Args:
        id: HCP subject ID (the folder name), e.g. ``"100206"``.
        t1w: path of ``<root>/<id>/T1w/T1w_acpc_dc_restore_brain.nii.gz``.
        age: exact age in years from the restricted CSV, ``None`` when only the bin is known.
        age_bin: 4-class seed bin (0: 22-25, 1: 26-30, 2: 31-35, 3: 36+).
        sex: 0 F, 1 M.
        family_id: restricted ``Family_ID``, ``None`` when unknown.
    """

    id: str
    t1w: str
    age: float | None
    age_bin: int
    sex: int
    family_id: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (keys: id, t1w, age, age_bin, sex, family_id)."""
        return asdict(self)


@dataclass(frozen=True)
class Failure:
    """A subject that was skipped: one row of ``failures.csv``."""

    subject: str
    file: str
    reason: str


@dataclass
class Cohort:
    """Result of :func:`discover_subjects`.

    Attributes:
        root: the HCP root folder.
        records: usable subjects, sorted by ID.
        failures: subjects skipped because of the layout or the CSVs (sorted by ID).
        unrestricted: path of the unrestricted CSV used.
        restricted: path of the restricted CSV used, ``None`` without restricted access.
    """

    root: Path
    records: list[SubjectRecord]
    failures: list[Failure]
    unrestricted: Path
    restricted: Path | None
    n_csv_only: int = 0  # CSV rows without a subject folder (a partial download; not failures)


_CSV_PATTERNS = {"unrestricted": "unrestricted*.csv", "restricted": "restricted*.csv"}
_UNRESTRICTED_COLUMNS = ("Subject", "Gender", "Age")
_RESTRICTED_COLUMNS = ("Subject", "Age_in_Yrs", "Family_ID")


def find_csv(root: str | Path, kind: Literal["unrestricted", "restricted"]) -> Path | None:
    """Find ``unrestricted*.csv`` / ``restricted*.csv`` in ``root`` (case-insensitive).

    Matches both the synthetic names (``unrestricted.csv``) and HCP's download
    names (``unrestricted_<user>_<date>.csv``, ``RESTRICTED_<user>_<date>.csv``).

    Returns:
        The one matching file, or ``None`` when there is none.

    Raises:
        HCPError: several files match (pass the one to use explicitly).
    """
    if kind not in _CSV_PATTERNS:
        raise ValueError(f"kind must be 'unrestricted' or 'restricted', got {kind!r}")
    pattern = _CSV_PATTERNS[kind]
    hits = sorted(p for p in Path(root).iterdir() if p.is_file() and fnmatch.fnmatch(p.name.lower(), pattern))
    if len(hits) > 1:
        names = ", ".join(p.name for p in hits)
        raise HCPError(f"{root}: several {kind} CSVs ({names}); pass --{kind} PATH to choose one")
    return hits[0] if hits else None


def _read_csv(path: Path, required: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Read an HCP CSV into ``{subject: {column: value}}`` (first row wins on duplicates)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise HCPError(f"{path}: missing column(s) {', '.join(missing)}; found: {', '.join(header) or 'none'}")
            rows: dict[str, dict[str, str]] = {}
            for raw in reader:
                row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                subject = row.get("Subject", "")
                if not subject:
                    continue
                if subject in rows:
                    logger.warning("%s: subject %s listed twice; using the first row", path, subject)
                    continue
                rows[subject] = row
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise HCPError(f"{path}: cannot read CSV ({type(exc).__name__}: {exc})") from exc
    return rows


def read_unrestricted(path: str | Path) -> dict[str, dict[str, str]]:
    """Rows of the unrestricted CSV (columns Subject, Gender, Age) keyed by subject ID.

    Raises:
        HCPError: the file cannot be read or lacks a required column.
    """
    return _read_csv(Path(path), _UNRESTRICTED_COLUMNS)


def read_restricted(path: str | Path) -> dict[str, dict[str, str]]:
    """Rows of the restricted CSV (columns Subject, Age_in_Yrs, Family_ID) keyed by subject ID.

    Raises:
        HCPError: the file cannot be read or lacks a required column.
    """
    return _read_csv(Path(path), _RESTRICTED_COLUMNS)


def _parse_age(text: str) -> float | None:
    try:
        age = float(text)
    except ValueError:
        return None
    return age if math.isfinite(age) else None


def discover_subjects(
    root: str | Path, unrestricted: str | Path | None = None, restricted: str | Path | None = None
) -> Cohort:
    """List the subjects of an HCP S1200 download and join them with the CSVs.

    A folder of ``root`` is a subject when its name is in the unrestricted CSV
    or it has a ``T1w/`` folder. Subjects with a missing T1w file, no CSV row,
    an unknown age bin or an unknown Gender become :class:`Failure` rows;
    CSV rows without a folder are counted (``n_csv_only``) but not failures,
    since most downloads hold only part of the cohort.

    Args:
        root: folder holding ``<subject>/T1w/T1w_acpc_dc_restore_brain.nii.gz``.
        unrestricted: unrestricted CSV; found in ``root`` by :func:`find_csv` when ``None``.
        restricted: restricted CSV (exact age, Family_ID); looked up in ``root`` when
            ``None`` and optional.

    Returns:
        A :class:`Cohort` with records and failures sorted by subject ID.

    Raises:
        HCPError: ``root`` or a CSV is missing or unreadable.
    """
    root = Path(root)
    if not root.is_dir():
        raise HCPError(f"--hcp-root {root}: not a readable directory")
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise HCPError(f"--hcp-root {root}: cannot list ({exc.strerror or exc})") from exc
    u_path = Path(unrestricted) if unrestricted is not None else find_csv(root, "unrestricted")
    if u_path is None:
        raise HCPError(f"{root}: no unrestricted*.csv found; pass --unrestricted PATH (HCP 'Behavioral Data' CSV)")
    r_path = Path(restricted) if restricted is not None else find_csv(root, "restricted")
    u_rows = read_unrestricted(u_path)
    r_rows = read_restricted(r_path) if r_path is not None else {}

    records: list[SubjectRecord] = []
    failures: list[Failure] = []
    for folder in folders:
        subject = folder.name
        t1w = folder / T1W_RELPATH
        row = u_rows.get(subject)
        if row is None:
            if (folder / "T1w").is_dir():
                failures.append(Failure(subject, str(t1w), f"subject absent from {u_path.name}"))
            else:
                logger.debug("%s: not a subject folder (no T1w/ and not in %s)", folder, u_path.name)
            continue
        if not t1w.is_file():
            failures.append(Failure(subject, str(t1w), "T1w file missing"))
            continue
        bin_label = row.get("Age", "")
        if bin_label not in AGE_BINS:
            valid = ", ".join(AGE_BINS)
            failures.append(Failure(subject, str(u_path), f"unknown age bin '{bin_label}' (valid: {valid})"))
            continue
        try:
            sex = sex_code(row.get("Gender", ""))
        except ValueError as exc:
            failures.append(Failure(subject, str(u_path), str(exc)))
            continue
        r_row = r_rows.get(subject, {})
        age = _parse_age(r_row.get("Age_in_Yrs", "")) if r_row else None
        if r_row and age is None:
            logger.warning("%s: subject %s has no valid Age_in_Yrs; using the age bin only", r_path, subject)
        if age is not None and age_to_bin(age) != AGE_BINS[bin_label]:
            # one of the two tables is wrong, and we cannot tell which: never store either silently
            failures.append(
                Failure(
                    subject,
                    str(r_path),
                    f"restricted Age_in_Yrs {age:g} contradicts the unrestricted age bin {bin_label} "
                    f"({u_path.name}); fix one of the tables",
                )
            )
            continue
        family = r_row.get("Family_ID") or None
        records.append(SubjectRecord(subject, str(t1w), age, AGE_BINS[bin_label], sex, family))
    folder_names = {p.name for p in folders}
    n_csv_only = sum(1 for s in u_rows if s not in folder_names)
    return Cohort(root, records, failures, u_path, r_path, n_csv_only)
