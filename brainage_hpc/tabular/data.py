"""Load a FreeSurfer table, join it with ages, and split it like the shards.

The table follows HCP's ``hcp_freesurfer`` CSV layout: a ``Subject`` column plus
one numeric column per regional measure (the synthetic cohort writes
``freesurfer.csv`` in the same layout). What happens to imperfect input:

* **Text/ID columns.** A column in which *no* non-empty value reads as a number
  (for example ``Release`` = ``S1200``), or whose name marks an identifier
  (``*_ID``, ``ID``), is dropped with a warning. A column in which *some* values
  read as numbers and others do not is an error naming the file, the column and
  the first bad value: that is a corrupted measure, not a text column.
* **Label columns.** Columns named like the target (``Age``, ``Age_in_Yrs``,
  ``age_bin``, ``age``) are dropped with a warning, so the age cannot leak into
  the features.
* **Missing values.** Empty/``NA`` cells stay NaN here and are imputed later by
  the model pipeline with the feature's *median over the training split*
  (``SimpleImputer(strategy="median")``, see :mod:`brainage_hpc.tabular.models`).
  ``inf`` is treated as missing. A column that is empty for every subject is dropped.
* **Subjects.** Subjects present in the labels but not in the table (or the
  reverse) are dropped with a warning giving their count and the first few IDs.

Every drop is logged and also returned as a note for ``report.md``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from brainage_hpc.data.ages import AGE_BINS, age_to_bin, bin_to_class, sex_code
from brainage_hpc.ingest.hcp import HCPError, find_csv

__all__ = [
    "LABEL_COLUMNS",
    "SPLIT_NAMES",
    "TabularData",
    "TabularDataError",
    "TaskName",
    "join_labels",
    "read_feature_table",
    "read_labels",
    "task_targets",
]

log = logging.getLogger(__name__)

TaskName = Literal["classify4", "classify2", "regress"]
SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
# feature-table columns that would leak the target (compared case-insensitively)
LABEL_COLUMNS: frozenset[str] = frozenset({"age", "age_in_yrs", "age_bin", "age_years"})
_ID_COLUMN = re.compile(r"(^|_)id$", re.IGNORECASE)
_FLOAT_ID = re.compile(r"^(\d+)\.0+$")


class TabularDataError(ValueError):
    """Bad tabular input, reported as one line naming the file and the problem."""


@dataclass
class TabularData:
    """Features and labels of the subjects kept after the join.

    Attributes:
        features: (N, F) float64 frame, index = subject ID (str), NaN = missing (imputed later).
        labels: (N, 4) frame on the same index: ``age`` (years, NaN if unknown), ``age_bin``
            (int, 4-class seed bin), ``sex`` (0 F, 1 M, NaN if unknown), ``family_id`` (str or None).
        notes: human-readable record of every column/subject dropped and of the missing values.
    """

    features: pd.DataFrame
    labels: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def add_note(notes: list[str], message: str) -> None:
    log.warning(message)
    notes.append(message)


def preview_ids(items: list[str], k: int = 5) -> str:
    head = ", ".join(items[:k])
    return head + (f", ... (+{len(items) - k})" if len(items) > k else "")


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return pd.read_csv(path, dtype=str, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TabularDataError(f"{path}: not a readable CSV ({first})") from None


def _subject_column(df: pd.DataFrame, path: Path) -> str:
    for col in df.columns:
        if str(col).strip().lower() == "subject":
            return str(col)
    raise TabularDataError(f"{path}: no 'Subject' column (columns: {preview_ids([str(c) for c in df.columns])})")


def normalise_subject_id(value: object) -> str:
    """Subject ID as text; ``100206.0`` (an ID that went through a float column) -> ``100206``."""
    return _FLOAT_ID.sub(r"\1", str(value).strip())


def _index_by_subject(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    col = _subject_column(df, path)
    subjects = df[col].astype("string").str.strip().str.replace(_FLOAT_ID, r"\1", regex=True)
    if subjects.isna().any() or (subjects == "").any():
        row = int(np.flatnonzero((subjects.isna() | (subjects == "")).to_numpy())[0]) + 2
        raise TabularDataError(f"{path}: empty Subject on line {row}")
    dup = subjects[subjects.duplicated()]
    if len(dup):
        raise TabularDataError(f"{path}: subject {dup.iloc[0]} appears more than once ({len(dup)} duplicate rows)")
    out = df.drop(columns=[col])
    out.index = pd.Index(subjects.astype(str).tolist(), name="Subject")
    return out


def read_feature_table(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Read a FreeSurfer-style table: ``Subject`` + numeric regional measures.

    Args:
        path: CSV file.

    Returns:
        ``(features, notes)``: (N, F) float64 frame indexed by subject ID (str), NaN for
        missing cells; notes list each dropped column and the count of missing cells.

    Raises:
        FileNotFoundError: the file does not exist.
        TabularDataError: unreadable CSV, no ``Subject`` column, duplicate subjects, a partly
            non-numeric column, or no numeric feature left.
    """
    path = Path(path)
    df = _index_by_subject(_read_csv(path), path)
    if len(df) == 0:
        raise TabularDataError(f"{path}: no subject rows")
    notes: list[str] = []
    keep: dict[str, pd.Series] = {}
    text_cols, id_cols, label_cols, empty_cols = [], [], [], []
    for col in df.columns:
        name = str(col)
        raw = df[col]
        if name.strip().lower() in LABEL_COLUMNS:
            label_cols.append(name)
            continue
        if _ID_COLUMN.search(name.strip()):
            id_cols.append(name)
            continue
        present = raw.notna()
        values = pd.to_numeric(raw, errors="coerce")
        bad = present & values.isna()
        if present.any() and bad[present].all():
            text_cols.append(name)
            continue
        if bad.any():
            subject = str(bad[bad].index[0])
            raise TabularDataError(
                f"{path}: column '{name}' is not numeric: {int(bad.sum())} of {len(raw)} values are not numbers "
                f"(first: '{raw[subject]}' for subject {subject}); fix them or leave the cells empty to impute"
            )
        if not present.any():
            empty_cols.append(name)
            continue
        keep[name] = values.astype(float)
    for cols, why in (
        (label_cols, "looks like the age label (would leak the target)"),
        (id_cols, "looks like an identifier"),
        (text_cols, "holds only text"),
        (empty_cols, "is empty for every subject"),
    ):
        if cols:
            add_note(notes, f"{path.name}: dropped {len(cols)} column(s) that {why}: {preview_ids(cols)}")
    if not keep:
        raise TabularDataError(f"{path}: no numeric feature columns (besides Subject)")
    features = pd.DataFrame(keep, index=df.index)
    arr = features.to_numpy()
    n_inf = int(np.isinf(arr).sum())
    if n_inf:
        features = features.replace([np.inf, -np.inf], np.nan)
        add_note(notes, f"{path.name}: {n_inf} infinite value(s) treated as missing")
    n_nan = int(features.isna().to_numpy().sum())
    if n_nan:
        cols = [str(c) for c in features.columns[features.isna().any()]]
        add_note(
            notes,
            f"{path.name}: {n_nan} missing value(s) in {len(cols)} column(s) ({preview_ids(cols)}), "
            "imputed with the training-split median",
        )
    return features, notes


def _bins_from_strings(values: pd.Series, path: Path, column: str) -> pd.Series:
    def one(v: object) -> float:
        if pd.isna(v):
            return np.nan
        key = str(v).strip()
        if key not in AGE_BINS:
            raise TabularDataError(f"{path}: column '{column}' has age bin '{key}', expected one of {list(AGE_BINS)}")
        return float(AGE_BINS[key])

    return values.map(one)


def _sex_codes(values: pd.Series, path: Path, column: str) -> pd.Series:
    def one(v: object) -> float:
        if pd.isna(v):
            return np.nan
        s = str(v).strip()
        if s in ("0", "1"):
            return float(s)
        try:
            return float(sex_code(s))
        except ValueError:
            raise TabularDataError(f"{path}: column '{column}' has sex '{s}', expected M/F or 1/0") from None

    return values.map(one)


def _numeric(values: pd.Series, path: Path, column: str) -> pd.Series:
    out = pd.to_numeric(values, errors="coerce")
    bad = values.notna() & out.isna()
    if bad.any():
        subject = str(bad[bad].index[0])
        raise TabularDataError(
            f"{path}: column '{column}' has non-numeric value '{values[subject]}' (subject {subject})"
        )
    return out.astype(float)


def _pick(df: pd.DataFrame, *names: str) -> str | None:
    lower = {str(c).strip().lower(): str(c) for c in df.columns}
    for name in names:
        if name.lower() in lower:
            return lower[name.lower()]
    return None


def _labels_frame(frames: list[tuple[pd.DataFrame, Path]]) -> pd.DataFrame:
    """Merge label sources into ``age, age_bin, sex, family_id`` (outer join on Subject)."""
    cols: dict[str, pd.Series] = {}
    for df, path in frames:
        age_col = _pick(df, "Age_in_Yrs", "age_years")
        bin_col = _pick(df, "age_bin")
        age_or_bin = _pick(df, "Age")
        sex_col = _pick(df, "Gender", "sex")
        fam_col = _pick(df, "Family_ID", "family_id")
        if age_col:
            cols["age"] = _numeric(df[age_col], path, age_col)
        if bin_col:
            cols["age_bin"] = _numeric(df[bin_col], path, bin_col)
        if age_or_bin:  # HCP unrestricted: bin strings; a labels CSV may hold exact ages
            raw = df[age_or_bin]
            as_num = pd.to_numeric(raw, errors="coerce")
            if raw.notna().any() and as_num[raw.notna()].notna().all():
                cols.setdefault("age", as_num.astype(float))
            else:
                cols.setdefault("age_bin", _bins_from_strings(raw, path, age_or_bin))
        if sex_col:
            cols["sex"] = _sex_codes(df[sex_col], path, sex_col)
        if fam_col:
            cols["family_id"] = df[fam_col].astype("string").str.strip()
    index = pd.Index(sorted(set().union(*(set(df.index) for df, _ in frames))), name="Subject")
    out = pd.DataFrame(index=index)
    for name in ("age", "age_bin", "sex"):
        out[name] = cols[name].reindex(index).astype(float) if name in cols else np.nan
    out["family_id"] = cols["family_id"].reindex(index).astype(object) if "family_id" in cols else None
    out["family_id"] = out["family_id"].where(out["family_id"].notna(), None)
    return out


def read_labels(
    hcp_root: str | Path | None = None, labels_csv: str | Path | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """Ages, age bins, sex and families per subject, from HCP CSVs or one labels CSV.

    ``hcp_root`` holds ``unrestricted*.csv`` (``Subject, Gender, Age`` with Age a bin string)
    and optionally ``restricted*.csv`` (``Subject, Age_in_Yrs, Family_ID``; needed for exact
    ages and family-aware splits). ``labels_csv`` has ``Subject`` and any of ``Age_in_Yrs``
    (or ``age_years``) for exact ages, ``Age`` (bin strings like ``26-30`` or exact ages),
    ``age_bin`` (0..3), ``Gender``/``sex`` (M/F or 1/0) and ``Family_ID``.
    The 4-class bin comes from the bin column when there is one (the seed's labels),
    else from the exact age.

    Returns:
        ``(labels, notes)``: frame indexed by subject with ``age`` (float years, NaN when
        unknown), ``age_bin`` (int), ``sex`` (float 0/1/NaN), ``family_id`` (str or None).

    Raises:
        FileNotFoundError: missing folder or files.
        TabularDataError: neither or both sources given, unreadable values, or no age information.
    """
    if (hcp_root is None) == (labels_csv is None):
        raise TabularDataError("give exactly one label source: --hcp-root DIR or --labels CSV")
    frames: list[tuple[pd.DataFrame, Path]] = []
    if hcp_root is not None:
        root = Path(hcp_root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: --hcp-root is not a folder")
        try:
            unres, res = find_csv(root, "unrestricted"), find_csv(root, "restricted")
        except HCPError as exc:
            raise TabularDataError(str(exc)) from None
        if unres is None:
            raise FileNotFoundError(f"{root}: no unrestricted*.csv (HCP behavioral data: Subject, Gender, Age)")
        for p in (unres, res):
            if p is not None:
                frames.append((_index_by_subject(_read_csv(p), p), p))
        source = str(root)
    else:
        p = Path(labels_csv)  # type: ignore[arg-type]
        frames.append((_index_by_subject(_read_csv(p), p), p))
        source = str(p)
    labels = _labels_frame(frames)
    notes: list[str] = []
    if labels["age"].isna().all() and labels["age_bin"].isna().all():
        raise TabularDataError(f"{source}: no age column (need Age_in_Yrs, Age or age_bin)")
    derived = labels["age"].map(lambda a: float(age_to_bin(a)) if pd.notna(a) else np.nan)
    both = labels["age_bin"].notna() & derived.notna()
    n_disagree = int((labels.loc[both, "age_bin"] != derived[both]).sum())
    if n_disagree:
        add_note(notes, f"{source}: {n_disagree} subject(s) whose exact age falls outside their age bin; the bin is used")
    labels["age_bin"] = labels["age_bin"].fillna(derived)
    unknown = labels.index[labels["age_bin"].isna()].tolist()
    if unknown:
        add_note(notes, f"{source}: dropped {len(unknown)} subject(s) without any age: {preview_ids(unknown)}")
        labels = labels.drop(index=unknown)
    bad = labels["age_bin"][~labels["age_bin"].isin(list(AGE_BINS.values()))]
    if len(bad):
        raise TabularDataError(f"{source}: age_bin {bad.iloc[0]} for subject {bad.index[0]} is not in 0..3")
    labels["age_bin"] = labels["age_bin"].astype(int)
    return labels, notes


def join_labels(features: pd.DataFrame, labels: pd.DataFrame, task: TaskName, table_name: str = "table") -> TabularData:
    """Keep the subjects that have both features and the labels the task needs.

    Args:
        features: output of :func:`read_feature_table`.
        labels: output of :func:`read_labels`.
        task: ``classify4``, ``classify2`` or ``regress`` (needs exact ages).
        table_name: file name used in messages.

    Raises:
        TabularDataError: no subject in common, or ``regress`` without exact ages.
    """
    notes: list[str] = []
    missing = [s for s in labels.index if s not in features.index]
    if missing:
        add_note(notes, f"{len(missing)} labelled subject(s) missing from {table_name}, dropped: {preview_ids(missing)}")
    unlabelled = [s for s in features.index if s not in labels.index]
    if unlabelled:
        add_note(notes, f"{len(unlabelled)} subject(s) of {table_name} have no labels, dropped: {preview_ids(unlabelled)}")
    common = [s for s in features.index if s in labels.index]
    if not common:
        raise TabularDataError(
            f"{table_name}: no subject in common with the labels (table: {preview_ids(list(features.index), 3)}; "
            f"labels: {preview_ids(list(labels.index), 3)})"
        )
    lab = labels.loc[common]
    if task == "regress":
        no_age = lab.index[lab["age"].isna()].tolist()
        if len(no_age) == len(lab):
            raise TabularDataError(
                "--task regress needs exact ages (Age_in_Yrs in the restricted CSV or the labels CSV); "
                "only age bins found"
            )
        if no_age:
            add_note(notes, f"{len(no_age)} subject(s) without an exact age dropped for regression: {preview_ids(no_age)}")
            lab = lab.drop(index=no_age)
    return TabularData(features=features.loc[lab.index], labels=lab, notes=notes)


def task_targets(labels: pd.DataFrame, task: TaskName) -> np.ndarray:
    """Target vector, shape (N,): class index (int64) or age in years (float64)."""
    if task == "regress":
        return labels["age"].to_numpy(dtype=float)
    n = {"classify4": 4, "classify2": 2}.get(task)
    if n is None:
        raise TabularDataError(f"unknown task '{task}' (valid: classify4, classify2, regress)")
    return np.array([bin_to_class(int(b), n) for b in labels["age_bin"]], dtype=np.int64)
