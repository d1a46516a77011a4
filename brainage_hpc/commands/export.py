"""``brainage export``: a run (plain or DeepSpeed ZeRO) -> one portable inference file.

    brainage export --run-dir checkpoints/sfcn                        # model.pt (PyTorch)
    brainage export --run-dir checkpoints/sfcn --format onnx          # model.onnx (ONNX Runtime)
    brainage export --run-dir checkpoints/sfcn --format torchscript   # model.ts
    brainage predict --checkpoint checkpoints/sfcn/model.onnx --input scans/ --out pred.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="run folder written by `brainage train` (or a model.pt)")
    parser.add_argument("--which", choices=["best", "last"], default="best", help="checkpoint of the run (pt format)")
    parser.add_argument("--format", choices=["pt", "onnx", "torchscript"], default="pt",
                        help="pt: plain state_dict bundle; onnx: ONNX Runtime; torchscript: torch.jit (default pt)")
    parser.add_argument("--out", default=None, help="output file (default: RUN_DIR/model.pt, .onnx or .ts)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 written (ONNX/TorchScript checked against PyTorch on random inputs); 1 parity off; 2 bad input or output."""
    from brainage_hpc.outputs import check_output_file

    out = check_output_file(args.out, "--out") if args.out else None
    if args.format == "pt":
        from brainage_hpc.engine.checkpoint import export_state_dict

        source = Path(args.run_dir)
        if source.is_dir():
            path = export_state_dict(source, out, which=args.which)
            _add_calibration(path, source)
            print(f"wrote {path}")
            return 0
    from brainage_hpc.evaluation.exported import export_model, parity_check
    from brainage_hpc.evaluation.predict import load_model

    try:
        path, meta = export_model(args.run_dir, out, args.format)
        if args.format == "pt":
            print(f"wrote {path}")
            return 0
        delta = parity_check(load_model(args.run_dir, "cpu"), load_model(path))
    except ValueError as exc:
        from brainage_hpc.config import ConfigError

        raise ConfigError(str(exc)) from None
    extras = [k for k in ("fingerprint", "calibration") if meta.get(k)]
    print(f"wrote {path} ({args.format}, input (B, 1, {', '.join(map(str, meta['shape']))}), outputs {', '.join(meta['outputs'])}"
          f"{', with ' + ' and '.join(extras) if extras else ''}); max |delta age| vs PyTorch on random inputs: {delta:.2e} y")
    if not delta <= 0.01:
        print(f"brainage export: error: {path} differs from the PyTorch model by {delta:.3f} y (> 0.01 y); do not use it",
              file=sys.stderr)
        return 1
    return 0


def _add_calibration(path: Path, run_dir: Path) -> None:
    """Put the run's calibration.json (contract 7) into the exported ``model.pt`` bundle (re-sealed)."""
    from brainage_hpc.engine.checkpoint import read_checkpoint, save_sealed
    from brainage_hpc.evaluation.predict import read_calibration

    calibration = read_calibration(run_dir)
    if calibration is None:
        return
    bundle = read_checkpoint(path)  # verified; the digest is dropped and written anew below
    bundle["calibration"] = calibration
    save_sealed(bundle, path)
