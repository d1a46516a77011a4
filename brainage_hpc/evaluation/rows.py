"""The one place that turns a scan and its stored record into a row of the output CSV.

A record's ``pred`` holds whatever inference produced for the scan: ``pred_age``,
``bin4_pred``, ``class2_pred``, ``probs`` today; any further key (an interval bound,
an OOD score, a bias-corrected age) becomes a column of its own, after the known ones
and before ``warnings`` and ``error``, so new per-scan outputs need no change here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from brainage_hpc.evaluation.scans import ScanRecord

__all__ = ["BASE_COLUMNS", "TAIL_COLUMNS", "build_row", "output_columns"]

BASE_COLUMNS: tuple[str, ...] = (
    "file", "subject", "session", "site", "cohort", "group", "age", "sex",
    "pred_age", "brain_age_gap", "age_bin_pred", "class2_pred",
)
TAIL_COLUMNS: tuple[str, ...] = ("warnings", "error")
_KNOWN_PRED = {"pred_age", "bin4_pred", "class2_pred", "probs"}
_SEX_TEXT = {0: "F", 1: "M"}


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def build_row(scan: ScanRecord | None, source: str, record: dict[str, Any] | None, error: str | None = None) -> dict[str, Any]:
    """One output row.

    Args:
        scan: the planned scan (None for an input that never became a scan).
        source: the file or input as the user named it.
        record: the stored ``scan`` record (``pred``, ``warnings``, ``error``), or None when not scored.
        error: an error to report instead of the record's (e.g. "not scored: part ... missing").

    Returns:
        ``{column: value}``; None for unknown cells. Probabilities are ``prob_0``, ``prob_1``, ...
    """
    pred = dict((record or {}).get("pred") or {})
    age = scan.age if scan else None
    pred_age = _finite(pred.get("pred_age"))
    bin4 = pred.get("bin4_pred")
    row: dict[str, Any] = {
        "file": source,
        "subject": scan.subject if scan else "",
        "session": (scan.session or "") if scan else "",
        "site": scan.site if scan else "",
        "cohort": scan.cohort if scan else "",
        "group": scan.group if scan else "",
        "age": age,
        "sex": _SEX_TEXT.get(scan.sex, "") if scan and scan.sex is not None else "",
        "pred_age": pred_age,
        "brain_age_gap": pred_age - age if pred_age is not None and age is not None else None,
        "age_bin_pred": bin4 if bin4 is None or bin4 >= 0 else None,
        "class2_pred": pred.get("class2_pred"),
    }
    for i, p in enumerate(pred.get("probs") or []):
        row[f"prob_{i}"] = p
    for key, value in pred.items():
        if key not in _KNOWN_PRED:
            row[key] = _finite(value)
    row["warnings"] = "; ".join((record or {}).get("warnings") or [])
    row["error"] = error if error is not None else (record or {}).get("error")
    return row


def output_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Column order: the base columns, ``prob_*`` by index, extra prediction keys (first seen), warnings, error."""
    n_probs = max((sum(1 for k in r if k.startswith("prob_")) for r in rows), default=0)
    extra: list[str] = []
    fixed = set(BASE_COLUMNS) | set(TAIL_COLUMNS)
    for r in rows:
        for k in r:
            if k not in fixed and not k.startswith("prob_") and k not in extra:
                extra.append(k)
    return [*BASE_COLUMNS, *(f"prob_{i}" for i in range(n_probs)), *extra, *TAIL_COLUMNS]
