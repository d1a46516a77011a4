"""Output paths checked before any work starts: one line naming the path and the problem.

A command that trains for an hour and then fails to write its result has wasted the
hour; a traceback from deep inside ``torch.save`` or ``matplotlib`` does not say which
argument was wrong. Every command checks its output folder or file up front with these.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

__all__ = ["OutputError", "describe_os_error", "prepare_output_dir", "check_output_file"]


class OutputError(ValueError):
    """An output path that cannot be written, reported as one line."""


def describe_os_error(exc: OSError, path: str | Path | None = None) -> str:
    """``PATH: No space left on device (ENOSPC)``: the file and the problem, one line."""
    where = exc.filename or path or "?"
    code = errno.errorcode.get(exc.errno or 0, "")
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {reason}" + (f" ({code})" if code else "")


def _probe_writable(folder: Path, what: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    except OSError as exc:
        raise OutputError(f"{what} {folder}: cannot write there ({describe_os_error(exc, folder).split(': ', 1)[-1]})") from None
    os.close(fd)
    os.unlink(tmp)


def prepare_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` (and parents) if needed and check that files can be written in it.

    Raises:
        OutputError: ``path`` (or a parent) is a file, or the folder is read-only / full / not ours.
    """
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"{what} {path}: {parent} exists and is not a folder")
        if parent.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{what} {path}: cannot create it ({describe_os_error(exc, path).split(': ', 1)[-1]})") from None
    _probe_writable(path, what)
    return path


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """Check that ``path`` can be written as a file (its folder is created if missing).

    Raises:
        OutputError: ``path`` is a folder, or its folder cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path}: is a folder, expected a file name")
    prepare_output_dir(path.parent if str(path.parent) else Path("."), what=f"folder of {what}")
    return path
