"""``make demo``: the whole pipeline on a synthetic cohort, on CPU, in minutes.

synthetic HCP cohort -> sharded HDF5 -> seed CNN (regression) and CVAE trained
with 2-process DDP and bf16 autocast -> evaluation, Grad-CAM, explanations with their
faithfulness (Grad-CAM, occlusion, IG, SmoothGrad, CVAE counterfactual), CVAE latent space
and generation -> FreeSurfer-table model -> ``demo_out/report.md``.

Every stage skips work whose output already exists, so a second run (or a run
after an interruption) picks up where the last one stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "run_demo"]

N_SUBJECTS = 200
SHAPE = (48, 56, 48)
VOXEL_MM = 3.0


def _stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def _done(t0: float, timings: dict[str, float], key: str) -> None:
    timings[key] = round(time.perf_counter() - t0, 1)
    print(f"--- {key}: {timings[key]:.0f} s", flush=True)


def _cli(args: list[str]) -> None:
    from brainage_hpc.cli import main

    rc = main(args)
    if rc != 0:
        raise SystemExit(f"demo: `brainage {' '.join(args)}` failed with exit code {rc}")


def _finished(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return False
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return any(e.get("event") == "end" and e.get("outcome") in ("completed", "early_stopped") for e in events)


def _train(config: str, run_dir: Path, shards: Path, nproc: int, extra: list[str]) -> None:
    from brainage_hpc.engine.distributed import free_port

    if _finished(run_dir):
        print(f"{run_dir} already trained: skipping (delete it to retrain)")
        return
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
        "-m", "brainage_hpc.cli", "train", "--config", config, "--run-dir", str(run_dir), "--resume", "auto",
        f"data.shards={shards}", "train.backend=ddp", "train.precision=bf16-mixed", *extra,
    ]
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise SystemExit(f"demo: training {config} failed with exit code {rc} (log: {run_dir / 'train.log'})")


def _calibrate(run_dir: Path, shards: Path) -> None:
    """Bias correction, conformal intervals and OOD score of the CNN (run_dir/calibration.json), used by evaluate."""
    _cli(["calibrate", "--run-dir", str(run_dir), "--shards", str(shards)])


def run_demo(out: Path, n_subjects: int = N_SUBJECTS, nproc: int = 2, epochs: int | None = None) -> Path:
    """Run every stage into ``out`` and return the path of report.md."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cohort, shards, runs = out / "cohort", out / "shards", out / "runs"
    timings: dict[str, float] = {}

    t0 = _stage(f"1/7 synthetic HCP cohort ({n_subjects} subjects, 2 mm)")
    if not (cohort / "truth.json").exists():
        _cli(["synth", "--out", str(cohort), "--n-subjects", str(n_subjects), "--seed", "0", "--workers", "2"])
    _done(t0, timings, "synth")

    t0 = _stage(f"2/7 preprocessing to HDF5 shards ({'x'.join(map(str, SHAPE))} at {VOXEL_MM} mm)")
    if not (shards / "manifest.json").exists():
        _cli(["preprocess", "--hcp-root", str(cohort), "--out", str(shards), "--shape", *map(str, SHAPE),
              "--voxel-mm", str(VOXEL_MM), "--shard-size", "64", "--workers", "2"])
    _cli(["verify", str(shards)])
    _done(t0, timings, "preprocess")

    ep = [f"train.epochs={epochs}"] if epochs else []
    t0 = _stage(f"3/7 seed 3D CNN, age regression ({nproc}-process DDP, bf16 autocast)")
    _train("cnn_demo", runs / "cnn", shards, nproc, ep)
    _done(t0, timings, "train_cnn")

    t0 = _stage(f"4/7 conditional VAE ({nproc}-process DDP, bf16 autocast)")
    _train("cvae_demo", runs / "cvae", shards, nproc, ep)
    _done(t0, timings, "train_cvae")

    t0 = _stage("5/7 evaluation and Grad-CAM")
    _calibrate(runs / "cnn", shards)
    for name in ("cnn", "cvae"):
        _cli(["evaluate", "--run-dir", str(runs / name), "--shards", str(shards), "--split", "test", "--out", str(out / f"eval_{name}")])
    _cli(["gradcam", "--run-dir", str(runs / "cnn"), "--shards", str(shards), "--split", "test", "--out", str(out / "gradcam")])
    _done(t0, timings, "evaluate")

    t0 = _stage("5b/7 explanations and their faithfulness (truth: |r| of intensity vs age over the train split)")
    few = ["--max-subjects", "8", "--occlusion-subjects", "2", "--curve-subjects", "1", "--patch", "8"]
    if not (out / "explain" / "faithfulness.json").exists():
        _cli(["explain", "--run-dir", str(runs / "cnn"), "--shards", str(shards), "--method", "gradcam", "occlusion", "ig",
              "smoothgrad", *few, "--out", str(out / "explain")])
    if not (out / "explain_cvae" / "faithfulness.json").exists():
        _cli(["explain", "--run-dir", str(runs / "cvae"), "--shards", str(shards), "--method", "counterfactual", *few,
              "--out", str(out / "explain_cvae")])
    _done(t0, timings, "explain")

    t0 = _stage("6/7 CVAE latent space and age-conditioned generation")
    _cli(["latent", "--run-dir", str(runs / "cvae"), "--shards", str(shards), "--split", "test", "--out", str(out / "latent")])
    _cli(["generate", "--run-dir", str(runs / "cvae"), "--age", "22", "29", "37", "--sex", "F", "--n", "4", "--seed", "0",
          "--out", str(out / "generate")])
    _done(t0, timings, "latent")

    t0 = _stage("7/7 FreeSurfer-table model (HistGradientBoosting, permutation importance)")
    _cli(["tabular", "--table", str(cohort / "freesurfer.csv"), "--hcp-root", str(cohort), "--manifest",
          str(shards / "manifest.json"), "--task", "regress", "--out", str(out / "tabular")])
    _done(t0, timings, "tabular")

    from brainage_hpc.demo_report import write_demo_report

    report = write_demo_report(out, timings)
    print(f"\nreport: {report}")
    print(f"tensorboard: {Path(sys.executable).parent / 'tensorboard'} --logdir {runs}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m brainage_hpc.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", type=Path)
    p.add_argument("--n-subjects", type=int, default=N_SUBJECTS)
    p.add_argument("--nproc", type=int, default=2, help="DDP processes")
    p.add_argument("--epochs", type=int, default=None, help="override the demo configs' epochs")
    args = p.parse_args(argv)
    report = run_demo(args.out, args.n_subjects, args.nproc, args.epochs)
    summary: dict[str, Any] = json.loads((args.out / "summary.json").read_text())
    ok = summary.get("mae_ratio_ok", False)
    print(f"CNN test MAE {summary.get('cnn_mae'):.2f} y vs predict-the-mean {summary.get('mean_mae'):.2f} y "
          f"({summary.get('mae_ratio'):.0%}; target <= 50 %: {'met' if ok else 'NOT met'})")
    return 0 if report.exists() else 1


if __name__ == "__main__":
    sys.exit(main())
