"""``brainage qc SHARDS``: a scrollable QC page of a preprocessed cohort (slices, mask contours, template edges, outliers)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="output folder of `brainage preprocess` (with manifest.json)")
    parser.add_argument("--out", default=None, help="folder for index.html and the PNGs (default: SHARDS/qc)")
    parser.add_argument("--only-outliers", action="store_true", help="draw only the scans flagged as QC outliers")


_CAPTION_KEYS = ("similarity", "brain_volume_ml", "volume_ml", "snr", "contrast")


def _png_name(sid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", sid) + ".png"


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from brainage_hpc.data.shards import ShardReader, load_manifest
    from brainage_hpc.ingest.preprocess import PreprocessConfig, _geometry
    from brainage_hpc.ingest.qc import flag_outliers, render_slices, write_qc_page
    from brainage_hpc.outputs import prepare_output_dir

    manifest = load_manifest(args.shards)
    out = prepare_output_dir(Path(args.out) if args.out else manifest.root / "qc", "QC folder")
    cfg = PreprocessConfig.from_dict(manifest.preprocess)
    qc = {sid: rec.get("qc") or {} for sid, rec in manifest.subjects.items()}
    outliers = manifest.extra.get("qc_outliers")
    if outliers is None:  # shard sets made before QC numbers existed
        outliers = flag_outliers(qc)
    template = None
    if cfg.pipeline == "raw":
        from brainage_hpc.ingest.template import load_template

        t = load_template()
        template = _geometry(t.t1 * t.mask, t.affine, cfg, centre_mm=t.brain_centre_mm)
        note = (
            "Three orthogonal mid-slices of each stored volume (RAS; sagittal, coronal, axial). "
            "Red: brain-mask contour. Cyan: edges of the MNI152 template on the same grid; "
            "they should follow the brain's outline and ventricles when registration worked."
        )
    else:
        note = (
            "Three orthogonal mid-slices of each stored volume (RAS). Red: brain-mask contour. "
            "Skull-stripped pipeline: volumes are centred on each brain, not registered, so no template edges."
        )
    reader = ShardReader(manifest.root, manifest)
    rows = []
    ids = sorted(outliers) if args.only_outliers else sorted(manifest.subjects)
    for sid in ids:
        rec = manifest.subjects[sid]
        vol = np.asarray(reader.read(sid)[0], dtype=np.float32)
        png = _png_name(sid)
        shown = [k for k in _CAPTION_KEYS if k in qc[sid]]
        summary = ", ".join(f"{k} {qc[sid][k]:.3g}" for k in shown)
        render_slices(vol, out / png, f"{sid}  {summary}", template=template)
        rows.append({"id": sid, "png": png, "qc": qc[sid], "cohort": rec.get("cohort", ""), "site": rec.get("site", ""),
                     "age": rec.get("age")})
    reader.close()
    page = write_qc_page(out, rows, outliers, f"QC: {manifest.root}", note)
    print(f"qc: {len(rows)} scans, {len(outliers)} flagged -> {page}")
    return 0
