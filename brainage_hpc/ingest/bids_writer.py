"""Write scans as a BIDS tree: ``participants.tsv``, ``sessions.tsv`` and ``anat/*_T1w.nii.gz``.

Used to turn synthetic cohorts (skull-stripped HCP layout or raw heads) into the
BIDS layout that OpenNeuro-style cohorts have, so CI exercises the BIDS reader on
real NIfTI files. Files are written to a temp name and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BidsScan", "pair_sessions", "write_bids"]


@dataclass(frozen=True)
class BidsScan:
    """One T1w scan to place in the tree.

    Args:
        participant: label without ``sub-`` (letters and digits only).
        session: label without ``ses-``, or ``None`` for a session-less dataset.
        source: the NIfTI file to copy.
        age: age in years at this scan, ``None`` for ``n/a``.
        sex: ``"M"``/``"F"`` or ``None`` for ``n/a``.
        site: site label stored in ``participants.tsv``.
    """

    participant: str
    session: str | None
    source: str
    age: float | None
    sex: str | None
    site: str


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return repr(round(value, 4))
    return str(value)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_bids(out: str | Path, scans: Sequence[BidsScan], name: str = "synthetic", move: bool = False) -> Path:
    """Write ``scans`` as a BIDS dataset in ``out`` and return ``out``.

    ``participants.tsv`` gets one row per participant (age of the first session,
    sex, site); participants with sessions also get ``sub-<p>/sub-<p>_sessions.tsv``
    with the age at every session, as longitudinal BIDS datasets do.

    With ``move``, the source files are renamed into the tree instead of copied
    (they must be on the same file system).

    Raises:
        ValueError: a participant has two sexes or sites, or a scan appears twice.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_part: dict[str, list[BidsScan]] = defaultdict(list)
    for s in scans:
        by_part[s.participant].append(s)
    rows = ["participant_id\tage\tsex\tsite"]
    for part in sorted(by_part):
        ss = sorted(by_part[part], key=lambda s: s.session or "")
        if len({s.sex for s in ss}) > 1 or len({s.site for s in ss}) > 1:
            raise ValueError(f"participant {part}: scans disagree on sex or site")
        if len({s.session for s in ss}) != len(ss):
            raise ValueError(f"participant {part}: two scans in one session")
        for s in ss:
            stem = f"sub-{part}" + (f"_ses-{s.session}" if s.session else "")
            anat = out / f"sub-{part}" / (f"ses-{s.session}" if s.session else "") / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            suffix = ".nii.gz" if s.source.endswith(".gz") else ".nii"
            target = anat / f"{stem}_T1w{suffix}"
            if move:
                os.replace(s.source, target)
            else:
                tmp = target.with_name(f".{target.name}.tmp")
                shutil.copyfile(s.source, tmp)
                os.replace(tmp, target)
        if ss[0].session is not None:
            lines = ["session_id\tage"] + [f"ses-{s.session}\t{_fmt(s.age)}" for s in ss]
            _write_text(out / f"sub-{part}" / f"sub-{part}_sessions.tsv", "\n".join(lines) + "\n")
        rows.append(f"sub-{part}\t{_fmt(ss[0].age)}\t{_fmt(ss[0].sex)}\t{ss[0].site}")
    _write_text(out / "participants.tsv", "\n".join(rows) + "\n")
    description = {"Name": name, "BIDSVersion": "1.9.0", "DatasetType": "raw", "GeneratedBy": [{"Name": "brainage-hpc"}]}
    _write_text(out / "dataset_description.json", json.dumps(description, indent=1) + "\n")
    return out


def pair_sessions(
    items: Sequence[tuple[str, str, float, str]], sites: Sequence[str] = ("siteA", "siteB"), sessions: int = 2
) -> list[BidsScan]:
    """Group synthetic subjects of the same sex into participants with ``sessions`` sessions each.

    Args:
        items: ``(scan id, NIfTI path, age, sex)``; the scans of one participant are
            ordered by age, so ``ses-1`` is the youngest (leftovers get fewer sessions).
        sites: sites assigned to participants in turn.
        sessions: sessions per participant.

    Returns:
        BidsScan rows; participant labels ``p01``, ``p02``... (BIDS labels are alphanumeric).
    """
    out: list[BidsScan] = []
    k = 0
    for sex in sorted({it[3] for it in items}):
        same = [it for it in items if it[3] == sex]
        for start in range(0, len(same), sessions):
            k += 1
            group = sorted(same[start : start + sessions], key=lambda it: it[2])
            for j, (_, path, age, _) in enumerate(group, start=1):
                out.append(BidsScan(f"p{k:02d}", str(j), path, age, sex, sites[(k - 1) % len(sites)]))
    return out
