"""Faithfulness of every attribution method on synthetic cohorts with a planted age effect (issue 18.2).

``python -m benchmarks.explain_faithfulness [--quick] [--presets default realistic]``

Per preset of ``brainage synth --difficulty``: synthesise a cohort, preprocess it to the
demo grid (48x56x48 at 3 mm), train the demo CNN (``cnn_demo``, single process, fp32,
fewer subjects/epochs than ``make demo``) and the demo CVAE, then run ``brainage explain``'s
code on the test split. Truth: ``|Pearson r|`` of intensity vs age per voxel over the
train split (``--truth auto``). Reported per preset x method: enrichment of group-map
mass in the top-10 % truth voxels (x chance), Spearman rho, deletion / insertion AOPC
(years), seconds; plus the classic Grad-CAM (pooled weights, ReLU of +age, last block)
that the fix replaced. Targets: fixed Grad-CAM >= 2x, best method >= 4x (``default``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import BENCH_OUT, finish, make_ratio, make_result, result_path, set_threads

NAME = "explain_faithfulness"
SHAPE = (48, 56, 48)


def _cli(args: list[str]) -> None:
    from brainage_hpc.cli import main

    rc = main(args)
    if rc != 0:
        raise SystemExit(f"`brainage {' '.join(args)}` exited {rc}")


def _train(config: str, shards: Path, run_dir: Path, epochs: int) -> None:
    """Train (resuming an interrupted run) unless the run already finished."""
    from brainage_hpc.config import load_config
    from brainage_hpc.demo import _finished
    from brainage_hpc.engine.run import train_main

    if _finished(run_dir):
        return
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    cfg = load_config(config, [f"data.shards={shards}", "train.backend=single", "train.precision=32", f"train.epochs={epochs}",
                               "train.progress=false"])
    if train_main(cfg, run_dir) != 0:
        raise SystemExit(f"training {config} failed (log: {run_dir})")
    for s, h in before.items():
        signal.signal(s, h)


def _classic_gradcam(run: Path, shards: Path, n: int) -> dict[str, float]:
    """Enrichment/Spearman of the pre-fix Grad-CAM (pooled, older, last block) on the same subjects and truth."""
    import numpy as np
    import torch

    from brainage_hpc.data.dataset import ShardDataset
    from brainage_hpc.data.shards import load_manifest
    from brainage_hpc.evaluation.predict import load_model
    from brainage_hpc.interpret.faithfulness import brain_mask, enrichment, spearman
    from brainage_hpc.interpret.gradcam import GradCAM3d
    from brainage_hpc.interpret.truth import truth_auto

    lm = load_model(run, "cpu")
    man = load_manifest(shards)
    ds = ShardDataset(man, "test")
    items = [ds[i] for i in range(min(n, len(ds)))]
    x = torch.stack([it["image"] for it in items])
    s = torch.stack([it["sex"] for it in items])
    mask = brain_mask(x[:, 0].numpy(), float(x[0, 0, 0, 0, 0]))
    truth = truth_auto(man, mask)
    last = f"features.{len(lm.model.features) - 1}"
    cam = GradCAM3d(lm.model, layer=last, weighting="pooled", direction="older")
    maps = np.concatenate([cam(x[i:i + 2], s[i:i + 2]) for i in range(0, len(x), 2)])
    zero = int((maps.reshape(len(maps), -1).max(1) <= 0).sum())
    g = maps.mean(0)
    return {"enrichment": enrichment(g, truth, mask), "spearman": spearman(g, truth, mask), "n_zero_maps": zero,
            "n_subjects": len(maps), "layer": last}


def run_preset(preset: str, root: Path, n_subjects: int, epochs: int, methods: list[str], n_explain: int,
               n_occlusion: int, cvae: bool, patch: int = 6, cvae_epochs: int | None = None) -> dict[str, Any]:
    from brainage_hpc.interpret.explain import run_explain

    cohort, shards, runs = root / "cohort", root / "shards", root / "runs"
    t0 = time.perf_counter()
    if not (cohort / "truth.json").exists():
        _cli(["synth", "--out", str(cohort), "--n-subjects", str(n_subjects), "--seed", "0", "--difficulty", preset,
              "--workers", "2", "--no-progress"])
    if not (shards / "manifest.json").exists():
        _cli(["preprocess", "--hcp-root", str(cohort), "--out", str(shards), "--shape", *map(str, SHAPE), "--voxel-mm", "3.0",
              "--shard-size", "64", "--workers", "2"])
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    _train("cnn_demo", shards, runs / "cnn", epochs)
    if cvae:
        _train("cvae_demo", shards, runs / "cvae", cvae_epochs or epochs)
    t_train = time.perf_counter() - t0
    common = dict(truth="auto", max_subjects=n_explain, occlusion_subjects=n_occlusion, curve_subjects=2, patch=patch)
    res = run_explain(runs / "cnn", shards, root / "explain_cnn", methods=methods, **common)["methods"]
    if cvae:
        res.update(run_explain(runs / "cvae", shards, root / "explain_cvae", methods=["counterfactual"], **common)["methods"])
    for r in res.values():
        r.pop("curves", None)
    classic = _classic_gradcam(runs / "cnn", shards, n_explain)
    import json

    mae = None
    ev = root / "eval_cnn" / "metrics.json"
    if not ev.exists():
        _cli(["evaluate", "--run-dir", str(runs / "cnn"), "--shards", str(shards), "--split", "test", "--out", str(ev.parent)])
    mae = json.loads(ev.read_text())["regression"]["mae"]
    return {"methods": res, "gradcam_classic": classic, "cnn_test_mae": mae, "seconds_data": round(t_data, 1),
            "seconds_train": round(t_train, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.explain_faithfulness", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: default preset, 24 subjects, 1 epoch, 2 subjects explained")
    p.add_argument("--presets", nargs="+", default=["default", "realistic"])
    p.add_argument("--n-subjects", type=int, default=120)
    p.add_argument("--epochs", type=int, default=10, help="CNN epochs")
    p.add_argument("--cvae-epochs", type=int, default=None, help="CVAE epochs (default: --epochs)")
    p.add_argument("--explain-subjects", type=int, default=8)
    p.add_argument("--occlusion-subjects", type=int, default=2)
    p.add_argument("--no-cvae", action="store_true", help="skip the CVAE and its counterfactual maps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=BENCH_OUT / NAME, help="cohorts, shards, runs (cached between runs)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/, quick: bench_out/quick/)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    n, ep, k = (24, 1, 2) if args.quick else (args.n_subjects, args.epochs, args.explain_subjects)
    presets = ["default"] if args.quick else args.presets
    patch = 12 if args.quick else 6
    methods = ["gradcam", "occlusion", "ig", "smoothgrad"]
    per: dict[str, Any] = {}
    rows = []
    for preset in presets:
        t0 = time.perf_counter()
        r = run_preset(preset, args.work / f"{preset}{'-quick' if args.quick else ''}", n, ep, methods, k, min(args.occlusion_subjects, k), not args.no_cvae, patch,
                       1 if args.quick else args.cvae_epochs)
        r["seconds_total"] = round(time.perf_counter() - t0, 1)
        per[preset] = r
        c = r["gradcam_classic"]
        rows.append([preset, "gradcam (classic, before the fix)", f"{c['enrichment']:.2f}", f"{c['spearman']:.2f}", "", "",
                     f"{c['n_zero_maps']}/{c['n_subjects']}", ""])
        for m, x in r["methods"].items():
            rows.append([preset, m, f"{x.get('enrichment', float('nan')):.2f}", f"{x.get('spearman', float('nan')):.2f}",
                         f"{x.get('aopc_deletion', float('nan')):.2f}", f"{x.get('aopc_insertion', float('nan')):.2f}",
                         f"{x['n_zero_maps']}/{x['n_subjects']}", f"{x['seconds']:.0f}"])
        print(f"{preset}: done in {r['seconds_total']:.0f} s", file=sys.stderr, flush=True)
    ratios = []
    if "default" in per:
        d = per["default"]["methods"]
        ratios.append(make_ratio("default preset: fixed Grad-CAM enrichment", d["gradcam"]["enrichment"], 2.0, ">=",
                                 text=f"default preset: Grad-CAM enrichment {d['gradcam']['enrichment']:.2f}x "
                                      f"(classic {per['default']['gradcam_classic']['enrichment']:.2f}x; target ≥ 2x)"))
        best = max(d, key=lambda m: d[m].get("enrichment", 0.0))
        ratios.append(make_ratio("default preset: best method enrichment", d[best]["enrichment"], 4.0, ">=",
                                 text=f"default preset: best method {best} enrichment {d[best]['enrichment']:.2f}x (target ≥ 4x)"))
    notes = ["truth: |Pearson r| of intensity vs age per voxel over the train split (brainage explain --truth auto); "
             "enrichment = share of group-map mass in the top-10 % truth voxels inside the brain / 0.1 (1 = chance)",
             "AOPC: mean |change of predicted age| (y) deleting the top half of the brain in map order (deletion) / "
             "mean gap closed inserting it into a blank brain (insertion); random-order deletion in the JSON"]
    notes += [f"{p_}: CNN test MAE {r['cnn_test_mae']:.2f} y; data {r['seconds_data']:.0f} s, training {r['seconds_train']:.0f} s, "
              f"total {r['seconds_total']:.0f} s" for p_, r in per.items()]
    result = make_result(
        NAME, "Explanation faithfulness per method on synthetic cohorts (planted age effect)", argv, quick=args.quick,
        config={"n_subjects": n, "epochs": ep, "cvae_epochs": 1 if args.quick else (args.cvae_epochs or ep), "shape": list(SHAPE), "voxel_mm": 3.0, "explain_subjects": k,
                "occlusion_subjects": min(args.occlusion_subjects, k), "occlusion_patch": patch, "threads": args.threads},
        headers=["preset", "method", "enrichment (x)", "Spearman rho", "deletion AOPC (y)", "insertion AOPC (y)", "zero maps", "s"],
        rows=rows, ratio=ratios[0] if ratios else None, ratios=ratios, notes=notes, presets=per,
    )
    return finish(result, args.out or result_path(NAME, args.quick))


if __name__ == "__main__":
    sys.exit(main())
