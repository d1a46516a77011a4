"""Quality control of a preprocessed cohort: robust-z outliers of the per-scan QC numbers and a QC page.

Per-scan QC numbers are computed while preprocessing (:func:`~brainage_hpc.ingest.preprocess.prepare_volume`)
and stored in ``manifest.json``. A scan far from the cohort in any of them (robust
z-score ``0.6745 (x - median) / MAD`` beyond :data:`ROBUST_Z_MAX`, Iglewicz and Hoaglin
1993) is flagged: a failed registration, a brain mask that took the neck or lost the
cerebellum, a scan with a different contrast. The QC page shows three orthogonal
slices of every stored volume with the brain-mask contour and, for the raw pipeline
(whose grid is the template's), the template's edges, so a reviewer scrolls through
a whole cohort and sees misregistration at a glance.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LOW_ONLY", "ROBUST_Z_MAX", "flag_outliers", "render_slices", "write_qc_page"]

ROBUST_Z_MAX = 3.5
# QC numbers where only low values are bad (a very good registration is not an outlier)
LOW_ONLY = frozenset({"similarity", "snr", "solidity", "mask_solidity"})
# QC numbers that describe run time, not the scan
_IGNORED = frozenset({"n4_s", "registration_s", "brain_extraction_s", "resample_s"})
_MIN_SCANS = 8


def flag_outliers(qc: Mapping[str, Mapping[str, float]]) -> dict[str, list[str]]:
    """Scans whose QC numbers are robust-z outliers within the cohort.

    Args:
        qc: scan ID -> {QC name: value}.

    Returns:
        scan ID -> ["brain_volume_ml 2950 (robust z +5.1)", ...] for flagged scans only.
        Empty when fewer than 8 scans have a number (no cohort to compare with).
    """
    names = sorted({k for v in qc.values() for k in v if k not in _IGNORED})
    out: dict[str, list[str]] = {}
    for name in names:
        ids = [s for s, v in qc.items() if isinstance(v.get(name), (int, float)) and math.isfinite(v[name])]
        if len(ids) < _MIN_SCANS:
            continue
        x = np.array([float(qc[s][name]) for s in ids])
        med = float(np.median(x))
        mad = float(np.median(np.abs(x - med)))
        if mad <= 1e-12 * max(abs(med), 1.0):
            continue
        z = 0.6745 * (x - med) / mad
        for sid, zi, xi in zip(ids, z, x, strict=True):
            if zi < -ROBUST_Z_MAX or (zi > ROBUST_Z_MAX and name not in LOW_ONLY):
                out.setdefault(sid, []).append(f"{name} {xi:.4g} (robust z {zi:+.1f})")
    return dict(sorted(out.items()))


def _edges(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a 2D boolean mask."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def render_slices(volume: np.ndarray, path: Path, title: str, template: np.ndarray | None = None) -> None:
    """Write a PNG: sagittal, coronal, axial mid-slices of a (D, H, W) RAS volume, mask contour (red), template edges (cyan).

    Args:
        volume: (D, H, W) preprocessed volume, background 0.
        path: output PNG.
        title: caption (scan ID and QC summary).
        template: (D, H, W) template on the same grid (raw pipeline), edges drawn in cyan.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    red, cyan = ListedColormap(["red"]), ListedColormap(["cyan"])
    gray = plt.get_cmap("gray").with_extremes(bad="black")  # background (0 after preprocessing) black, not mid-grey
    vol = np.asarray(volume, dtype=np.float32)
    mask = vol != 0
    idx = np.argwhere(mask)
    centre = ((idx.min(axis=0) + idx.max(axis=0)) // 2) if len(idx) else np.array(vol.shape) // 2
    lo, hi = (np.percentile(vol[mask], (1, 99)) if mask.any() else (0.0, 1.0))
    views = [
        ("sagittal", lambda a: a[centre[0], :, :]),
        ("coronal", lambda a: a[:, centre[1], :]),
        ("axial", lambda a: a[:, :, centre[2]]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), dpi=80)
    for ax, (label, cut) in zip(axes, views, strict=True):
        shown = np.ma.masked_where(~cut(mask).T, cut(vol).T)
        ax.imshow(shown, origin="lower", cmap=gray, vmin=lo, vmax=hi, interpolation="nearest")
        edge = np.ma.masked_where(~_edges(cut(mask)).T, np.ones(cut(mask).T.shape))
        ax.imshow(edge, origin="lower", cmap=red, interpolation="nearest")
        if template is not None:
            t = cut(template)
            gy, gx = np.gradient(t.astype(np.float32))
            mag = np.hypot(gx, gy)
            thr = np.percentile(mag[mag > 0], 90) if (mag > 0).any() else np.inf
            tedge = np.ma.masked_where((mag < thr).T, np.ones(t.T.shape))
            ax.imshow(tedge, origin="lower", cmap=cyan, alpha=0.7, interpolation="nearest")
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def write_qc_page(
    out: Path,
    rows: list[dict[str, Any]],
    outliers: Mapping[str, list[str]],
    title: str,
    note: str,
) -> Path:
    """Write ``index.html``: a table of QC numbers (outliers first, in red) and every scan's slices below.

    Args:
        out: folder holding the PNGs (``<scan>.png``), where ``index.html`` goes.
        rows: one dict per scan: ``id``, ``png`` (file name), ``qc`` (dict), and any label columns.
        outliers: scan ID -> reasons (from :func:`flag_outliers`).
        title: page title.
        note: one paragraph on what the overlays mean.

    Returns:
        The path of ``index.html``.
    """
    names = sorted({k for r in rows for k in r.get("qc", {}) if k not in _IGNORED})
    ordered = sorted(rows, key=lambda r: (r["id"] not in outliers, r["id"]))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["scan", "cohort", "site", "age", *names, "flags"])
    body = []
    for r in ordered:
        flag = outliers.get(r["id"], [])
        cls = ' class="out"' if flag else ""
        cells = [f'<a href="#{html.escape(r["id"])}">{html.escape(r["id"])}</a>', _cell(r.get("cohort", "")),
                 _cell(r.get("site", "")), _cell(r.get("age", ""))]
        cells += [_cell(r.get("qc", {}).get(n, "")) for n in names] + [html.escape("; ".join(flag))]
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    figs = []
    for r in ordered:
        flag = outliers.get(r["id"], [])
        caption = html.escape(r["id"] + (" - OUTLIER: " + "; ".join(flag) if flag else ""))
        figs.append(
            f'<figure id="{html.escape(r["id"])}"><img loading="lazy" src="{html.escape(r["png"])}" '
            f'alt="{html.escape(r["id"])}"><figcaption>{caption}</figcaption></figure>'
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 5px;text-align:right}} tr.out td{{background:#fdd}}
figure{{margin:0.5em 0}} figcaption{{font-size:12px}}</style></head><body>
<h1>{html.escape(title)}</h1><p>{html.escape(note)}</p>
<p>{len(rows)} scans, {len(outliers)} flagged (robust z beyond {ROBUST_Z_MAX}).</p>
<table><tr>{head}</tr>{"".join(body)}</table>
{"".join(figs)}
</body></html>
"""
    path = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
