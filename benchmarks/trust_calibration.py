"""Trust figures per synthetic difficulty preset: bias correction, conformal coverage, OOD flags.

For each preset (``default``, ``realistic``): synthesise a small cohort, preprocess it to
32^3 at 5 mm, train a small CNN on CPU, ``brainage calibrate`` it and ``brainage evaluate``
it on the test split; then score four out-of-distribution volumes (a noise cube, a box
phantom, a test scan with 50 % of its voxels replaced by N(0, 1) noise, and a "non-human
brain": a smoothed, elongated ellipsoid blob, z-scored like a brain) in the model's input
space. Writes ``benchmarks/results/trust_calibration.json``.

    nice -n 10 python -m benchmarks.trust_calibration            # ~8 min per preset on 2 busy cores

The first preset also gets a second seed and their 2-seed ensemble (mean age, members'
spread, intervals normalised by the spread), evaluated on the same test split.
    python -m benchmarks.trust_calibration --quick --shards S --presets default --no-ensemble --out r.json  # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BENCH_OUT, finish, make_ratio, make_result, result_path, set_threads

NAME = "trust_calibration"
PRESETS = ("default", "realistic")
SYNTH_MM = 3.0  # 4 mm synthesis lost most of the age signal at this size (test r ~ 0 in a trial run)
SPLITS = ("0.5", "0.25", "0.25")  # ~100 validation subjects of 400: conformal rank 91, OOD rank 99 (level 0.975)


def ood_volumes(example: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The four out-of-distribution inputs, (D, H, W) float32 in the shards' z-scored space.

    ``example`` is an in-distribution input volume (a test scan) for the corrupted one.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    shape = example.shape
    box = np.zeros(shape, np.float32)
    sl = tuple(slice(n // 5, n - n // 5) for n in shape)
    box[sl] = 1.0
    corrupted = example.astype(np.float32).copy()
    mask = rng.random(shape) < 0.5
    corrupted[mask] = rng.normal(size=int(mask.sum()))
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = (grid[0] / 0.35) ** 2 + (grid[1] / 0.9) ** 2 + (grid[2] / 0.4) ** 2 <= 1  # elongated, rodent-like
    tex = gaussian_filter(rng.normal(size=shape), 1.5)
    nonhuman = np.where(blob, (tex - tex[blob].mean()) / tex[blob].std(), 0.0).astype(np.float32)
    return {"noise_cube": rng.normal(size=shape).astype(np.float32), "box_phantom": box,
            "corrupted_50pct": corrupted, "non_human_blob": nonhuman}


def ood_kind_scores(run: Path, shards: Path) -> dict[str, Any]:
    """OOD score and flag of each of :func:`ood_volumes` under the run's calibration."""
    import torch

    from brainage_hpc.data.dataset import ShardDataset
    from brainage_hpc.data.shards import load_manifest
    from brainage_hpc.evaluation.calibration import apply_calibration
    from brainage_hpc.evaluation.predict import load_model, predict_batch

    lm = load_model(run, "cpu")
    example = ShardDataset(load_manifest(shards), "test", task=lm.task)[0]["image"][0].float().numpy()
    vols = ood_volumes(example)
    image = torch.from_numpy(np.stack(list(vols.values())))[:, None]
    out = predict_batch(lm, image, torch.zeros(len(vols)))
    cols = apply_calibration(lm.calibration, out["pred_age"], out["features"])
    return {k: {"score": float(cols["ood_score"][i]), "flag": bool(cols["ood_flag"][i]),
                "pred_age": float(out["pred_age"][i])} for i, k in enumerate(vols)}


def _train(shards: Path, run: Path, steps: int, seed: int) -> None:
    from brainage_hpc.config import load_config
    from brainage_hpc.engine.run import train_main

    if (run / "last.pt").exists():
        return
    cfg = load_config("cnn_demo", [
        f"data.shards={shards}", "data.shape=[32,32,32]", "data.batch_size=8", "data.num_workers=0",
        "data.pin_memory=false", "data.persistent_workers=false", "data.augment.enabled=false",
        "model.name=cnn3d", "model.task=regress", "model.params={depth: 2, width: 8, dropout: 0.1}",
        "train.lr=3e-3", "train.progress=false", "train.warmup_steps=0", "train.schedule=constant",
        "train.backend=single", "train.precision=32", f"train.max_steps={steps}", "train.epochs=1000", f"train.seed={seed}",
    ])
    assert train_main(cfg, run) == 0


def run_ensemble(preset: str, work: Path, steps: int) -> dict[str, Any]:
    """A second seed of the preset's run; the 2-seed ensemble calibrated (normalised intervals) and evaluated."""
    import json

    from brainage_hpc.cli import main

    shards, runs = work / f"{preset}-shards", [work / f"{preset}-run", work / f"{preset}-run-seed1"]
    _train(shards, runs[1], steps, seed=1)
    ens = work / f"{preset}-ensemble"
    ens.mkdir(exist_ok=True)
    assert main(["calibrate", "--run-dir", *map(str, runs), "--shards", str(shards), "--out", str(ens / "calibration.json")]) == 0
    assert main(["evaluate", "--checkpoint", *map(str, runs), "--shards", str(shards), "--out", str(ens / "eval-test"),
                 "--calibration", str(ens / "calibration.json")]) == 0
    t = json.loads((ens / "eval-test" / "metrics.json").read_text())["trust"]
    return {"members": [str(r.name) for r in runs], "mae": t["ensemble"]["mae"], "members_mae": t["ensemble"]["members"],
            "uncorrected": t.get("uncorrected"), "intervals": t.get("intervals"), "ood_test": t.get("ood"),
            "conformal": (t.get("calibration") or {}).get("conformal")}


def run_preset(preset: str, work: Path, n_subjects: int, steps: int, given_shards: Path | None = None) -> dict[str, Any]:
    """Synthesise, preprocess (or use ``given_shards``, 32^3), train, calibrate, evaluate one preset; return its figures."""
    import json

    from brainage_hpc.cli import main
    from brainage_hpc.ingest.synthetic import SynthConfig, make_cohort

    t0 = time.perf_counter()
    cohort, shards, run = work / f"{preset}-cohort", given_shards or work / f"{preset}-shards", work / f"{preset}-run"
    if not (shards / "manifest.json").exists():
        make_cohort(cohort, SynthConfig.preset(preset, n_subjects=n_subjects, seed=7, voxel_mm=SYNTH_MM), progress=False, workers=2)
        assert main(["preprocess", "--hcp-root", str(cohort), "--out", str(shards), "--shape", "32", "32", "32",
                     "--voxel-mm", "5", "--shard-size", "32", "--workers", "2", "--split-fractions", *SPLITS]) == 0
    t_data = time.perf_counter() - t0
    _train(shards, run, steps, seed=0)
    t_train = time.perf_counter() - t0 - t_data
    assert main(["calibrate", "--run-dir", str(run), "--shards", str(shards)]) == 0
    assert main(["evaluate", "--run-dir", str(run), "--shards", str(shards), "--out", str(run / "eval-test")]) == 0
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    trust = metrics["trust"]
    kinds = ood_kind_scores(run, shards)
    return {"preset": preset, "n_subjects": n_subjects, "steps": steps, "n_test": metrics["n"],
            "uncorrected": trust.get("uncorrected"), "corrected": trust.get("corrected"), "baseline": trust.get("baseline"),
            "gap_age_r": trust.get("gap_age_r"), "per_bin": trust.get("per_bin"), "intervals": trust.get("intervals"),
            "ood_test": trust.get("ood"), "ood_kinds": kinds, "calibration": trust.get("calibration"),
            "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "total": round(time.perf_counter() - t0, 1)}}


def _fmt(d: dict[str, Any] | None, key: str) -> str:
    if not d or d.get(key) is None:
        return "–"
    lo, hi = d.get(f"{key}_ci95") or [None, None]
    return f"{d[key]:.2f} [{lo:.2f}, {hi:.2f}]" if lo is not None else f"{d[key]:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny cohort and few steps (smoke run)")
    ap.add_argument("--subjects", type=int, default=400)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    ap.add_argument("--no-ensemble", action="store_true", help="skip the 2-seed ensemble of the first preset")
    ap.add_argument("--shards", type=Path, default=None, help="use these 32^3 shards for the first preset (smoke runs)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/ or bench_out/quick/)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    n, steps = (40, 10) if args.quick else (args.subjects, args.steps)
    work = (args.out.parent / f"{NAME}-work") if args.out else BENCH_OUT / NAME / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    per = {p: run_preset(p, work, n, steps, args.shards if i == 0 else None) for i, p in enumerate(args.presets)}
    ensemble = None if args.no_ensemble else run_ensemble(args.presets[0], work, steps)
    rows, ratios = [], []
    for p, r in per.items():
        iv, ood = r["intervals"] or {}, r["ood_test"] or {}
        flagged = sum(k["flag"] for k in r["ood_kinds"].values())
        rows.append([p, r["n_test"], _fmt(r["uncorrected"], "mae"), _fmt(r["corrected"], "mae"), _fmt(r["baseline"], "mae"),
                     _fmt(r["uncorrected"], "pearson_r"), _fmt(r["corrected"], "pearson_r"),
                     f"{iv['coverage']:.3f}" if iv else "skipped", f"{iv['median_width']:.2f}" if iv else "–",
                     f"{ood.get('flag_rate', float('nan')):.3f}", f"{flagged}/4"])
        if iv:
            ratios.append(make_ratio(f"{p}: |coverage - 0.90| on test", abs(iv["coverage"] - 0.90), 0.05, "<=",
                                     text=f"{p}: 90 % conformal coverage {iv['coverage']:.3f} on {iv['n']} test subjects "
                                          f"(target 0.85-0.95), median width {iv['median_width']:.2f} y"))
        ratios.append(make_ratio(f"{p}: OOD false-positive rate on test", ood.get("flag_rate", float("nan")), 0.05, "<=",
                                 text=f"{p}: OOD flags on {ood.get('n_flagged')}/{ood.get('n')} in-distribution test scans "
                                      f"(target ≤ 5 %)"))
        missed = [k for k, v in r["ood_kinds"].items() if not v["flag"]]
        ratios.append(make_ratio(f"{p}: OOD kinds flagged", float(flagged), 4.0, ">=",
                                 text=f"{p}: OOD kinds flagged {flagged}/4" + (f" (missed: {', '.join(missed)})" if missed else "")))
        ratios.append(make_ratio(f"{p}: MAE uncorrected vs predict-the-mean", r["uncorrected"]["mae"] / r["baseline"]["mae"],
                                 1.0, "<=", text=f"{p}: MAE {r['uncorrected']['mae']:.2f} y (corrected "
                                 f"{(r['corrected'] or {}).get('mae', float('nan')):.2f} y) vs predict-the-mean "
                                 f"{r['baseline']['mae']:.2f} y"))
    extra = []
    if ensemble:
        iv = ensemble["intervals"] or {}
        members = ", ".join(f"member {k} {v:.2f}" for k, v in ensemble["members_mae"].items())
        extra.append({"title": f"2-seed ensemble ({args.presets[0]} preset), test split",
                      "headers": ["ensemble MAE", "members' MAE", "coverage (normalised 90 %)", "median width (y)"],
                      "rows": [[f"{ensemble['mae']:.2f}", members, f"{iv['coverage']:.3f}" if iv else "skipped",
                                f"{iv['median_width']:.2f}" if iv else "–"]]})
        ratios.append(make_ratio("ensemble MAE", ensemble["mae"], None,
                                 text=f"2-seed ensemble ({args.presets[0]}): MAE {ensemble['mae']:.2f} y ({members})"))
    result = make_result(
        NAME, "Trust: bias correction, conformal intervals, OOD flags per synthetic preset", argv if argv is not None else sys.argv[1:],
        quick=args.quick, config={"subjects": n, "splits": list(SPLITS), "synth_voxel_mm": SYNTH_MM, "steps": steps, "threads": args.threads, "shape": [32, 32, 32], "voxel_mm": 5,
                                  "model": "cnn3d depth 2 width 8", "presets": args.presets},
        headers=["preset", "n test", "MAE [95 % CI]", "MAE corrected", "MAE predict-mean", "r", "r corrected",
                 "coverage (90 %)", "median width (y)", "OOD FPR test", "OOD kinds flagged"],
        rows=rows, ratio=ratios[0] if ratios else None, ratios=ratios, presets=per, ensemble=ensemble, extra_tables=extra,
        notes=["Bias correction: linear regression of predicted on true age on the validation split "
               "(Beheshti 2019; de Lange & Cole 2020). A corrected metric uses the true age, so compare it with predict-the-mean.",
               "OOD kinds: noise cube, box phantom, a test scan with 50 % voxels replaced by N(0,1), an elongated smoothed "
               "ellipsoid blob ('non-human brain'), all in the model's z-scored input space."],
    )
    return finish(result, args.out or result_path(NAME, args.quick))


if __name__ == "__main__":
    raise SystemExit(main())
