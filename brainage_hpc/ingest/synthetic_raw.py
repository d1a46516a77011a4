"""A raw (head) version of a synthetic cohort, as a BIDS dataset: ``brainage synth --raw-bids DIR``.

Every subject of a synthetic HCP-layout cohort (:mod:`brainage_hpc.ingest.synthetic`,
skull-stripped) is wrapped in a head and scanned (:mod:`brainage_hpc.ingest.synthetic_head`)
with its own random acquisition: head tilt up to ``max_rotation_deg`` about each axis,
field-of-view offset, RAS or LPS storage, and the given (anisotropic) voxel size. The
skull-stripped file of the same subject stays the truth for its brain.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainage_hpc.ingest.bids_writer import BidsScan, write_bids
from brainage_hpc.ingest.hcp import T1W_RELPATH
from brainage_hpc.ingest.synthetic_head import HeadConfig, make_head

__all__ = ["RawCohortConfig", "make_raw_cohort"]


@dataclass(frozen=True)
class RawCohortConfig:
    """How the heads of a synthetic cohort are 'acquired'.

    Args:
        voxel_mm: stored voxel size (x, y, z), anisotropic allowed.
        max_rotation_deg: head tilt drawn uniformly in +-this about each axis.
        orientation: ``"RAS"``, ``"LPS"`` or ``"random"`` (each subject one of the two).
        max_offset_mm: field-of-view offset drawn uniformly in +-this per axis (on top of the neck offset).
        sites: site labels assigned in turn (stored in participants.tsv).
        seed: acquisition seed.
    """

    voxel_mm: tuple[float, float, float] = (1.0, 1.0, 1.2)
    max_rotation_deg: float = 15.0
    orientation: str = "random"
    max_offset_mm: float = 15.0
    sites: tuple[str, ...] = ("scannerA", "scannerB")
    seed: int = 0


def make_raw_cohort(hcp_root: str | Path, out: str | Path, cfg: RawCohortConfig) -> Path:
    """Write heads of every subject of ``hcp_root`` (a synthetic cohort with ``truth.json``) as BIDS in ``out``.

    Also writes ``out/acquisition.json``: per subject the tilt, offset, storage order and
    voxel size used, so tests can relate each head to its skull-stripped brain.
    """
    import nibabel as nib

    if cfg.orientation not in ("RAS", "LPS", "random"):
        raise ValueError(f"orientation must be RAS, LPS or random, got {cfg.orientation!r}")
    hcp_root, out = Path(hcp_root), Path(out)
    truth = json.loads((hcp_root / "truth.json").read_text())["subjects"]
    staging = out / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    scans, acq = [], {}
    for i, t in enumerate(sorted(truth, key=lambda t: t["subject"])):
        rng = np.random.default_rng([cfg.seed, i])
        rot = tuple(float(r) for r in rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg, 3))
        offset = tuple(float(o) for o in np.array([0.0, -10.0, -25.0]) + rng.uniform(-cfg.max_offset_mm, cfg.max_offset_mm, 3))
        orient = cfg.orientation if cfg.orientation != "random" else ("RAS", "LPS")[int(rng.integers(2))]
        hc = HeadConfig(voxel_mm=cfg.voxel_mm, rotation_deg=rot, fov_offset_mm=offset, orientation=orient)  # type: ignore[arg-type]
        img = nib.load(hcp_root / t["subject"] / T1W_RELPATH)
        head = make_head(np.asarray(img.dataobj, dtype=np.float32), img.affine, hc, rng)
        path = staging / f"{t['subject']}.nii.gz"
        nimg = nib.Nifti1Image(head.data, head.affine)
        nimg.header.set_xyzt_units("mm", "sec")
        nimg.header.set_qform(head.affine, code=1)
        nimg.header.set_sform(head.affine, code=1)
        nib.save(nimg, path)
        label = t["subject"]
        scans.append(BidsScan(label, None, str(path), float(t["age"]), t["sex"], cfg.sites[i % len(cfg.sites)]))
        acq[f"sub-{label}"] = {"rotation_deg": rot, "fov_offset_mm": offset, "orientation": orient,
                               "voxel_mm": list(cfg.voxel_mm), "skullstripped": str(hcp_root / label / T1W_RELPATH)}
    write_bids(out, scans, name="synthetic raw heads", move=True)
    shutil.rmtree(staging, ignore_errors=True)
    (out / "acquisition.json").write_text(json.dumps(acq, indent=1, sort_keys=True) + "\n")
    return out
