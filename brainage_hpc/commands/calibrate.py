"""``brainage calibrate``: fit bias correction, conformal intervals and the OOD score; write calibration.json."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", "--checkpoint", dest="run_dir", nargs="+", required=True,
                        help="run folder; several run folders or a sweep folder calibrate their ensemble")
    parser.add_argument("--shards", required=True, help="shard folder of the run (train and validation splits)")
    parser.add_argument("--out", default=None,
                        help="calibration file (default: RUN/calibration.json; for several runs required "
                             "unless one sweep folder is given: SWEEP/calibration.json)")
    parser.add_argument("--batch-size", type=int, default=4, help="volumes per forward pass (default: 4)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 with calibration.json written; 2 with a one-line error."""
    from brainage_hpc.config import ConfigError
    from brainage_hpc.data.shards import load_manifest
    from brainage_hpc.evaluation.calibration import write_calibration
    from brainage_hpc.evaluation.ensemble import load_models
    from brainage_hpc.evaluation.evaluate import fit_run_calibration

    try:
        lm = load_models(args.run_dir, args.device, use_calibration=False)  # refit, never reuse the old one
        if args.out:
            out = Path(args.out)
        elif len(args.run_dir) == 1 and Path(args.run_dir[0]).is_dir():
            out = Path(args.run_dir[0]) / "calibration.json"
        else:
            raise ConfigError("--out is required to calibrate several runs or a model file")
        manifest = load_manifest(args.shards)
        if tuple(manifest.shape) != tuple(lm.shape):
            raise ValueError(f"{manifest.root}: shards have shape {tuple(manifest.shape)}, the model was trained on {lm.shape}")
        cal = fit_run_calibration(lm, manifest, args.batch_size)
        write_calibration(out, cal)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc).strip("'")) from None
    parts = []
    for key, label in (("bias", "bias"), ("conformal", "conformal"), ("ood", "OOD")):
        sec = cal[key]
        if "skipped" in sec:
            parts.append(f"{label} skipped ({sec['skipped']})")
        elif key == "bias":
            parts.append(f"bias pred = {sec['alpha']:.3f} age + {sec['beta']:.2f}")
        elif key == "conformal":
            parts.append(f"90 % interval +-{sec['q']:.2f}{' sd' if sec['normalised'] else ' y'} (n={sec['n']})")
        else:
            parts.append(f"OOD threshold {sec['threshold']:.2f} (val rank {sec['rank']} of {sec['n_val']})")
    print(f"calibrate: {out}: {'; '.join(parts)}")
    return 0
