"""Age bins and sex codes of the seed (HCP Young Adult), shared by ingestion, training and evaluation.

Seed bins: {22-25: 0, 26-30: 1, 31-35: 2, 36+: 3}; the 2-class task is <31 vs >=31.
"""

from __future__ import annotations

import math

__all__ = ["AGE_BINS", "AGE_BIN_RANGES", "age_bin_label", "age_to_bin", "bin_centre", "bin_to_class", "sex_code"]

# seed bins: {22-25:0, 26-30:1, 31-35:2, 36+:3}; 2-class task: <31 vs >=31
AGE_BINS: dict[str, int] = {"22-25": 0, "26-30": 1, "31-35": 2, "36+": 3}
AGE_BIN_RANGES: dict[int, tuple[float, float]] = {0: (22.0, 26.0), 1: (26.0, 31.0), 2: (31.0, 36.0), 3: (36.0, 38.0)}


def age_to_bin(age: float) -> int:
    """Exact age in years -> 4-class seed bin (ages below 22 go to bin 0)."""
    if math.isnan(age):
        raise ValueError("age is NaN")
    if age < 26:
        return 0
    if age < 31:
        return 1
    if age < 36:
        return 2
    return 3


def age_bin_label(bin_index: int) -> str:
    """4-class bin index -> HCP string ('22-25', ...)."""
    for label, idx in AGE_BINS.items():
        if idx == bin_index:
            return label
    raise ValueError(f"age bin {bin_index} is not one of {sorted(AGE_BINS.values())}")


def bin_to_class(bin4: int, n_classes: int) -> int:
    """Map a 4-class bin to the class of a 4- or 2-class task (2-class: <31 vs >=31)."""
    if n_classes == 4:
        return int(bin4)
    if n_classes == 2:
        return int(bin4 >= 2)
    raise ValueError(f"n_classes must be 2 or 4, got {n_classes}")


def bin_centre(bin4: int) -> float:
    """Centre of a 4-class bin in years (used when only the bin is known)."""
    lo, hi = AGE_BIN_RANGES[int(bin4)]
    return (lo + hi - 1) / 2.0


def sex_code(gender: str) -> int:
    """HCP 'Gender' column (M/F) -> 1 for M, 0 for F."""
    g = str(gender).strip().upper()
    if g in ("M", "MALE"):
        return 1
    if g in ("F", "FEMALE"):
        return 0
    raise ValueError(f"unknown Gender '{gender}' (expected M or F)")
