"""``brainage explain``: several attribution methods on one run, each with its faithfulness.

For every method: per-subject maps (each scaled to a maximum of 1), their group mean as
NIfTI on the shard grid and a PNG overlay, and in ``faithfulness.json`` / ``report.md``:
enrichment and Spearman rho of the group map against a truth map (when there is one),
deletion / insertion AOPC on a few subjects (always), zero maps and seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainage_hpc.outputs import prepare_output_dir

__all__ = ["faithfulness_table", "run_explain"]

log = logging.getLogger(__name__)


def faithfulness_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown table, one row per method."""
    from brainage_hpc.report import markdown_table

    def f(v: Any, fmt: str = ".2f") -> str:
        return "n/a" if v is None else format(float(v), fmt)

    rows = [[m, f(r.get("enrichment")), f(r.get("spearman")), f(r.get("aopc_deletion")), f(r.get("aopc_insertion")),
             f(r.get("aopc_random")), f"{r['n_zero_maps']}/{r['n_subjects']}", f(r.get("seconds"), ".0f")]
            for m, r in results.items()]
    return markdown_table(["method", "enrichment (x chance)", "Spearman rho", "deletion AOPC (y)", "insertion AOPC (y)",
                           "random-order AOPC (y)", "zero maps", "seconds"], rows)


def run_explain(
    run: str | Path,
    shards: str | Path,
    out: str | Path,
    methods: Sequence[str] = ("gradcam", "occlusion", "ig", "smoothgrad"),
    truth: str | None = "auto",
    split: str = "test",
    max_subjects: int = 8,
    occlusion_subjects: int = 4,
    curve_subjects: int = 2,
    patch: int = 6,
    batch_size: int = 2,
    device: str | None = None,
) -> dict[str, Any]:
    """Run ``methods`` on the first ``max_subjects`` of ``split`` and write maps and faithfulness.

    Args:
        truth: ``"auto"`` (``|r|`` over the train split), a NIfTI path, or None (no truth metrics).
        occlusion_subjects: subjects for occlusion (the slowest method); at most ``max_subjects``.
        curve_subjects: subjects for the deletion/insertion curves.
        patch: occlusion patch edge (voxels).

    Raises:
        ValueError: unknown method, CVAE method on another model, truth of the wrong shape,
            shards that do not match the model.
    """
    from brainage_hpc.data.dataset import ShardDataset
    from brainage_hpc.data.shards import load_manifest
    from brainage_hpc.evaluation.predict import load_model
    from brainage_hpc.interpret.faithfulness import (
        brain_mask,
        enrichment,
        perturbation_curves,
        spearman,
        summarise_curves,
    )
    from brainage_hpc.interpret.gradcam import save_overlay
    from brainage_hpc.interpret.methods import attribute, check_methods, score_fn
    from brainage_hpc.interpret.truth import load_truth_map, truth_auto
    from brainage_hpc.report import save_nifti, write_json, write_report

    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError("no --method given")
    lm = load_model(run, device)
    check_methods(methods, hasattr(lm.model, "encode") and hasattr(lm.model, "decode"), f"{run}")
    manifest = load_manifest(shards)
    shape = tuple(int(s) for s in manifest.shape)
    if shape != tuple(lm.shape):
        raise ValueError(f"{manifest.root}: shards have shape {shape}, the model was trained on {tuple(lm.shape)}")
    truth_map = None
    if truth not in (None, "auto", "none"):
        truth_map = load_truth_map(truth, shape, manifest.preprocess)
    ds = ShardDataset(manifest, split, task=lm.task)
    n = min(len(ds), max(1, max_subjects))
    items = [ds[i] for i in range(n)]
    images = torch.stack([it["image"] for it in items])  # (N, 1, D, H, W)
    sexes = torch.stack([it["sex"] for it in items])
    background = float(images[0, 0, 0, 0, 0])
    mask = brain_mask(images[:, 0].numpy(), background)
    truth_source = None
    if truth == "auto":
        truth_map, truth_source = truth_auto(manifest, mask), "|Pearson r| of intensity vs age per voxel, train split"
    elif truth_map is not None:
        truth_source = str(truth)
    affine = np.asarray(manifest.affine, dtype=np.float64)
    out_dir = prepare_output_dir(out, "explanation folder")
    score = score_fn(lm.model)
    mean_img = images[:, 0].mean(0).numpy()
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        k = min(n, max(1, occlusion_subjects)) if method == "occlusion" else n
        t0 = time.perf_counter()
        bs = max(1, batch_size)
        maps = np.concatenate([attribute(method, lm.model, images[i:min(i + bs, k)], sexes[i:min(i + bs, k)], patch=patch,
                                         background=background) for i in range(0, k, bs)])
        seconds = time.perf_counter() - t0
        peak = maps.reshape(k, -1).max(1)
        n_zero = int((peak <= 0).sum())
        if n_zero:
            log.warning("%s: %d of %d maps are zero everywhere", method, n_zero, k)
        maps = maps / np.where(peak > 0, peak, 1.0)[:, None, None, None]
        group = maps.mean(0)
        curves = []
        for j in range(min(k, max(0, curve_subjects))):
            s = sexes[j:j + 1]
            curves.append(perturbation_curves(lambda x, s=s: score(x, s.expand(x.shape[0])), images[j], maps[j], mask, background))
        r: dict[str, Any] = {"n_subjects": k, "n_zero_maps": n_zero, "seconds": round(seconds, 1), **summarise_curves(curves)}
        if truth_map is not None:
            r["enrichment"] = enrichment(group, truth_map, mask)
            r["spearman"] = spearman(group, truth_map, mask)
        r["curves"] = curves
        save_nifti(group, affine, out_dir / f"{method}-group.nii.gz")
        save_overlay(mean_img, group / max(float(group.max()), 1e-12), out_dir / f"{method}-group.png",
                     f"{method}: mean of {k} '{split}' maps" + (f", enrichment {r['enrichment']:.1f}x" if "enrichment" in r else ""),
                     label=f"{method} (normalised)")
        results[method] = r
        log.info("%s: %s", method, {key: v for key, v in r.items() if key != "curves"})
    if truth_map is not None:
        save_nifti(truth_map, affine, out_dir / "truth.nii.gz")
    summary = {"run": str(run), "shards": str(manifest.root), "model": lm.name, "split": split, "truth": truth_source,
               "top_fraction": 0.1, "occlusion_patch": patch, "background": background, "methods": results}
    write_json(out_dir / "faithfulness.json", summary)
    table = faithfulness_table(results)
    (out_dir / "faithfulness.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    notes = [
        f"- run `{run}` (model `{lm.name}`), split `{split}`; truth: {truth_source or 'none (perturbation curves only)'}",
        "- enrichment: share of group-map mass in the top-10 % truth voxels inside the brain / 0.1 (1 = chance)",
        "- AOPC: mean |change of predicted age| (years) when deleting the top half of the brain in map order "
        "(deletion), or the mean closed gap when inserting it into a blank brain (insertion); random order = chance",
    ]
    write_report(out_dir, f"Explanations: {lm.name} on {split}", [("Faithfulness", [*notes, "", *table])],
                 [f"{m}-group.png" for m in methods])
    return summary
