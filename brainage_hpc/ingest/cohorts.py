"""Cohort sources: one :class:`ScanRecord` per T1w scan from an HCP folder, a BIDS tree, a CSV table or plain files.

``read_cohort(spec)`` is the single entry point used by ``brainage preprocess``
(several cohorts merged into one shard set) and ``brainage predict``. Rows that
cannot be used (no age, unknown sex, a scan without a participants row...) come
back as :class:`~brainage_hpc.ingest.hcp.Failure` rows, never as exceptions; an
unusable *source* (a BIDS tree without ``participants.tsv``, a CSV without its
columns) raises :class:`CohortError`, one line.

BIDS is parsed by :mod:`brainage_hpc.ingest.bids` (a small tested parser, not
pybids: see that module for why).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from brainage_hpc.data.ages import sex_code
from brainage_hpc.ingest.hcp import Failure, HCPError

__all__ = [
    "COHORT_KINDS",
    "NIFTI_SUFFIXES",
    "CohortError",
    "CohortSpec",
    "Failure",
    "ScanRecord",
    "detect_kind",
    "label_issue",
    "parse_age",
    "parse_cohort_arg",
    "parse_sex",
    "read_cohort",
    "read_cohorts",
    "training_failure",
]

COHORT_KINDS = ("hcp", "bids", "csv", "files")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CohortError(HCPError):
    """A cohort source that cannot be read at all (reported as one line, exit 2)."""


@dataclass(frozen=True)
class ScanRecord:
    """One T1w scan and what is known about its subject.

    Args:
        subject: subject ID within the cohort (BIDS: the ``participant_id``, ``sub-01``; HCP: the folder name).
        session: session label (BIDS ``ses-<s>`` without the prefix) or ``None``.
        path: the NIfTI file.
        age: age in years at this scan, ``None`` when unknown (HCP without restricted data).
        sex: 0 F, 1 M, ``None`` when unknown.
        site: acquisition site or scanner (defaults to the cohort name).
        cohort: cohort name (unique among the cohorts of one run).
        group: split group: no group is split across train/val/test (HCP family or subject).
        run: BIDS run label (``run-<r>`` without the prefix) or ``None``.
        entities: BIDS entities between session and suffix (``acq-mprage_run-2``), part of the scan ID.
        age_bin: 4-class seed bin when only the bin is known (HCP unrestricted), else ``None``.
        family_id: HCP restricted ``Family_ID`` (kept for HCP manifests), else ``None``.
        issue: why the age or sex given for this scan is unusable (e.g. ``age '89+' ...``), else ``None``.
    """

    subject: str
    session: str | None
    path: str
    age: float | None
    sex: int | None
    site: str
    cohort: str
    group: str
    run: str | None = None
    entities: str | None = None
    age_bin: int | None = None
    family_id: str | None = None
    issue: str | None = None

    @property
    def scan_id(self) -> str:
        """ID of the scan within its cohort: the subject, plus ``_ses-<s>`` and the entities (or ``_run-<r>``)."""
        parts = [self.subject]
        if self.session:
            parts.append(f"ses-{self.session}")
        if self.entities:
            parts.append(self.entities)
        elif self.run:
            parts.append(f"run-{self.run}")
        return "_".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields."""
        return asdict(self)


@dataclass(frozen=True)
class CohortSpec:
    """Where a cohort comes from.

    Args:
        kind: ``"hcp"``, ``"bids"``, ``"csv"`` or ``"files"`` (NIfTI files/folders, no ages).
        path: HCP root, BIDS root, CSV/TSV table, or a file/folder (``files``).
        name: cohort name stored with every subject; default from the kind and path.
        site: site for rows without one; default: the cohort name.
        unrestricted, restricted: HCP CSVs (default: found in the root).
    """

    kind: Literal["hcp", "bids", "csv", "files"]
    path: str
    name: str | None = None
    site: str | None = None
    unrestricted: str | None = None
    restricted: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in COHORT_KINDS:
            raise CohortError(f"cohort kind {self.kind!r} is not valid. Valid: {', '.join(COHORT_KINDS)}")
        if self.name is not None and not _NAME_RE.match(self.name):
            raise CohortError(f"cohort name {self.name!r}: use letters, digits, '.', '_' or '-'")

    @property
    def cohort_name(self) -> str:
        """The name given, or ``hcp`` / the BIDS folder name / the CSV file stem / ``files``."""
        if self.name:
            return self.name
        if self.kind == "hcp":
            return "hcp"
        if self.kind == "files":
            return "files"
        p = Path(self.path)
        stem = p.name.split(".")[0] if self.kind == "csv" else p.resolve().name
        cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-")
        return cleaned or self.kind


# ----------------------------------------------------------------------------- values


def parse_age(text: Any) -> float | None:
    """Age in years from a table cell; ``None`` for ``n/a``, empty, non-numeric, negative or non-finite."""
    if text is None:
        return None
    s = str(text).strip()
    if s.lower() in ("", "n/a", "na", "nan", "none"):
        return None
    try:
        age = float(s)
    except ValueError:
        return None
    return age if math.isfinite(age) and 0 <= age < 130 else None


def parse_sex(text: Any) -> int | None:
    """0 F / 1 M from ``M``, ``F``, ``male``, ``female`` (any case); ``None`` for anything else."""
    try:
        return sex_code(str(text))
    except ValueError:
        return None


# ----------------------------------------------------------------------------- specs


def detect_kind(path: str | Path) -> Literal["hcp", "bids", "csv", "files"]:
    """Guess the kind of a cohort path.

    A ``.csv``/``.tsv`` file is a table; a folder with ``participants.tsv``,
    ``dataset_description.json`` or ``sub-*`` *folders* is BIDS (a flat folder of
    ``sub-01_T1w.nii.gz`` files is not: it has no ``anat/``); a folder with an
    ``unrestricted*.csv`` is HCP; any other NIfTI file or folder is ``files``.

    Raises:
        CohortError: the path does not exist.
    """
    p = Path(path)
    if p.is_file():
        return "csv" if p.suffix.lower() in (".csv", ".tsv") else "files"
    if not p.is_dir():
        raise CohortError(f"cohort {path}: no such file or folder")
    try:
        children = list(p.iterdir())
    except OSError as exc:
        raise CohortError(f"cohort {path}: cannot list ({exc.strerror or exc})") from exc
    names = [c.name for c in children]
    sub_dirs = any(c.name.startswith("sub-") and c.is_dir() for c in children)
    if "participants.tsv" in names or "dataset_description.json" in names or sub_dirs:
        return "bids"
    if any(n.lower().startswith("unrestricted") and n.lower().endswith(".csv") for n in names):
        return "hcp"
    return "files"


def parse_cohort_arg(text: str) -> CohortSpec:
    """Parse ``[NAME=][KIND:]PATH`` as given to ``--cohort``.

    Examples:
        >>> parse_cohort_arg("ixi=bids:/data/IXI")
        CohortSpec(kind='bids', path='/data/IXI', name='ixi', site=None, unrestricted=None, restricted=None)
        >>> parse_cohort_arg("csv:table.csv").kind
        'csv'

    Raises:
        CohortError: unknown kind, bad name, or (without a kind) a path that does not exist.
    """
    name: str | None = None
    rest = text
    head, sep, tail = text.partition("=")
    if sep and "/" not in head and ":" not in head:
        name, rest = head, tail
    kind, sep, path = rest.partition(":")
    if sep and kind in COHORT_KINDS:
        return CohortSpec(kind=kind, path=path, name=name)  # type: ignore[arg-type]  # checked just above
    if sep and "/" not in kind and len(kind) > 1:
        raise CohortError(f"--cohort {text}: unknown kind {kind!r}. Valid: {', '.join(COHORT_KINDS)}")
    return CohortSpec(kind=detect_kind(rest), path=rest, name=name)


# ----------------------------------------------------------------------------- readers


def _read_hcp(spec: CohortSpec) -> tuple[list[ScanRecord], list[Failure]]:
    from brainage_hpc.ingest.hcp import discover_subjects

    cohort = discover_subjects(spec.path, spec.unrestricted, spec.restricted)
    name = spec.cohort_name
    site = spec.site or name
    records = [
        ScanRecord(
            subject=r.id,
            session=None,
            path=r.t1w,
            age=r.age,
            sex=r.sex,
            site=site,
            cohort=name,
            group=f"{name}/family:{r.family_id}" if r.family_id else f"{name}/subject:{r.id}",
            age_bin=r.age_bin,
            family_id=r.family_id,
        )
        for r in cohort.records
    ]
    return records, list(cohort.failures)


def _table_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV or TSV file (delimiter from the suffix), keys stripped and lower-cased."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
            rows = [
                {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
                for raw in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CohortError(f"{path}: cannot read table ({type(exc).__name__}: {exc})") from exc
    return header, rows


_CSV_REQUIRED = ("subject", "path", "age", "sex")


def _read_csv_table(spec: CohortSpec) -> tuple[list[ScanRecord], list[Failure]]:
    path = Path(spec.path)
    if not path.is_file():
        raise CohortError(f"cohort table {path}: no such file")
    header, rows = _table_rows(path)
    missing = [c for c in _CSV_REQUIRED if c not in header]
    if missing:
        raise CohortError(
            f"{path}: missing column(s) {', '.join(missing)}; need subject, path, age, sex "
            f"(optional: site, session, group); found: {', '.join(header) or 'none'}"
        )
    name = spec.cohort_name
    records: list[ScanRecord] = []
    failures: list[Failure] = []
    for line, row in enumerate(rows, start=2):
        subject = row.get("subject", "")
        if not subject:
            failures.append(Failure(f"<line {line}>", str(path), "empty subject"))
            continue
        scan = Path(row.get("path", ""))
        if not row.get("path"):
            failures.append(Failure(subject, str(path), f"line {line}: empty path"))
            continue
        scan = scan if scan.is_absolute() else path.parent / scan
        records.append(
            ScanRecord(
                subject=subject,
                session=row.get("session") or None,
                path=str(scan),
                age=parse_age(row.get("age")),
                sex=parse_sex(row.get("sex")),
                site=row.get("site") or spec.site or name,
                cohort=name,
                group=f"{name}/group:{row['group']}" if row.get("group") else f"{name}/subject:{subject}",
                issue=label_issue(row.get("age"), row.get("sex")),
            )
        )
    return records, failures


_NA = ("", "n/a", "na", "nan", "none")


def label_issue(age_text: Any, sex_text: Any) -> str | None:
    """Describe an age or sex cell that is present but unusable (``'89+'``, ``'X'``); ``None`` otherwise."""
    a, s = str(age_text or "").strip(), str(sex_text or "").strip()
    if a.lower() not in _NA and parse_age(a) is None:
        return f"age {a!r} is not a number of years in [0, 130)"
    if s.lower() not in _NA and parse_sex(s) is None:
        return f"sex {s!r} is not M/F/male/female"
    return None


def _find_nifti(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.is_file() and q.name.lower().endswith(NIFTI_SUFFIXES))
        elif p.is_file():
            found.append(p)
        else:
            raise CohortError(f"{p}: no such file or folder")
    return found


def _read_files(spec: CohortSpec) -> tuple[list[ScanRecord], list[Failure]]:
    name = spec.cohort_name
    records = []
    for p in _find_nifti([Path(spec.path)]):
        subject = p.name[: -len(".nii.gz")] if p.name.lower().endswith(".nii.gz") else p.stem
        records.append(
            ScanRecord(subject=subject, session=None, path=str(p), age=None, sex=None,
                       site=spec.site or name, cohort=name, group=f"{name}/file:{p}")
        )
    return records, []


def read_cohort(spec: CohortSpec | str | Path) -> tuple[list[ScanRecord], list[Failure]]:
    """Every T1w scan of one cohort, with the rows that could not be used.

    Rows with an unknown age or sex are *returned* as records (``predict`` needs
    no age); :func:`training_failure` says which of them ``preprocess`` must turn into failure rows.

    Args:
        spec: a :class:`CohortSpec`, or a path / ``[NAME=][KIND:]PATH`` string.

    Returns:
        (records sorted by scan ID, failures sorted by subject).

    Raises:
        CohortError: the source itself cannot be read (missing folder, a BIDS tree
            without ``participants.tsv``, a CSV without the required columns...).
    """
    if not isinstance(spec, CohortSpec):
        spec = parse_cohort_arg(str(spec))
    if spec.kind == "hcp":
        records, failures = _read_hcp(spec)
    elif spec.kind == "bids":
        from brainage_hpc.ingest.bids import read_bids

        records, failures = read_bids(spec)
    elif spec.kind == "csv":
        records, failures = _read_csv_table(spec)
    else:
        records, failures = _read_files(spec)
    seen: dict[str, ScanRecord] = {}
    unique = []
    for r in sorted(records, key=lambda r: (r.scan_id, r.path)):
        if r.scan_id in seen:
            failures.append(Failure(r.scan_id, r.path, f"duplicate scan ID (also {seen[r.scan_id].path})"))
            continue
        seen[r.scan_id] = r
        unique.append(r)
    return unique, sorted(failures, key=lambda f: (f.subject, f.file))


def training_failure(rec: ScanRecord) -> str | None:
    """Why a record cannot be a training subject (no age, unknown sex), or ``None`` when it can."""
    if rec.issue:
        return rec.issue
    if rec.age is None and rec.age_bin is None:
        return "age is n/a or missing"
    if rec.sex is None:
        return "sex is n/a or missing (models take sex as an input)"
    return None


def read_cohorts(specs: list[CohortSpec]) -> tuple[list[tuple[str, ScanRecord]], list[Failure]]:
    """Read and merge several cohorts for training.

    With one cohort, scan IDs are kept (``100206``, ``sub-01_ses-1``); with several,
    each is prefixed with its cohort name (``ixi_sub-01``) so IDs never collide.
    Records without an age or sex become failure rows.

    Returns:
        ([(unique ID, record)] sorted by ID, failures).

    Raises:
        CohortError: a source cannot be read, or two cohorts share a name.
    """
    names = [s.cohort_name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CohortError(
            f"two cohorts are both named {dup[0]!r}; name them with --cohort NAME=KIND:PATH (e.g. site1=bids:/data/a)"
        )
    prefix = len(specs) > 1
    out: list[tuple[str, ScanRecord]] = []
    failures: list[Failure] = []
    for spec in specs:
        records, fails = read_cohort(spec)
        failures += [replace(f, subject=f"{spec.cohort_name}_{f.subject}") if prefix else f for f in fails]
        for r in records:
            sid = f"{r.cohort}_{r.scan_id}" if prefix else r.scan_id
            reason = training_failure(r)
            if reason:
                failures.append(Failure(sid, r.path, reason))
            else:
                out.append((sid, r))
    out.sort(key=lambda t: t[0])
    return out, failures
