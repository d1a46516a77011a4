"""The distributed (balanced) sampler with mid-epoch resume.

:class:`BrainSampler` hands each rank the same number of indices per epoch,
from disjoint per-rank partitions (unbalanced mode) or from per-rank streams
drawn with weights 1/class-count (balanced mode, as the seed's
ImbalancedDatasetSampler), and can resume in the middle of an epoch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

__all__ = ["BrainSampler"]

log = logging.getLogger(__name__)

_PARTITION_KEY = 0x9A27  # separates the partition stream from the per-epoch streams


class BrainSampler(Sampler[int]):
    """Distributed sampler with optional class balancing and mid-epoch resume.

    Every rank yields ``num_samples`` indices per epoch: ``ceil(n / R)``
    (``n // R`` with ``drop_last``), so DDP ranks run the same number of steps.

    * Unbalanced: the split is cut once (seeded by ``seed``, stratified by
      ``labels`` when given) into ``R`` disjoint partitions; each epoch a rank
      shuffles its own partition (seed, epoch, rank) and, when it is one short,
      pads by wrap-around *within its partition*, so no index is ever on two
      ranks. A rank's partition is fixed, so a per-rank cache (memory or GPU)
      holds only that partition.
    * Balanced: each rank draws ``num_samples`` indices of the whole split with
      replacement, weights 1/class-count, from a generator seeded by
      (seed, epoch, rank).

    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``).

    Args:
        n: size of the split.
        num_replicas: number of ranks R.
        rank: this rank, in [0, R).
        shuffle: shuffle each epoch (unbalanced mode); ``False`` keeps index order.
        seed: seed shared by all ranks.
        balanced: class-balanced sampling with replacement (needs ``labels``).
        labels: (n,) class per item; stratifies the partitions, required when balanced.
        drop_last: drop the tail instead of padding (every rank gets ``n // R``).
    """

    def __init__(
        self,
        n: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        balanced: bool = False,
        labels: Sequence[int] | np.ndarray | None = None,
        drop_last: bool = False,
    ) -> None:
        if n < 1:
            raise ValueError(f"BrainSampler needs a non-empty split, got n={n}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must lie in [0, num_replicas={num_replicas})")
        if n < num_replicas and not balanced:
            raise ValueError(f"a split of n={n} items cannot be partitioned over num_replicas={num_replicas} ranks")
        self.n, self.num_replicas, self.rank = int(n), int(num_replicas), int(rank)
        self.shuffle, self.seed, self.balanced, self.drop_last = bool(shuffle), int(seed), bool(balanced), bool(drop_last)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None and self.labels.shape != (self.n,):
            raise ValueError(f"labels must have shape ({self.n},), got {self.labels.shape}")
        if balanced and self.labels is None:
            raise ValueError("balanced=True needs labels (the class of every item)")
        self.num_samples = self.n // self.num_replicas if drop_last else math.ceil(self.n / self.num_replicas)
        self.epoch = 0
        self._start = 0  # position in the epoch where the next iteration starts (after a resume)
        self._partition = self._make_partition()
        self._probs: np.ndarray | None = None
        if balanced:
            assert self.labels is not None
            counts = np.bincount(self.labels)
            w = 1.0 / counts[self.labels]
            self._probs = w / w.sum()

    def _make_partition(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.rank, self.n, self.num_replicas)
        order = np.random.default_rng([self.seed, _PARTITION_KEY]).permutation(self.n)
        if self.labels is not None:
            order = order[np.argsort(self.labels[order], kind="stable")]  # stratified: classes dealt round-robin
        return np.sort(order[self.rank :: self.num_replicas])

    def indices_for_rank(self) -> np.ndarray:
        """Sorted indices this rank can ever yield (what a per-rank cache must hold)."""
        return np.arange(self.n) if self.balanced else self._partition.copy()

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """The full order of ``epoch`` (default: the current one) on this rank, (num_samples,)."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        if self.balanced:
            return rng.choice(self.n, size=self.num_samples, replace=True, p=self._probs)
        part = rng.permutation(self._partition) if self.shuffle else self._partition
        return np.resize(part, self.num_samples)  # wrap-around pad (or truncate with drop_last)

    @property
    def start_position(self) -> int:
        """Position in the current epoch where iteration starts (non-zero only after a resume)."""
        return self._start

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a new epoch starts from its beginning."""
        if int(epoch) != self.epoch:
            self._start = 0
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self._start :].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self, samples_consumed: int) -> dict[str, Any]:
        """Position in the epoch, for an exact resume.

        Args:
            samples_consumed: samples of the current epoch the trainer has
                *used*, counted from the start of the epoch, including those
                before a resume (``batches_done_in_epoch * micro_batch``). The
                DataLoader prefetches ahead, so the sampler cannot count itself.

        Returns:
            A rank-independent dict: rank 0's state restores every rank.
        """
        if samples_consumed < 0:
            raise ValueError(f"samples_consumed={samples_consumed} must be >= 0")
        if samples_consumed < self._start:
            log.warning(
                "samples_consumed=%d is before the resume point %d of this epoch: it must count from the start "
                "of the epoch, not from the resumed iterator (samples would be repeated)",
                samples_consumed, self._start,
            )
        return {
            "epoch": self.epoch,
            "position": min(int(samples_consumed), self.num_samples),
            "n": self.n,
            "num_replicas": self.num_replicas,
            "seed": self.seed,
            "balanced": self.balanced,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch at the saved position; later epochs are full.

        A different world size is accepted with a warning: the position is
        rescaled to the same fraction of the epoch, but the order differs.
        """
        for key in ("n", "seed", "balanced", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {key}={getattr(self, key)!r}; "
                    "the data or config changed since the checkpoint (start a fresh run or restore the config)"
                )
        position = int(state["position"])
        if int(state["num_replicas"]) != self.num_replicas:
            old = int(state["num_replicas"])
            position = position * old // self.num_replicas
            log.warning(
                "resuming with %d ranks from a checkpoint of %d ranks: the epoch continues at the same fraction "
                "(position %d), not with the exact same samples",
                self.num_replicas, old, position,
            )
        self.epoch = int(state["epoch"])
        self._start = min(max(position, 0), self.num_samples)

    def __repr__(self) -> str:
        return (
            f"BrainSampler(n={self.n}, rank={self.rank}/{self.num_replicas}, num_samples={self.num_samples}, "
            f"shuffle={self.shuffle}, balanced={self.balanced}, seed={self.seed}, epoch={self.epoch})"
        )
