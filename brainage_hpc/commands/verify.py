"""``brainage verify SHARDS``: re-read every shard and check it against the manifest."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="folder written by `brainage preprocess` (holds manifest.json)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every shard matches its sha256, shape, dtype and is finite; 1 otherwise (bad shards named)."""
    from brainage_hpc.data.shard_checks import verify_shards
    from brainage_hpc.data.shards import load_manifest

    try:
        problems = verify_shards(args.shards, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"brainage verify: error: {exc}", file=sys.stderr)
        return 2
    if problems:
        for line in problems:
            print(f"brainage verify: {line}", file=sys.stderr)
        bad = sorted({p.split(":", 1)[0] for p in problems})
        print(f"brainage verify: FAILED: {len(problems)} problem(s) in {', '.join(bad)}", file=sys.stderr)
        return 1
    m = load_manifest(args.shards)
    print(f"verify: OK: {len(m.shards)} shards, {len(m.subjects)} subjects, sha256/shape/dtype/per-volume checksum/finite checked")
    return 0
