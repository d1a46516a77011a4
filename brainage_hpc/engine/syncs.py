"""The training loop's only host-device synchronisation points, counted.

On a GPU every ``.item()``/``.tolist()`` of a device tensor stalls the host
until the device has caught up, so the loop keeps losses, non-finite flags and
gradient norms on the device and reads them here, once per logging interval or
checkpoint. The counter lets a test (and ``benchmarks``) assert how often.
"""

from __future__ import annotations

import torch

__all__ = ["host_values", "sync_count"]

_count = 0


def host_values(t: torch.Tensor) -> list[float]:
    """Copy a small 1-D device tensor to the host (a CPU-GPU sync; counted)."""
    global _count
    _count += 1
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def sync_count() -> int:
    """How many times :func:`host_values` ran in this process."""
    return _count
