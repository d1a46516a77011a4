"""One run per run folder: an exclusive ``flock`` held by rank 0 while it trains.

Two trainings in one folder overwrite each other's checkpoints and interleave
their logs (issue 14, S6). The lock is an open file description with
``fcntl.flock(LOCK_EX)``: the kernel drops it when the process dies, ``kill -9``
included, so a crashed run never leaves a stale lock behind. The holder writes
its host and pid into the file so the refusal can name them. ``flock`` works
on local disks and on NFS (Linux emulates it with POSIX locks); Lustre needs
the ``flock`` mount option.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from brainage_hpc.outputs import OutputError

__all__ = ["LOCK_NAME", "RunFolderBusy", "RunLock"]

LOCK_NAME = ".lock"


class RunFolderBusy(OutputError):
    """Another process trains in this run folder."""


class RunLock:
    """Exclusive lock on a run folder (``with RunLock(run_dir): ...`` or acquire/release)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunFolderBusy` naming the holder's host and pid."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise RunFolderBusy(
                f"run folder {self.run_dir} is in use by {holder} (lock {self.path}); wait for that run to end "
                "or choose another --run-dir"
            ) from None
        except OSError:
            os.close(fd)
            raise
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return f"pid {info['pid']} on host {info['host']} (since {info.get('since', '?')})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process (host and pid not written yet)"

    def release(self) -> None:
        """Drop the lock (the file stays; it is only a handle)."""
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
