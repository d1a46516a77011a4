"""BrainSampler: disjoint per-rank partitions, balancing, exact mid-epoch resume."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from brainage_hpc.data.dataset import BrainSampler

REPO = Path(__file__).resolve().parents[2]

_RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from brainage_hpc.data.dataset import BrainSampler
    rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    result = {}
    for n in (40, 41):
        s = BrainSampler(n, num_replicas=world, rank=rank, seed=7, labels=[i % 3 for i in range(n)])
        epochs = {}
        for e in range(3):
            s.set_epoch(e)
            epochs[e] = list(s)
        result[n] = {"epochs": epochs, "held": s.indices_for_rank().tolist()}
    json.dump(result, open(out, "w"))
    """
)


def test_two_rank_processes_cover_split_disjointly(tmp_path: Path) -> None:
    """2 ranks as real processes: per epoch, union = split, no index on both ranks, equal counts."""
    world = 2
    procs = [
        subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(r), str(world), str(tmp_path / f"rank{r}.json")], cwd=REPO)
        for r in range(world)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for n in (40, 41):
        ranks = [res[str(n)] for res in results]
        orders = []
        for e in ("0", "1", "2"):
            per_rank = [r["epochs"][e] for r in ranks]
            assert len(per_rank[0]) == len(per_rank[1]) == -(-n // world)  # same steps on every rank (DDP)
            sets = [set(x) for x in per_rank]
            assert sets[0] | sets[1] == set(range(n))
            assert not sets[0] & sets[1]
            for r in range(world):  # padding only repeats the rank's own indices
                assert sets[r] <= set(ranks[r]["held"])
            orders.append(per_rank[0])
        assert orders[0] != orders[1]  # reshuffled each epoch


def test_counts_padding_and_drop_last() -> None:
    for n, world in [(10, 3), (11, 4), (7, 1), (5, 5)]:
        for drop_last in (False, True):
            samplers = [BrainSampler(n, world, r, seed=1, drop_last=drop_last) for r in range(world)]
            expect = n // world if drop_last else -(-n // world)
            assert all(len(s) == len(list(s)) == expect for s in samplers)
            held = [set(s.indices_for_rank().tolist()) for s in samplers]
            assert set().union(*held) == set(range(n))
            assert sum(len(h) for h in held) == n


def test_no_shuffle_is_strided_order() -> None:
    s = BrainSampler(10, 3, 1, shuffle=False)
    assert list(s) == [1, 4, 7, 1]  # padded by wrap-around within the rank's own indices


def test_partitions_are_stratified() -> None:
    labels = np.array([0] * 30 + [1] * 60 + [2] * 10)
    for r in range(2):
        held = BrainSampler(100, 2, r, seed=3, labels=labels).indices_for_rank()
        assert np.bincount(labels[held], minlength=3).tolist() == [15, 30, 5]


def test_balanced_draws_classes_equally() -> None:
    """Weights 1/class-count: 2000 draws (2 ranks x 5 epochs) within +-10 % of equal."""
    rng = np.random.default_rng(0)
    labels = rng.choice(4, size=400, p=[0.5, 0.3, 0.15, 0.05])
    draws, streams = [], []
    for rank in range(2):
        s = BrainSampler(400, 2, rank, seed=11, balanced=True, labels=labels)
        assert len(s) == 200  # same count as unbalanced mode
        for e in range(5):
            s.set_epoch(e)
            idx = list(s)
            draws.extend(idx)
            streams.append(idx)
    assert len(draws) == 2000
    counts = np.bincount(labels[draws], minlength=4)
    assert np.all(np.abs(counts - 500) <= 50), counts.tolist()
    assert streams[0] != streams[5]  # each rank draws its own stream
    # the seeded stream is reproducible
    again = BrainSampler(400, 2, 1, seed=11, balanced=True, labels=labels)
    again.set_epoch(0)
    assert list(again) == streams[5]


@pytest.mark.parametrize("balanced", [False, True])
def test_resume_mid_epoch_gives_the_remaining_order(balanced: bool) -> None:
    labels = np.arange(37) % 4
    kw = dict(num_replicas=2, rank=1, seed=5, balanced=balanced, labels=labels)
    ref = BrainSampler(37, **kw)
    ref.set_epoch(3)
    full3 = list(ref)
    ref.set_epoch(4)
    full4 = list(ref)

    run = BrainSampler(37, **kw)
    run.set_epoch(3)
    consumed = 7
    state = run.state_dict(samples_consumed=consumed)
    assert state["epoch"] == 3 and state["position"] == consumed

    resumed = BrainSampler(37, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON/torch.save round trip
    resumed.set_epoch(3)  # the trainer re-selects the current epoch: still resumed
    assert list(resumed) == full3[consumed:]
    # a second preemption: samples_consumed counts from the start of the epoch
    state2 = resumed.state_dict(samples_consumed=consumed + 5)
    assert state2["position"] == consumed + 5
    again = BrainSampler(37, **kw)
    again.load_state_dict(state2)
    assert list(again) == full3[consumed + 5 :]
    again.set_epoch(4)  # following epochs are full
    assert list(again) == full4


def test_resume_with_a_prefetching_dataloader() -> None:
    """The trainer counts consumed batches; the DataLoader has already pulled more indices."""
    ds = list(range(50))
    s = BrainSampler(50, 1, 0, seed=2)
    s.set_epoch(1)
    loader = DataLoader(ds, batch_size=4, sampler=s, drop_last=True, num_workers=2, prefetch_factor=4)
    seen = []
    it = iter(loader)
    for _ in range(3):
        seen.append(next(it).tolist())
    state = s.state_dict(samples_consumed=3 * 4)
    del it
    s2 = BrainSampler(50, 1, 0, seed=2)
    s2.load_state_dict(state)
    rest = [b.tolist() for b in DataLoader(ds, batch_size=4, sampler=s2, drop_last=True)]
    ref = BrainSampler(50, 1, 0, seed=2)
    ref.set_epoch(1)
    whole = [b.tolist() for b in DataLoader(ds, batch_size=4, sampler=ref, drop_last=True)]
    assert seen + rest == whole
    assert torch.tensor(rest).numel() == 48 - 12


def test_state_mismatch_is_an_error_and_world_size_change_warns(caplog: pytest.LogCaptureFixture) -> None:
    s = BrainSampler(20, 2, 0, seed=1)
    state = s.state_dict(4)
    with pytest.raises(ValueError, match="n=20"):
        BrainSampler(21, 2, 0, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        BrainSampler(20, 2, 0, seed=2).load_state_dict(state)
    with caplog.at_level(logging.WARNING):
        one = BrainSampler(20, 1, 0, seed=1)
        one.load_state_dict(state)
    assert "ranks" in caplog.text
    assert len(list(one)) == 20 - 8  # same fraction of the epoch
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        one.state_dict(samples_consumed=2)  # counted from the resumed iterator: warned
    assert "start of the epoch" in caplog.text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "non-empty"),
        (dict(n=4, num_replicas=2, rank=2), "rank=2"),
        (dict(n=4, balanced=True), "needs labels"),
        (dict(n=4, labels=[0, 1]), "shape"),
        (dict(n=1, num_replicas=2, rank=0), "cannot be partitioned"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BrainSampler(**kwargs)
