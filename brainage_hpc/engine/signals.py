"""Stop requests: signal handlers that only set a flag, and agreement across ranks.

Signal semantics (contract with the sbatch scripts and the launcher):

* ``SIGUSR1`` (SLURM ``--signal``: time limit near, or a preemption warning):
  checkpoint at the next step boundary, exit :data:`PREEMPT_EXIT_CODE` (3):
  the job wants to be requeued;
* ``SIGTERM`` (``scancel``; SLURM's own preemption requeues by itself) and
  ``SIGINT`` (Ctrl-C): checkpoint, exit ``128 + signum`` (143, 130): do not requeue.
  A second Ctrl-C stops at once, without a checkpoint.

All ranks must stop at the same step, so each rank's request is combined with
the others' through a CPU-side (gloo) all-reduce that is started at one step and
read at the next: it never waits on the GPU, and the wait for the other ranks is
hidden behind one step of work. One process needs no collective at all.
"""

from __future__ import annotations

import logging
import signal
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["PREEMPT_EXIT_CODE", "STOP_SIGNALS", "StopRequests", "stop_exit_code"]

log = logging.getLogger(__name__)

# Exit code of a run that checkpointed after SIGUSR1: the sbatch script and the launcher requeue it.
PREEMPT_EXIT_CODE = 3
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# When ranks saw different signals, a stop (no requeue) wins over a requeue request.
_PRIORITY = {signal.SIGUSR1: 1, signal.SIGTERM: 2, signal.SIGINT: 3}
_BY_PRIORITY = {v: k for k, v in _PRIORITY.items()}


def stop_exit_code(signum: int) -> int:
    """Exit code after checkpointing on ``signum``: 3 for SIGUSR1 (requeue wanted), else 128 + signum."""
    return PREEMPT_EXIT_CODE if signum == signal.SIGUSR1 else 128 + int(signum)


class StopRequests:
    """This rank's stop request and the agreed one of all ranks.

    Args:
        rank: this process's rank (for log lines).
        distributed: whether a process group with other ranks exists.
        timeout_s: timeout of the CPU-side agreement group.
    """

    def __init__(self, rank: int = 0, distributed: bool = False, timeout_s: float = 600) -> None:
        self.rank = rank
        self.local = 0  # priority code of the strongest signal seen here (0: none)
        self._previous: dict[int, Any] = {}
        self._group: Any = None
        self._work: Any = None
        self._buf = torch.zeros(1, dtype=torch.int32)
        self._view = self._buf.numpy()  # reading it is plain NumPy: no tensor call, no device
        if distributed and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    # ----------------------------------------------------------------- handlers

    def install(self) -> None:
        """Route SIGUSR1/SIGTERM/SIGINT to :meth:`request` (undone by :meth:`restore`)."""
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    def restore(self) -> None:
        """Put back the previous handlers: a process that trains in-process and later forks
        (a notebook, a test runner) must not hand children a SIGTERM that only sets a flag."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.local == _PRIORITY[signal.SIGINT]:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without a checkpoint
        self.request(signum)
        hint = " (Ctrl-C again to stop without one)" if signum == signal.SIGINT else ""
        log.warning("rank %d got %s: will checkpoint at the next step boundary%s", self.rank, signal.Signals(signum).name, hint)

    def request(self, signum: int = signal.SIGUSR1) -> None:
        """Ask for a checkpoint and a stop (SIGUSR1: requeue wanted)."""
        self.local = max(self.local, _PRIORITY.get(signal.Signals(signum), 1))

    # ----------------------------------------------------------------- agreement

    def poll(self) -> int:
        """The signal all ranks agreed to stop on at this step (0: keep going).

        Every rank must call this at the same steps. With several ranks the
        answer is the request of the previous call, so a stop takes one extra step.
        """
        if self._group is None:
            return _BY_PRIORITY.get(self.local, 0)
        agreed = 0
        if self._work is not None:
            self._work.wait()
            agreed = int(self._view[0])
        self._buf.fill_(self.local)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return _BY_PRIORITY.get(agreed, 0)

    def close(self) -> None:
        """Finish the collective in flight (before the process group goes away)."""
        if self._work is not None:
            try:
                self._work.wait()
            finally:
                self._work = None
