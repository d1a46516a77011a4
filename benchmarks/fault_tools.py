"""Fault injection primitives shared by ``benchmarks.faults`` and ``tests/reliability``.

Each one damages a file the way issue 14 did by hand, so a test and the fault
benchmark inject exactly the same fault.
"""

from __future__ import annotations

import os
import struct
import subprocess
import zipfile
from pathlib import Path

__all__ = ["can_mount", "flip_tensor_bytes", "largest_tensor_record", "mount_tmpfs", "unmount"]


def largest_tensor_record(path: str | Path) -> tuple[int, int, str]:
    """(offset of its data in the file, size, name) of the largest ``*/data/*`` record of a ``torch.save`` zip."""
    with zipfile.ZipFile(path) as z:
        records = [i for i in z.infolist() if "/data/" in i.filename]
        info = max(records, key=lambda i: i.file_size)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size, info.filename


def flip_tensor_bytes(path: str | Path, mode: str) -> str:
    """Damage the largest tensor of a checkpoint in place.

    Args:
        mode: ``"xor256"``: XOR 0xFF over 256 bytes at +1000 (D1: garbage, often huge values);
            ``"exponent"``: XOR 0x01 on the high (exponent) byte of the first 512 float32s
            (S1: finite values off by a factor of up to 2^(2^7), no NaN, no inf).

    Returns:
        The name of the damaged record.
    """
    start, size, name = largest_tensor_record(path)
    data = bytearray(Path(path).read_bytes())
    if mode == "xor256":
        for i in range(min(256, size - 1000)):
            data[start + 1000 + i] ^= 0xFF
    elif mode == "exponent":
        for k in range(min(512, size // 4)):
            data[start + 4 * k + 3] ^= 0x01
    else:
        raise ValueError(f"unknown mode {mode!r} (xor256, exponent)")
    Path(path).write_bytes(bytes(data))
    return name


def mount_tmpfs(target: str | Path, size: str, read_only: bool = False) -> bool:
    """Mount a tmpfs of ``size`` (e.g. ``"600k"``) on ``target``; False when not permitted here."""
    Path(target).mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True, text=True)
    return proc.returncode == 0


def unmount(target: str | Path) -> None:
    """Unmount ``target`` (lazily, so an open file elsewhere cannot make it fail)."""
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


def can_mount() -> bool:
    """Whether this process may mount file systems (root with CAP_SYS_ADMIN)."""
    return os.geteuid() == 0
