"""Output files of evaluation and interpretation: atomic writers, slice views, ``report.md``.

Every file is written to a temporary name in its folder and renamed into place,
so a crash leaves the old file or none, never half of one. ``report.md`` links
every PNG of its folder and puts our numbers beside the seed's reference table
(DESIGN.md section 4: HCP test micro-F1).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SEED_REFERENCE",
    "atomic_path",
    "format_value",
    "markdown_table",
    "ortho_slices",
    "reference_table",
    "save_figure",
    "save_nifti",
    "write_csv",
    "write_eval_report",
    "write_json",
    "write_report",
]

# DESIGN.md section 4: the seed's results on HCP (test micro-F1); None = not reported.
SEED_REFERENCE: tuple[tuple[str, float | None, float | None], ...] = (
    ("KernelPCA + kNN baseline", 0.455, 0.616),
    ("3D CNN", 0.495, 0.535),
    ("VAE-C", 0.515, 0.626),
    ("XGBoost on FreeSurfer table (tuned)", 0.730, None),
)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffixes); rename it onto ``path`` on success.

    The temporary name keeps every suffix (``.nii.gz``, ``.png``) so writers that infer the
    format from the name still work. On an exception the temporary file is removed.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_path(d / "x.txt") as tmp:
        ...     _ = tmp.write_text("ok")
        >>> (d / "x.txt").read_text()
        'ok'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".tmp-", suffix="-" + path.name, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (NaN/inf become ``null``) atomically."""
    from brainage_hpc.evaluation.metrics import json_safe

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return Path(path)


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Write a CSV atomically; ``None`` and NaN cells are written empty."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return Path(path)


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return Path(path)


def save_nifti(volume: np.ndarray, affine: np.ndarray | Sequence[Sequence[float]], path: str | Path) -> Path:
    """Save a (D, H, W) volume as float32 NIfTI with ``affine`` (qform and sform) atomically.

    Args:
        volume: (D, H, W) array in the RAS voxel order of the shards.
        affine: (4, 4) voxel-to-RAS-mm matrix, e.g. the shard grid's affine.
        path: output ``.nii`` or ``.nii.gz`` path.
    """
    import nibabel as nib

    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume (D, H, W), got shape {vol.shape}")
    aff = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(vol, aff)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(aff, code=1)
    img.header.set_sform(aff, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def ortho_slices(volume: np.ndarray, point: Sequence[int] | None = None) -> list[tuple[str, np.ndarray]]:
    """Axial, coronal and sagittal slices of a RAS (D, H, W) volume, ready for ``imshow(origin="lower")``.

    Args:
        volume: (D, H, W) with axes (left→right, posterior→anterior, inferior→superior).
        point: voxel (i, j, k) the slices pass through; default the centre.

    Returns:
        ``[("axial", (H, D)), ("coronal", (W, D)), ("sagittal", (W, H))]``: transposed so that
        with ``origin="lower"`` right is right, anterior/superior is up (neurological view).
    """
    vol = np.asarray(volume)
    i, j, k = (int(s) // 2 for s in vol.shape) if point is None else (int(p) for p in point)
    return [("axial", vol[:, :, k].T), ("coronal", vol[:, j, :].T), ("sagittal", vol[i, :, :].T)]


def format_value(v: Any, digits: int = 3) -> str:
    """Markdown cell text: floats rounded, ``None``/NaN as ``n/a``."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Lines of a Markdown table (cells through :func:`format_value`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_value(v) for v in row) + " |" for row in rows]
    return lines


def reference_table(ours: Sequence[tuple[str, float | None, float | None]]) -> list[str]:
    """The seed's table (DESIGN.md section 4) with our rows appended.

    Args:
        ours: ``(label, micro-F1 4 classes, micro-F1 2 classes)`` rows of this run
            (``None`` where the task does not give that number).

    Returns:
        Markdown lines: model | 4 classes | 2 classes | source.
    """
    rows: list[list[Any]] = [[name, f4, f2, "seed, HCP test"] for name, f4, f2 in SEED_REFERENCE]
    rows += [[name, f4, f2, "this run"] for name, f4, f2 in ours]
    return markdown_table(["model", "4 classes (micro-F1)", "2 classes (micro-F1)", "source"], rows)


def write_report(
    out_dir: str | Path,
    title: str,
    sections: Sequence[tuple[str, Sequence[str]]],
    figures: Sequence[str | Path] | None = None,
) -> Path:
    """Write ``out_dir/report.md``: a title, text sections, then every figure of the folder.

    Args:
        out_dir: folder of the report; figures are linked relative to it.
        title: first heading.
        sections: ``(heading, lines)`` pairs, in order.
        figures: PNG files to show, in order; every other PNG found in ``out_dir``
            (recursively) is appended, so the report links every figure.

    Returns:
        Path of ``report.md``.
    """
    out = Path(out_dir).resolve()
    listed = [Path(f) for f in (figures or [])]
    found = sorted(p for p in out.rglob("*.png") if not p.name.startswith(".tmp-"))
    seen: set[Path] = set()
    ordered: list[Path] = []
    for p in [*listed, *found]:
        full = (p if p.is_absolute() else out / p).resolve()
        if full not in seen and full.exists():
            seen.add(full)
            ordered.append(full)
    lines = [f"# {title}", ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", *body, ""]
    if ordered:
        lines += ["## Figures", ""]
        for full in ordered:
            rel = full.relative_to(out).as_posix()
            lines += [f"### {rel}", "", f"![{full.stem}]({rel})", ""]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def write_eval_report(out_dir: str | Path, metrics: dict[str, Any], figures: Sequence[str]) -> Path:
    """``report.md`` of ``brainage evaluate``: run, metrics against baselines, seed table, figures.

    Args:
        out_dir: the evaluation folder.
        metrics: the dict written to ``metrics.json``.
        figures: PNG names in ``out_dir``, in display order.
    """
    cls = metrics.get("classification", {})
    base = metrics.get("baselines", {})
    run_lines = [
        f"- run: `{metrics.get('run')}` (model `{metrics.get('model')}`, task `{metrics.get('task')}`, "
        f"step {metrics.get('step')})",
        f"- shards: `{metrics.get('shards')}`, split `{metrics.get('split')}`, {metrics.get('n')} subjects",
        "- files: [predictions.csv](predictions.csv), [metrics.json](metrics.json)",
    ]
    sections: list[tuple[str, Sequence[str]]] = [("Run", run_lines)]
    keys = ("f1_micro", "f1_macro", "balanced_accuracy", "accuracy")
    cols = [(f"{k} model", cls[k]) for k in ("4class", "2class") if k in cls]
    cols += [(f"{k} majority class", base[k]) for k in ("4class", "2class") if k in base]
    sections.append(("Classification", markdown_table(["metric", *[c for c, _ in cols]], [[k, *[d.get(k) for _, d in cols]] for k in keys])))
    reg = metrics.get("regression")
    if reg:
        rcols = [("model", reg)]
        if metrics.get("regression_bias_corrected"):
            rcols.append(("bias-corrected", metrics["regression_bias_corrected"]))
        if base.get("regression"):
            rcols.append(("predict train mean", base["regression"]))
        rows = [[k, *[d.get(k) for _, d in rcols]] for k in ("mae", "rmse", "r2", "pearson_r", "n")]
        body = markdown_table(["metric (years)", *[c for c, _ in rcols]], rows)
        bc = metrics.get("bias_correction", {})
        if "alpha" in bc:
            body = [*body, "", f"Bias correction fitted on `{bc['fitted_on']}` ({bc['n_fit']} subjects): "
                    f"pred = {bc['alpha']:.3f} · age + {bc['beta']:.2f}; corrected = (pred − β) / α."]
            if bc.get("warning"):
                body.append(f"Warning: {bc['warning']}.")
        elif bc:
            body = [*body, "", f"Bias correction skipped: {bc.get('skipped')}."]
        sections.append(("Regression", body))
    else:
        sections.append(("Regression", [str(metrics.get("regression_skipped", "no age predictions"))]))
    f4 = cls.get("4class", {}).get("f1_micro")
    f2 = cls.get("2class", {}).get("f1_micro")
    ours = [
        (f"this run: {metrics.get('model')} ({metrics.get('task')}), split {metrics.get('split')}", f4, f2),
        ("majority-class baseline on this data", base.get("4class", {}).get("f1_micro"), base.get("2class", {}).get("f1_micro")),
    ]
    note = ("The seed's numbers are HCP S1200 test micro-F1; ours compare with them only when this run "
            "was trained and evaluated on HCP (a synthetic cohort has different age bins and difficulty). "
            "Regressors are placed in the table through the bins of their predicted age.")
    sections.append(("Seed reference (DESIGN.md section 4) beside this run", [*reference_table(ours), "", note]))
    return write_report(out_dir, f"Evaluation: {metrics.get('model')} on {metrics.get('split')}", sections, figures)
