"""``brainage train``: one loop for all models, single process or under torchrun/srun.

Exit codes: 0 completed or early-stopped; 1 diverged or failed (e.g. disk full);
2 configuration error (bad value, refused resume, run folder in use or not writable);
3 checkpointed after SIGUSR1 (requeue wanted); 128+signum (143 SIGTERM, 130 SIGINT)
checkpointed after a stop request (do not requeue).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file or built-in name (cnn_demo, cvae_hcp, ...)")
    parser.add_argument("--run-dir", required=True, help="run folder (checkpoints, tb/, metrics.jsonl); one run at a time")
    parser.add_argument(
        "--resume", default="auto",
        help="auto: newest verified checkpoint of --run-dir (default); none: start over (older checkpoints are moved "
             "to RUN_DIR/superseded/); PATH: that checkpoint (may also change train.lr and other optimisation keys)",
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.epochs=3 data.batch_size=4")


def run(args: argparse.Namespace) -> int:
    from brainage_hpc.config import load_config

    cfg = load_config(args.config, args.overrides)
    from brainage_hpc.engine.distributed import clean_exit, discover_env
    from brainage_hpc.engine.run import train_main

    env = discover_env()
    try:
        code = train_main(cfg, run_dir=args.run_dir, resume=args.resume, env=env)
    except KeyboardInterrupt:  # Ctrl-C twice, or before the loop started: no checkpoint, no traceback
        print("brainage train: interrupted: stopped without a checkpoint", file=sys.stderr)
        code = 130
    if env.is_distributed:
        clean_exit(code)  # barrier, destroy, flush, os._exit: gloo may abort in its exit path otherwise
    return code
