"""``demo_out/report.md`` and ``summary.json``: the demo's numbers on one page.

Reads what each stage wrote (``eval_*/metrics.json``, ``gradcam/gradcam.json``, ``explain*/faithfulness.json``,
``generate/generate.json``, ``latent/latent.json``, ``tabular/metrics.json``) so the
report is rebuilt from files alone, and states whether the demo's acceptance target
(CNN test MAE at most half of the predict-the-mean MAE) was met.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from brainage_hpc.report import atomic_path, markdown_table, reference_table, write_json

__all__ = ["MAE_RATIO_TARGET", "summarise", "write_demo_report"]

MAE_RATIO_TARGET = 0.5


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _micro_f1(metrics: dict[str, Any] | None, key: str) -> float | None:
    block = (metrics or {}).get("classification", {}).get(key)
    return None if block is None else block.get("f1_micro")


def summarise(out: Path, timings: dict[str, float]) -> dict[str, Any]:
    """The headline numbers of a demo folder (what ``summary.json`` holds)."""
    cnn = _load(out / "eval_cnn" / "metrics.json")
    cvae = _load(out / "eval_cvae" / "metrics.json")
    tab = _load(out / "tabular" / "metrics.json")
    gen = _load(out / "generate" / "generate.json")
    if cnn is None or not cnn.get("regression"):
        raise FileNotFoundError(f"{out / 'eval_cnn' / 'metrics.json'}: missing or without regression metrics")
    cnn_mae = float(cnn["regression"]["mae"])
    mean_mae = float(cnn["baselines"]["regression"]["mae"])
    ratio = cnn_mae / mean_mae if mean_mae > 0 else float("inf")
    summary: dict[str, Any] = {
        "cnn_mae": cnn_mae,
        "cnn_r2": cnn["regression"].get("r2"),
        "cnn_mae_bias_corrected": (cnn.get("regression_bias_corrected") or {}).get("mae"),
        "mean_mae": mean_mae,
        "mae_ratio": ratio,
        "mae_ratio_target": MAE_RATIO_TARGET,
        "mae_ratio_ok": bool(ratio <= MAE_RATIO_TARGET),
        "cnn_f1_4class": _micro_f1(cnn, "4class"),
        "cnn_f1_2class": _micro_f1(cnn, "2class"),
        "cvae_mae": (cvae or {}).get("regression", {}).get("mae") if cvae and cvae.get("regression") else None,
        "cvae_f1_2class": _micro_f1(cvae, "2class"),
        "tabular_mae": (tab or {}).get("regression", {}).get("mae") if tab and tab.get("regression") else None,
        "n_test": cnn.get("n"),
        "timings_s": timings,
        "total_s": round(sum(timings.values()), 1),
    }
    explain: dict[str, Any] = {}
    for sub in ("explain", "explain_cvae"):
        f = _load(out / sub / "faithfulness.json")
        for m, r in ((f or {}).get("methods") or {}).items():
            explain[m] = {k: r.get(k) for k in ("enrichment", "spearman", "aopc_deletion", "aopc_insertion", "aopc_random",
                                                 "n_zero_maps", "n_subjects", "seconds")}
    if explain:
        summary["explain"] = explain
    if gen is not None:
        csf = gen["csf"]
        summary["cvae_csf"] = {k: csf[k] for k in ("youngest_age", "oldest_age", "youngest_mean", "oldest_mean", "oldest_larger")}
    return summary


def trust_section(out: Path) -> list[str]:
    """The CNN's trust figures (evaluate's ``trust``): corrected vs uncorrected vs baseline, coverage, OOD."""
    cnn = _load(out / "eval_cnn" / "metrics.json") or {}
    t = cnn.get("trust") or {}
    if not t.get("uncorrected"):
        return ["No trust figures (evaluate found no calibration or no exact ages)."]

    def ci(d: dict[str, Any] | None) -> str:
        return "–" if not d else f"{d['mae']:.2f} [{d['mae_ci95'][0]:.2f}, {d['mae_ci95'][1]:.2f}]"

    lines = [f"CNN test MAE (95 % bootstrap CI): uncorrected {ci(t.get('uncorrected'))}, bias-corrected "
             f"{ci(t.get('corrected'))}, predict-the-mean {ci(t.get('baseline'))} years."]
    iv, ood = t.get("intervals"), t.get("ood")
    if iv:
        lines.append(f"90 % conformal intervals: coverage {iv['coverage']:.2f}, median width {iv['median_width']:.1f} years.")
    if ood:
        lines.append(f"Out-of-distribution flags on test: {ood['n_flagged']} of {ood['n']}.")
    return lines


def write_demo_report(out: Path, timings: dict[str, float]) -> Path:
    """Write ``summary.json`` and ``report.md`` into ``out``; return the report's path."""
    out = Path(out)
    s = summarise(out, timings)
    write_json(out / "summary.json", s)
    verdict = "met" if s["mae_ratio_ok"] else "NOT met"
    results = markdown_table(
        ["model (test split)", "MAE (y)", "R²", "MAE bias-corrected (y)"],
        [
            ["seed CNN, regression (2-proc DDP, bf16)", s["cnn_mae"], s["cnn_r2"], s["cnn_mae_bias_corrected"]],
            ["CVAE age head", s["cvae_mae"], None, None],
            ["FreeSurfer table, HistGradientBoosting", s["tabular_mae"], None, None],
            ["predict the training mean (baseline)", s["mean_mae"], None, None],
        ],
    )
    lines = [
        f"Test subjects: {s['n_test']}. CNN MAE / predict-the-mean MAE = **{s['mae_ratio']:.0%}** "
        f"(target ≤ {MAE_RATIO_TARGET:.0%}: **{verdict}**).",
        "",
        *results,
    ]
    seed = reference_table([("demo seed CNN (regression, binned)", s["cnn_f1_4class"], s["cnn_f1_2class"]),
                            ("demo CVAE", None, s["cvae_f1_2class"])])
    csf_lines = ["CVAE generation not run."]
    if "cvae_csf" in s:
        c = s["cvae_csf"]
        csf_lines = [
            f"Ventricle/CSF fraction of brains generated at age {c['youngest_age']:g}: {c['youngest_mean']:.4f}; "
            f"at age {c['oldest_age']:g}: {c['oldest_mean']:.4f} (older larger: {c['oldest_larger']}). "
            "The synthetic cohort widens ventricles with age, so a CVAE that learnt the age prior shows it.",
        ]
    explain_lines = ["Explanations not run."]
    if s.get("explain"):
        from brainage_hpc.interpret.explain import faithfulness_table

        explain_lines = [
            "Which brain regions drive the predicted age? The cohort's ground truth: voxels whose intensity correlates with "
            "age over the train split (|Pearson r|; ventricles widen, cortex thins). Enrichment = share of the group map's "
            "mass in the top-10 % of those voxels / 0.1 (1 = chance; targets: Grad-CAM ≥ 2x, best method ≥ 4x). "
            "AOPC = mean |change of predicted age| when the map's top voxels are deleted (or inserted into a blank brain); "
            "random order = chance. `counterfactual` is the CVAE's (one latent decoded at its age and 10 years older).",
            "",
            *faithfulness_table(s["explain"]),
        ]
    links = [
        "- [CNN evaluation](eval_cnn/report.md), [CVAE evaluation](eval_cvae/report.md)",
        "- [Explanations](explain/report.md), [CVAE counterfactual](explain_cvae/report.md)",
        "- [Grad-CAM](gradcam/report.md), [CVAE latent space](latent/report.md), [CVAE generation](generate/report.md)",
        "- [FreeSurfer-table model](tabular/report.md)",
        "- TensorBoard: `tensorboard --logdir runs`",
    ]
    times = markdown_table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in s["timings_s"].items()] + [["total", f"{s['total_s']:.0f}"]])
    sections = [
        ("Results", lines),
        ("Trust: bias correction, intervals, OOD (CNN)", trust_section(out)),
        ("Against the seed (synthetic data: not comparable, shown for layout)", seed),
        ("CVAE age-conditioned generation", csf_lines),
        ("Explanations: faithfulness per method", explain_lines),
        ("Detailed reports", links),
        ("Time per stage", times),
    ]
    figures = ["eval_cnn/pred_vs_true.png", "gradcam/group-mean.png", "explain/occlusion-group.png", "generate/age-strip.png", "latent/latent-pca.png",
               "tabular/importance.png"]
    # Only the headline figures here: each stage's own report links the rest.
    text = ["# brainage-hpc demo", ""]
    for heading, body in sections:
        text += [f"## {heading}", "", *body, ""]
    text += ["## Figures", ""]
    text += [f"### {f}\n\n![{Path(f).stem}]({f})\n" for f in figures if (out / f).exists()]
    report = out / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(text).rstrip() + "\n", encoding="utf-8")
    return report
