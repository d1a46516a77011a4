"""``brainage model-summary``: layers, output shapes, parameters and GFLOPs of a configured model."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (path or built-in name, e.g. cnn_hcp)")
    parser.add_argument(
        "--in-shape",
        type=int,
        nargs=3,
        metavar=("D", "H", "W"),
        default=None,
        help="input volume shape (default: data.shape of the config)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. model.params.width=16"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from brainage_hpc.config import load_config
    from brainage_hpc.models.registry import build_model
    from brainage_hpc.models.summary import summarize

    cfg = load_config(args.config, overrides=list(args.overrides or []))
    shape = tuple(args.in_shape) if args.in_shape else tuple(cfg.data.shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--in-shape / data.shape must be three positive ints (D H W), got {list(shape)}")
    model_cfg = cfg.model
    # Shapes and FLOPs need no real compute: build on the meta device (no memory, instant at any size).
    # torch.compile and channels_last change neither, so they are left out here.
    plain = type(model_cfg)(name=model_cfg.name, task=model_cfg.task, params=dict(model_cfg.params))
    try:
        with torch.device("meta"):
            summary = summarize(build_model(plain, shape), shape)
    except (NotImplementedError, RuntimeError):
        summary = summarize(build_model(plain, shape), shape)
    print(f"model: {model_cfg.name} ({model_cfg.task})")
    print(summary.format())
    return 0
