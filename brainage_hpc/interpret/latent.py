"""The conditional VAE's latent space and age-conditioned generation of brains.

* :func:`encode_split` + :func:`project_latents`: posterior means ``mu`` of a split,
  projected with PCA (always), t-SNE (scikit-learn) and UMAP (when installed),
  plotted coloured by age;
* :func:`generate_at_ages`: volumes sampled from the age-conditioned prior
  ``z ~ N(z_a, I)``; sample ``k`` uses the same noise at every age, so differences
  between ages come from the age condition alone;
* :func:`decode_age_strip`: one latent noise vector decoded across a range of ages;
* :func:`ventricle_csf_fraction`: fraction of dark (CSF-like) voxels inside the brain of
  a z-scored volume, the readout used to check that generated old brains have more CSF.

``run_latent`` and ``run_generate`` write the files of ``brainage latent`` and
``brainage generate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from brainage_hpc.data.shards import Manifest
from brainage_hpc.evaluation.predict import LoadedModel
from brainage_hpc.outputs import prepare_output_dir

__all__ = [
    "brain_mask",
    "decode_age_strip",
    "encode_split",
    "generate_at_ages",
    "plot_projection",
    "project_latents",
    "require_cvae",
    "run_generate",
    "run_latent",
    "ventricle_csf_fraction",
]


def require_cvae(lm: LoadedModel) -> nn.Module:
    """The model if it is a conditional VAE (has ``encode`` and ``generate``).

    Raises:
        ValueError: another model family (the message names the run and the model).
    """
    model = lm.model
    if not (hasattr(model, "encode") and hasattr(model, "generate")):
        raise ValueError(f"{lm.source}: model '{lm.name}' is not a conditional VAE; this command needs a cvae run")
    return model


# ----------------------------------------------------------------------------- CSF readout


def brain_mask(volume: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """Brain mask of a z-scored volume whose background is ~0 (shards or generated brains).

    Voxels with ``|v| > threshold``, holes filled (GM near z = 0 inside the brain is
    enclosed by the dark edge and CSF), largest connected component.

    Args:
        volume: (D, H, W) z-scored intensities, background ~0.
        threshold: absolute intensity separating tissue from background.

    Returns:
        (D, H, W) bool.
    """
    from scipy import ndimage

    mask = ndimage.binary_fill_holes(np.abs(np.asarray(volume, dtype=np.float32)) > threshold)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return np.asarray(mask, dtype=bool)


def ventricle_csf_fraction(
    volume: np.ndarray, mask: np.ndarray | None = None, dark_z: float = -1.0, erode_vox: int = 1
) -> float:
    """Fraction of CSF-like voxels (dark: z-score below ``dark_z``) inside the brain.

    Shards are z-scored inside the brain mask, so CSF (ventricles, sulci) is strongly
    negative (about -2), GM near 0 and WM positive. The mask is eroded by ``erode_vox``
    voxels to drop the partial-volume rim at the brain's edge, so the fraction follows
    the ventricles and deep sulci, which grow with age.

    Args:
        volume: (D, H, W) z-scored volume (a shard volume or a generated one).
        mask: (D, H, W) bool brain mask; default :func:`brain_mask` of ``volume``. Pass one
            common mask to compare volumes voxel for voxel.
        dark_z: z-score below which a voxel counts as CSF.
        erode_vox: erosion of the mask in voxels (0: none).

    Returns:
        Fraction in [0, 1] (0.0 for an empty mask).

    Example:
        >>> v = np.zeros((20, 20, 20), np.float32); v[4:16, 4:16, 4:16] = 1.0; v[9:11, 9:11, 9:11] = -2.0
        >>> round(ventricle_csf_fraction(v), 4)
        0.008
    """
    from scipy import ndimage

    vol = np.asarray(volume, dtype=np.float32)
    m = brain_mask(vol) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != vol.shape:
        raise ValueError(f"mask shape {m.shape} differs from the volume's {vol.shape}")
    if erode_vox > 0:
        m = ndimage.binary_erosion(m, iterations=int(erode_vox))
    n = int(m.sum())
    return float((vol[m] < dark_z).sum() / n) if n else 0.0


# ----------------------------------------------------------------------------- latent space


@torch.no_grad()
def encode_split(lm: LoadedModel, manifest: Manifest, split: str, batch_size: int = 4) -> tuple[np.ndarray, pd.DataFrame]:
    """Posterior means of every subject of a split.

    Returns:
        (mu (N, Z), table with ``subject_id``, ``age`` (years, NaN if unknown), ``age_bin``, ``sex``).
    """
    from torch.utils.data import DataLoader

    from brainage_hpc.data.dataset import ShardDataset

    model = require_cvae(lm)
    ds = ShardDataset(manifest, split, task=lm.task)
    mus, ids = [], []
    for batch in DataLoader(ds, batch_size=max(1, batch_size), shuffle=False, num_workers=0):
        enc = model.encode(batch["image"].to(lm.device), batch["sex"].to(lm.device))
        mus.append(enc.mu.float().cpu().numpy())
        ids += list(batch["subject_id"])
    table = pd.DataFrame({"subject_id": ids, "age": ds.ages.astype(float), "age_bin": ds.age_bins, "sex": ds.sexes.astype(int)})
    return np.concatenate(mus), table


def project_latents(mu: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """2D projections of latent codes: ``pca`` always, ``tsne`` (N >= 5), ``umap`` (if installed, N >= 5).

    Args:
        mu: (N, Z) latent means, N >= 2.
        seed: random state of t-SNE/UMAP.

    Returns:
        Method name -> (N, 2) coordinates (a 1-D latent gets a zero second axis).
    """
    from sklearn.decomposition import PCA

    mu = np.asarray(mu, dtype=np.float64)
    n, z = mu.shape
    if n < 2:
        raise ValueError(f"latent projection needs at least 2 subjects, got {n}")
    k = min(2, n, z)
    pca = PCA(n_components=k).fit(mu)
    out = {"pca": np.pad(pca.transform(mu), ((0, 0), (0, 2 - k)))}
    out["pca_explained"] = np.pad(pca.explained_variance_ratio_, (0, 2 - k))
    if n >= 5:
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
        out["tsne"] = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(mu)
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            out["umap"] = umap.UMAP(n_neighbors=min(15, n - 1), random_state=seed).fit_transform(mu)
    return out


def plot_projection(xy: np.ndarray, ages: np.ndarray, path: str | Path, title: str, axes: tuple[str, str]) -> Path:
    """Scatter of (N, 2) coordinates coloured by age (years), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainage_hpc.report import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    pts = ax.scatter(xy[:, 0], xy[:, 1], c=ages, cmap="viridis", s=30, edgecolors="k", linewidths=0.3)
    fig.colorbar(pts, ax=ax, label="age (years)")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- generation


def _condition(model: nn.Module, age: float) -> float:
    """Age in years -> what ``generate`` takes: the age (regress) or the class index (classify)."""
    if getattr(model, "task", "regress") != "classify":
        return float(age)
    from brainage_hpc.data.ages import age_to_bin, bin_to_class

    return float(bin_to_class(age_to_bin(float(age)), int(model.num_classes)))


@torch.no_grad()
def generate_at_ages(model: nn.Module, ages: Sequence[float], sex: float, n: int, seed: int = 0) -> np.ndarray:
    """Sample ``n`` brains per age from the age-conditioned prior, with shared noise across ages.

    Args:
        model: a :class:`~brainage_hpc.models.cvae.ConditionalVAE3d` (eval mode).
        ages: ages in years (classifiers: mapped to their age class).
        sex: 0=F, 1=M.
        n: samples per age.
        seed: seed of the latent noise; sample ``k`` has the same noise at every age.

    Returns:
        (A, n, D, H, W) float32 volumes on the z-scored scale of the shards.
    """
    device = next(model.parameters()).device
    out = []
    for age in ages:
        gen = torch.Generator(device=device).manual_seed(int(seed))
        vols = model.generate(age=_condition(model, age), sex=float(sex), n=int(n), generator=gen)  # (n, 1, D, H, W)
        out.append(vols[:, 0].float().cpu().numpy())
    return np.stack(out)


def decode_age_strip(model: nn.Module, ages: Sequence[float], sex: float, seed: int = 0) -> np.ndarray:
    """One latent noise vector decoded at each age: (A, D, H, W)."""
    return generate_at_ages(model, ages, sex, 1, seed)[:, 0]


def _plot_samples(vols: np.ndarray, path: Path, title: str, max_rows: int = 4) -> Path:
    """Mid-slices (axial, coronal, sagittal) of up to ``max_rows`` volumes (n, D, H, W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainage_hpc.report import ortho_slices, save_figure

    rows = min(len(vols), max_rows)
    fig, axes = plt.subplots(rows, 3, figsize=(8, 2.7 * rows), squeeze=False)
    lo, hi = np.percentile(vols, [1, 99])
    for r in range(rows):
        for c, (name, img) in enumerate(ortho_slices(vols[r])):
            axes[r, c].imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi)
            axes[r, c].set_title(f"sample {r} {name}", fontsize=8)
            axes[r, c].axis("off")
    fig.suptitle(title)
    return save_figure(fig, path)


def _plot_strip(strip: np.ndarray, labels: Sequence[str], path: Path, title: str) -> Path:
    """Axial and coronal mid-slices of (A, D, H, W) decoded across ages, plus the change from the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainage_hpc.report import ortho_slices, save_figure

    a = len(strip)
    fig, axes = plt.subplots(3, a, figsize=(1.9 * a + 1, 6.3), squeeze=False)
    lo, hi = np.percentile(strip, [1, 99])
    diff = strip - strip[:1]
    lim = float(np.abs(diff).max()) or 1.0
    for i in range(a):
        views = dict(ortho_slices(strip[i]))
        change = dict(ortho_slices(diff[i]))["coronal"]
        axes[0, i].imshow(views["axial"], cmap="gray", origin="lower", vmin=lo, vmax=hi)
        axes[1, i].imshow(views["coronal"], cmap="gray", origin="lower", vmin=lo, vmax=hi)
        shown = axes[2, i].imshow(change, cmap="RdBu_r", origin="lower", vmin=-lim, vmax=lim)
        axes[0, i].set_title(labels[i], fontsize=9)
        for r in range(3):
            axes[r, i].axis("off")
    fig.colorbar(shown, ax=list(axes[2]), shrink=0.8, label=f"coronal change from {labels[0]} (z)")
    fig.suptitle(title)
    return save_figure(fig, path)


def run_latent(
    run: str | Path, shards: str | Path, out: str | Path, split: str = "test", batch_size: int = 4,
    seed: int = 0, device: str | None = None,
) -> dict[str, Any]:
    """Write ``latent.csv`` (mu per subject), ``latent-pca.png``, ``latent-tsne.png`` (N >= 5),
    ``latent-umap.png`` (if installed), ``latent.json`` and ``report.md`` into ``out``.

    Returns:
        The dict written to ``latent.json`` (methods, PCA explained variance, Pearson r of
        each plotted axis with age).
    """
    from brainage_hpc.data.shards import load_manifest
    from brainage_hpc.evaluation.predict import load_model
    from brainage_hpc.report import markdown_table, write_csv, write_json, write_report

    lm = load_model(run, device)
    require_cvae(lm)
    manifest = load_manifest(shards)
    if tuple(manifest.shape) != tuple(lm.shape):
        raise ValueError(f"{manifest.root}: shards have shape {tuple(manifest.shape)}, the model was trained on {lm.shape}")
    mu, table = encode_split(lm, manifest, split, batch_size)
    out_dir = prepare_output_dir(out, "latent folder")
    cols = [f"mu_{i}" for i in range(mu.shape[1])]
    write_csv(out_dir / "latent.csv", [*table.columns, *cols], [[*r, *m] for r, m in zip(table.values.tolist(), mu.tolist(), strict=True)])
    from brainage_hpc.data.ages import bin_centre

    ages = np.where(np.isfinite(table["age"]), table["age"], [bin_centre(b) for b in table["age_bin"]])
    proj = project_latents(mu, seed)
    names = {"pca": ("PC1", "PC2"), "tsne": ("t-SNE 1", "t-SNE 2"), "umap": ("UMAP 1", "UMAP 2")}
    corr: dict[str, list[float | None]] = {}
    for method, axes in names.items():
        if method not in proj:
            continue
        xy = proj[method]
        plot_projection(xy, ages, out_dir / f"latent-{method}.png", f"CVAE latent means ({split}, n={len(xy)}): {method}", axes)
        corr[method] = [float(np.corrcoef(xy[:, i], ages)[0, 1]) if np.std(xy[:, i]) > 0 and np.std(ages) > 0 else None for i in range(2)]
    summary = {
        "run": str(run), "split": split, "n": len(mu), "latent_dim": mu.shape[1], "methods": list(corr),
        "pca_explained_variance_ratio": proj["pca_explained"].tolist(), "pearson_r_axis_vs_age": corr,
        "ages": "exact age, or the bin centre where only the bin is known",
    }
    write_json(out_dir / "latent.json", summary)
    rows = [[m, *(v for v in corr[m])] for m in corr]
    text = [f"- run `{run}`, split `{split}`: {len(mu)} subjects, latent dimension {mu.shape[1]}",
            "- [latent.csv](latent.csv): posterior mean per subject; points are coloured by age",
            f"- PCA explained variance ratio: {', '.join(f'{v:.3f}' for v in summary['pca_explained_variance_ratio'])}",
            "", *markdown_table(["projection", "r(axis 1, age)", "r(axis 2, age)"], rows)]
    write_report(out_dir, f"CVAE latent space: {split}", [("Latent space", text)], [f"latent-{m}.png" for m in corr])
    return summary


def run_generate(
    run: str | Path, out: str | Path, ages: Sequence[float], sex: str = "F", n: int = 4, seed: int = 0,
    strip_steps: int = 7, device: str | None = None,
) -> dict[str, Any]:
    """Generate brains at each age and write NIfTI, PNG, ``age-strip.png``, ``generate.json``, ``report.md``.

    Files: ``gen-age<A>-<sex>-<k>.nii.gz`` (shard-grid affine), ``gen-age<A>.png`` (mid-slices),
    ``age-strip.png`` (one latent noise decoded at ``strip_steps`` ages from the youngest to the
    oldest requested age, with the change from the youngest). ``generate.json`` holds the CSF
    fraction (:func:`ventricle_csf_fraction`, one common brain mask of all generated volumes)
    per sample and age, and ``csf.oldest_larger``: whether the oldest age's mean exceeds the youngest's.

    Args:
        run: a cvae run folder or model file.
        out: output folder.
        ages: ages in years (classifiers: mapped to their age class).
        sex: ``"M"`` or ``"F"``.
        n: samples per age.
        seed: latent noise seed (shared across ages).
        strip_steps: ages in the strip.
        device: torch device.
    """
    from brainage_hpc.evaluation.predict import load_model
    from brainage_hpc.report import markdown_table, save_nifti, write_json, write_report

    if sex not in ("M", "F"):
        raise ValueError(f"sex={sex!r} is not valid. Valid: M, F")
    if not ages or n < 1:
        raise ValueError(f"need at least one age and n >= 1, got ages={list(ages)}, n={n}")
    lm = load_model(run, device)
    model = require_cvae(lm)
    ages = [float(a) for a in ages]
    s = 1.0 if sex == "M" else 0.0
    vols = generate_at_ages(model, ages, s, n, seed)  # (A, n, D, H, W)
    out_dir = prepare_output_dir(out, "latent folder")
    files = []
    for a, age in enumerate(ages):
        for k in range(n):
            name = f"gen-age{age:g}-{sex}-{k:02d}.nii.gz"
            save_nifti(vols[a, k], lm.affine, out_dir / name)
            files.append(name)
        _plot_samples(vols[a], out_dir / f"gen-age{age:g}.png", f"generated, age {age:g}, sex {sex}")
    lo, hi = min(ages), max(ages)
    if hi - lo < 1e-6:
        lo, hi = 22.0, 37.0  # the HCP age range
    strip_ages = np.linspace(lo, hi, max(2, strip_steps)).tolist()
    strip = decode_age_strip(model, strip_ages, s, seed)
    labels = [f"{a:.1f} y" for a in strip_ages]
    if getattr(model, "task", "regress") == "classify":
        labels = [f"{a:.1f} y (class {int(_condition(model, a))})" for a in strip_ages]
    _plot_strip(strip, labels, out_dir / "age-strip.png", f"one latent code decoded across ages (sex {sex}, seed {seed})")

    voxel_mm = float(abs(np.linalg.det(lm.affine[:3, :3])) ** (1 / 3))
    erode = max(1, round(5.0 / voxel_mm))
    mask = brain_mask(vols.reshape(-1, *vols.shape[2:]).mean(0))
    per_age = []
    for a, age in enumerate(ages):
        fr = [ventricle_csf_fraction(v, mask=mask, erode_vox=erode) for v in vols[a]]
        per_age.append({"age": age, "fraction_mean": float(np.mean(fr)), "fractions": fr})
    young = min(range(len(ages)), key=lambda i: ages[i])
    old = max(range(len(ages)), key=lambda i: ages[i])
    csf = {
        "method": f"fraction of voxels with z < -1 inside one common brain mask (all generated volumes), eroded by {erode} voxel(s)",
        "mask_voxels": int(mask.sum()), "per_age": per_age,
        "youngest_age": ages[young], "oldest_age": ages[old],
        "youngest_mean": per_age[young]["fraction_mean"], "oldest_mean": per_age[old]["fraction_mean"],
        "oldest_minus_youngest": per_age[old]["fraction_mean"] - per_age[young]["fraction_mean"],
    }
    csf["oldest_larger"] = bool(csf["oldest_minus_youngest"] > 0)
    summary = {
        "run": str(run), "model": lm.name, "task": lm.task, "ages": ages, "sex": sex, "n": n, "seed": seed,
        "shape": list(lm.shape), "affine": lm.affine.tolist(), "files": files, "strip_ages": strip_ages, "csf": csf,
    }
    write_json(out_dir / "generate.json", summary)
    rows = [[f"{p['age']:g}", p["fraction_mean"], ", ".join(f"{f:.4f}" for f in p["fractions"])] for p in per_age]
    text = [
        f"- run `{run}` (`{lm.name}`, task `{lm.task}`); sex {sex}; {n} sample(s) per age; seed {seed}",
        f"- volumes: `gen-age<A>-{sex}-<k>.nii.gz` on the shard grid {list(lm.shape)}; sample k has the same latent noise at every age",
        f"- CSF-like fraction: {csf['method']} ({csf['mask_voxels']} voxels)", "",
        *markdown_table(["age (years)", "mean CSF fraction", "per sample"], rows), "",
        f"Oldest ({csf['oldest_age']:g} y) minus youngest ({csf['youngest_age']:g} y): {csf['oldest_minus_youngest']:+.4f} "
        f"({'larger' if csf['oldest_larger'] else 'not larger'} at the oldest age).",
    ]
    figures = ["age-strip.png", *[f"gen-age{a:g}.png" for a in ages]]
    write_report(out_dir, f"CVAE generation: ages {', '.join(f'{a:g}' for a in ages)}", [("Generated brains", text)], figures)
    return summary
