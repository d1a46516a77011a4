"""``brainage train``: one loop for all models, single process or under torchrun/srun."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file or built-in name (cnn_demo, cvae_hcp, ...)")
    parser.add_argument("--run-dir", required=True, help="run folder (checkpoints, tb/, metrics.jsonl)")
    parser.add_argument("--resume", default="auto", help="auto | none | PATH to a checkpoint (default: auto)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.epochs=3 data.batch_size=4")


def run(args: argparse.Namespace) -> int:
    from brainage_hpc.config import load_config

    cfg = load_config(args.config, args.overrides)
    from brainage_hpc.engine.distributed import clean_exit, discover_env
    from brainage_hpc.engine.run import train_main

    env = discover_env()
    code = train_main(cfg, run_dir=args.run_dir, resume=args.resume, env=env)
    if env.is_distributed:
        clean_exit(code)  # barrier, destroy, flush, os._exit: gloo may abort in its exit path otherwise
    return code
