"""Thin entry point: ``python preprocessing/run_preprocess.py ARGS`` == ``brainage preprocess ARGS``.

Kept for users of the seed project's ``preprocessing/`` scripts; see
``preprocessing/README.md`` and ``brainage preprocess --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run ``brainage preprocess`` with ``argv`` (default: the command line)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout without `pip install -e`
    from brainage_hpc.cli import main as cli_main

    return cli_main(["preprocess", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
