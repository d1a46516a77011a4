"""``brainage <subcommand>``: one entry point for every step of the pipeline.

Subcommands live in ``brainage_hpc.commands.<name>`` and are imported only when
used, so ``brainage --help`` answers instantly (no torch import).
Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("brainage_hpc.commands.synth", "write a synthetic HCP-layout cohort from the MNI152 template"),
    "preprocess": ("brainage_hpc.commands.preprocess", "HCP, BIDS or CSV cohorts (skull-stripped or raw) -> sharded HDF5 + manifest"),
    "verify": ("brainage_hpc.commands.verify", "re-read shards and check checksums, shapes, finiteness"),
    "qc": ("brainage_hpc.commands.qc", "QC page of preprocessed shards: slices, mask contours, template edges, outliers"),
    "train": ("brainage_hpc.commands.train", "train a model (single process, torchrun, or SLURM srun)"),
    "calibrate": ("brainage_hpc.commands.calibrate", "fit bias correction, conformal intervals and the OOD score (calibration.json)"),
    "evaluate": ("brainage_hpc.commands.evaluate", "metrics, predictions.csv and plots for a trained run"),
    "predict": ("brainage_hpc.commands.predict", "brain age of a cohort of NIfTI scans (resumable; SLURM array tasks; merge)"),
    "gradcam": ("brainage_hpc.commands.gradcam", "3D Grad-CAM maps (NIfTI + PNG overlays)"),
    "explain": ("brainage_hpc.commands.explain", "attribution maps by several methods (Grad-CAM, occlusion, IG, SmoothGrad, CVAE counterfactual) with faithfulness"),
    "latent": ("brainage_hpc.commands.latent", "CVAE latent-space projections coloured by age"),
    "generate": ("brainage_hpc.commands.generate", "CVAE: generate brains at a given age"),
    "tabular": ("brainage_hpc.commands.tabular", "FreeSurfer-table models with permutation importance"),
    "model-summary": ("brainage_hpc.commands.model_summary", "layers, output shapes, parameters, GFLOPs"),
    "export": ("brainage_hpc.commands.export", "run (incl. DeepSpeed ZeRO) -> model.pt, ONNX or TorchScript for inference"),
    "sweep-summary": ("brainage_hpc.commands.sweep_summary", "table of a sweep's runs: overrides, best metric, steps, status"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainage",
        description="brainage-hpc: brain-age models on structural MRI, from one core to many GPU nodes.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<subcommand>")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    from brainage_hpc.config import ConfigError
    from brainage_hpc.outputs import OutputError, describe_os_error

    try:
        return int(module.run(args) or 0)
    except (ConfigError, OutputError, FileNotFoundError) as exc:
        print(f"brainage {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only file system, permissions: the file and the reason, no traceback
        logging.getLogger(__name__).debug("OSError in %s", args.command, exc_info=True)
        print(f"brainage {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
