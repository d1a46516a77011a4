"""The files of a cohort run: the plan, one append-only part file per task, their locks.

Layout, next to the output CSV ``OUT``::

    OUT.parts/plan.json                      the scans owed, in order, and the task count K
    OUT.parts/part-00002-of-00004.jsonl      records written by task 2 of 4 (one JSON line each)
    OUT.parts/part-00002-of-00004.jsonl.lock who writes it (host pid); flock'ed while it runs

A record is appended with one ``write`` on an ``O_APPEND`` descriptor and fsync'ed
per batch, and carries a CRC of its own text: a ``kill -9`` loses at most the scans in
flight, and a torn or damaged line is dropped on reading (the scan is then scored
again) instead of being trusted. Records are never rewritten, so a rerun, a requeued
array task and the merge can all read them while a writer appends.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import re
import socket
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from brainage_hpc.evaluation.scans import Failure, ScanRecord
from brainage_hpc.outputs import OutputError

__all__ = [
    "PLAN_NAME",
    "PartWriter",
    "Plan",
    "iter_part_files",
    "part_name",
    "parts_dir_for",
    "read_plan",
    "read_records",
    "write_plan",
]

log = logging.getLogger(__name__)
PLAN_NAME = "plan.json"
PLAN_VERSION = 1
_PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.jsonl$")


def parts_dir_for(out_csv: str | Path) -> Path:
    """``OUT.parts`` next to the output CSV."""
    out_csv = Path(out_csv)
    return out_csv.with_name(out_csv.name + ".parts")


def part_name(task: int, n_tasks: int) -> str:
    """``part-00002-of-00004.jsonl`` (task ids from 0)."""
    return f"part-{task:05d}-of-{n_tasks:05d}.jsonl"


@dataclass
class Plan:
    """The scans a cohort run owes an answer for, and how they are split into tasks.

    Task ``i`` of ``K`` scores the contiguous slice ``[i*N//K, (i+1)*N//K)`` of ``scans``.
    """

    scans: list[ScanRecord]
    failures: list[Failure] = field(default_factory=list)
    tasks: int = 1
    inputs: list[str] = field(default_factory=list)
    created: str = ""
    model: str = ""  # digest of the weights that score this plan (see evaluation.exported.model_digest)

    def task_range(self, task: int) -> range:
        """Indices into ``scans`` that task ``task`` scores."""
        if not 0 <= task < self.tasks:
            raise ValueError(f"task id {task} is outside 0..{self.tasks - 1} (the plan has {self.tasks} tasks)")
        n = len(self.scans)
        return range(task * n // self.tasks, (task + 1) * n // self.tasks)

    def task_of(self, index: int) -> int:
        """Which task scores ``scans[index]``."""
        n = len(self.scans)
        return next(t for t in range(self.tasks) if (t + 1) * n // self.tasks > index)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "created": self.created,
            "tasks": self.tasks,
            "inputs": list(self.inputs),
            "model": self.model,
            "scans": [s.to_dict() for s in self.scans],
            "failures": [asdict(f) for f in self.failures],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(
            scans=[_record(s) for s in data["scans"]],
            failures=[Failure(str(f["subject"]), str(f["file"]), str(f["reason"])) for f in data.get("failures", [])],
            tasks=int(data["tasks"]),
            inputs=[str(i) for i in data.get("inputs", [])],
            created=str(data.get("created", "")),
            model=str(data.get("model", "")),
        )


def _record(data: dict[str, Any]) -> ScanRecord:
    names = ScanRecord.__dataclass_fields__
    return ScanRecord(**{k: v for k, v in data.items() if k in names})


def read_plan(parts_dir: Path) -> Plan | None:
    """The plan in ``parts_dir``, or None when there is none.

    Raises:
        ValueError: the plan exists but is damaged (one line naming it).
    """
    path = parts_dir / PLAN_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        plan = Plan.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: damaged plan ({type(exc).__name__}: {exc}); delete it to plan the run again") from None
    if plan.tasks < 1:
        raise ValueError(f"{path}: damaged plan (tasks={plan.tasks})")
    return plan


def write_plan(parts_dir: Path, plan: Plan, replace: bool) -> Plan:
    """Write ``plan`` atomically; with ``replace=False`` keep (and return) a plan that is already there.

    Array tasks start together and each may try to write the plan: the first one to
    link its file into place wins, the others read the winner's, so all agree.
    """
    plan.created = plan.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    path = parts_dir / PLAN_NAME
    fd, tmp = tempfile.mkstemp(prefix=".plan-", suffix=".tmp", dir=parts_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(plan.to_dict(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
            return plan
        try:
            os.link(tmp, path)
        except FileExistsError:
            existing = read_plan(parts_dir)
            assert existing is not None  # it exists: link said so
            return existing
        return plan
    finally:
        Path(tmp).unlink(missing_ok=True)


def _crc(text: str) -> str:
    return f"{zlib.crc32(text.encode('utf-8')):08x}"


def _encode(record: dict[str, Any]) -> str:
    body = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return json.dumps({"crc": _crc(body), "r": json.loads(body)}, sort_keys=True, separators=(",", ":")) + "\n"


def _decode(line: str) -> dict[str, Any] | None:
    try:
        outer = json.loads(line)
        record = outer["r"]
        body = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
        if not isinstance(record, dict) or outer.get("crc") != _crc(body):
            return None
        return record
    except (ValueError, KeyError, TypeError):
        return None


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of one part file, in order, and the number of lines dropped (torn or damaged).

    A missing file has no records.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    records: list[dict[str, Any]] = []
    dropped = 0
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:  # last line without its newline: a write that never finished
        lines.pop()
        dropped += 1
    for raw in lines:
        try:
            rec = _decode(raw.decode("utf-8"))
        except UnicodeDecodeError:
            rec = None
        if rec is None:
            dropped += 1
        else:
            records.append(rec)
    return records, dropped


def iter_part_files(parts_dir: Path) -> Iterator[tuple[int, int, Path]]:
    """(task, n_tasks, path) of every part file in the folder, sorted by name."""
    if not parts_dir.is_dir():
        return
    for p in sorted(parts_dir.iterdir()):
        m = _PART_RE.match(p.name)
        if m:
            yield int(m.group(1)), int(m.group(2)), p


class PartWriter:
    """Appends records to one part file; holds its lock so no second process writes it.

    Raises:
        OutputError: another process holds the part (names host and pid), or the folder is not writable.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        lock_path = path.with_name(path.name + ".lock")
        try:
            self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{lock_path}: cannot create the lock file ({exc.strerror})") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(self._lock_fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(self._lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise OutputError(
                    f"{path}: another brainage predict ({holder}) is writing this part; wait for it, "
                    "or use another --out"
                ) from None
            raise
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        self._drop_torn_tail()
        self._fd: int | None = None  # the part file is created by the first append

    def _drop_torn_tail(self) -> None:
        """Cut a last line that has no newline (a write killed half-way), so appends start clean."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0:
            return
        with open(self.path, "rb+") as fh:
            fh.seek(max(0, size - 65536))
            tail = fh.read()
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            keep = size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail))
            log.warning("%s: dropping a torn last record (%d bytes)", self.path, size - keep)
            fh.truncate(keep)

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records (one ``write``, then ``fsync``): all of them land, or none in a readable form."""
        data = "".join(_encode(r) for r in records).encode("utf-8")
        if not data:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the part and release the lock."""
        for fd in (getattr(self, "_fd", None), getattr(self, "_lock_fd", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fd = None
        self._lock_fd = None  # type: ignore[assignment]

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
