"""ShardDataset and build_loader on real shards of a synthetic cohort (4 mm, 32^3)."""

from __future__ import annotations

import dataclasses
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from brainage_hpc.config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from brainage_hpc.data.ages import bin_to_class
from brainage_hpc.data.dataset import BrainSampler, ShardDataset
from brainage_hpc.data.loader import DeviceBatches, build_loader
from brainage_hpc.data.shards import ShardReader, load_manifest
from brainage_hpc.data.transforms import DeviceAugment

CPU = torch.device("cpu")
KEYS = {"image": torch.float32, "age": torch.float32, "age_bin": torch.int64, "label": torch.int64, "sex": torch.float32}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 synthetic subjects at 4 mm -> `brainage preprocess` -> 32^3 shards."""
    from brainage_hpc.cli import main
    from brainage_hpc.ingest.synthetic import SynthConfig, make_cohort

    base = tmp_path_factory.mktemp("shards")
    make_cohort(base / "hcp", SynthConfig(n_subjects=24, seed=3, voxel_mm=4.0), progress=False, workers=2)
    rc = main(["preprocess", "--hcp-root", str(base / "hcp"), "--out", str(base / "out"),
               "--shape", "32", "32", "32", "--voxel-mm", "4"])
    assert rc == 0
    return base / "out"


def _cfg(root: Path, **data: object) -> RunConfig:
    aug = data.pop("augment", AugmentConfig(enabled=False))
    task = data.pop("task", "regress")
    d = DataConfig(shards=str(root), shape=[32, 32, 32], num_workers=0, augment=aug)  # type: ignore[arg-type]
    return RunConfig(data=dataclasses.replace(d, **data), model=ModelConfig(task=task), train=TrainConfig(seed=4))


def _check_batch(batch: dict, b: int) -> None:
    assert set(batch) == set(KEYS) | {"subject_id"}
    for key, dtype in KEYS.items():
        assert batch[key].dtype == dtype, key
        assert batch[key].shape == ((b, 1, 32, 32, 32) if key == "image" else (b,)), key
    assert isinstance(batch["subject_id"], list) and len(batch["subject_id"]) == b


def _epoch(bundle) -> list[dict]:
    return [dict(b) for b in bundle.loader]


@pytest.mark.parametrize("task", ["regress", "classify4", "classify2"])
def test_items_match_the_shards(shards: Path, task: str) -> None:
    m = load_manifest(shards)
    ds = ShardDataset(m, "train", task=task)
    assert ds.subject_ids == m.split_ids("train") and len(ds) == len(ds.labels)
    reader = ShardReader(shards)
    for i in (0, len(ds) - 1):
        item = ds[i]
        sid = item["subject_id"]
        rec = m.subjects[sid]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 32, 32, 32)
        np.testing.assert_array_equal(item["image"].numpy(), reader.read(sid).astype(np.float32))
        assert item["age"].dtype == torch.float32 and item["age"].ndim == 0
        assert item["age"].item() == pytest.approx(rec["age"]) if rec["age"] is not None else item["age"].isnan()
        assert item["age_bin"].dtype == torch.int64 and item["age_bin"].item() == rec["age_bin"]
        assert item["sex"].dtype == torch.float32 and item["sex"].item() == rec["sex"]
        expect = bin_to_class(rec["age_bin"], 2) if task == "classify2" else rec["age_bin"]
        assert item["label"].dtype == torch.int64 and item["label"].item() == expect == ds.labels[i]
    reader.close()
    # after a read the dataset still pickles (h5py handles are dropped) and reads again
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0]["image"], ds[0]["image"])


def test_clear_errors(shards: Path) -> None:
    with pytest.raises(ValueError, match="Valid: .*train"):
        ShardDataset(shards, "trian")
    with pytest.raises(ValueError, match="Did you mean 'classify2'"):
        ShardDataset(shards, "train", task="clasify2")
    with pytest.raises(ValueError, match="fewer than micro_batch"):
        build_loader(_cfg(shards), "train", train=True, micro_batch=64, rank=0, world_size=1, device=CPU)


@pytest.mark.parametrize("start_method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_two_workers(shards: Path, start_method: str) -> None:
    """2 workers (fork / spawn) give the sampler's order and the same augmented volumes as 0 workers."""
    aug = AugmentConfig(enabled=True, affine_prob=0.5, noise_std=0.05)
    kw = dict(split="train", train=True, micro_batch=3, rank=1, world_size=2, device=CPU)
    bundle = build_loader(_cfg(shards, augment=aug, num_workers=2, start_method=start_method), **kw)
    assert bundle.mode == "dataloader" and bundle.device_augment is None
    bundle.sampler.set_epoch(1)
    batches = _epoch(bundle)
    assert len(batches) == len(bundle) == len(bundle.sampler) // 3
    for b in batches:
        _check_batch(b, 3)
    ids = [s for b in batches for s in b["subject_id"]]
    order = bundle.sampler.epoch_indices(1)[: len(ids)]
    assert ids == [bundle.dataset.subject_ids[i] for i in order]

    serial = build_loader(_cfg(shards, augment=aug, num_workers=0), **kw)
    serial.sampler.set_epoch(1)
    for a, b in zip(batches, _epoch(serial)):
        assert torch.equal(a["image"], b["image"])  # augmentation independent of the worker count
    plain = build_loader(_cfg(shards, num_workers=0), **kw)
    plain.sampler.set_epoch(1)
    assert not torch.equal(batches[0]["image"], next(iter(plain.loader))["image"])  # it did augment


@pytest.mark.parametrize("workers", [0, 2])
def test_reused_batch_buffers_never_change_a_batch(shards: Path, workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device step hands host buffers back and they are reused (also across worker processes); a consumer
    that keeps host batches without handing them back still gets every batch intact. Checksums run on the
    helper thread (in each worker too)."""
    from brainage_hpc.data.batch_buffers import buffer_id, recycle

    monkeypatch.setattr(ShardReader, "defer_checks_from_bytes", 0)

    cfg = _cfg(shards, num_workers=workers, persistent_workers=workers > 0, start_method="fork")
    bundle = build_loader(cfg, "train", train=True, micro_batch=2, rank=0, world_size=1, device=CPU)
    reader = ShardReader(shards)

    def stored(ids: list[str]) -> torch.Tensor:
        return torch.stack([torch.from_numpy(reader.read(s)) for s in ids])

    for epoch in (1, 2):  # the trainer's path: device batches, host buffers recycled
        bundle.sampler.set_epoch(epoch)
        for b in _epoch(bundle):
            assert torch.equal(b["image"], stored(b["subject_id"]).float())
    if workers == 0:
        assert bundle.dataset.buffer_pool.allocated == 1  # one buffer served both epochs

    bundle.sampler.set_epoch(3)  # host batches kept, never recycled: all distinct and intact
    kept = list(bundle.loader.loader)
    assert len(kept) == len(bundle) >= 6
    for b in kept:
        assert b["image"].dtype == torch.float16 and torch.equal(b["image"], stored(b["subject_id"]))
        recycle(b["image"])

    ids = []  # which pool buffer served each batch, over 4 more epochs of the trainer's path
    for epoch in range(4, 8):
        bundle.sampler.set_epoch(epoch)
        for b in bundle.loader.loader:
            ids.append(buffer_id(b["image"]))
            recycle(b["image"])
    cap = max(workers, 1) * (cfg.data.prefetch_factor + 3)  # BufferPool's max_buffers per process
    assert None not in ids and len(ids) == 4 * len(bundle) > cap
    assert len(set(ids)) <= cap, f"{len(set(ids))} buffers for {len(ids)} batches: they were not reused"
    if workers:  # each worker buffer crossed to this process once, then by name
        assert 0 < len(bundle.loader.loader._mapped) <= cap


def test_fresh_workers_every_epoch_send_their_own_buffers(shards: Path) -> None:
    """Without persistent workers each epoch forks new workers with new buffers: the main process forgets the
    old mappings (bounded memory) and every batch is still the stored one."""
    from brainage_hpc.data.batch_buffers import recycle

    cfg = _cfg(shards, num_workers=2, persistent_workers=False, start_method="fork")
    bundle = build_loader(cfg, "train", train=True, micro_batch=2, rank=0, world_size=1, device=CPU)
    reader = ShardReader(shards)
    for epoch in (1, 2, 3):
        bundle.sampler.set_epoch(epoch)
        for b in bundle.loader.loader:
            assert torch.equal(b["image"], torch.stack([torch.from_numpy(reader.read(s)) for s in b["subject_id"]]))
            recycle(b["image"])
        assert len(bundle.loader.loader._mapped) <= 2 * (cfg.data.prefetch_factor + 3)


def test_abandoned_iterations_do_not_drain_the_worker_pools(shards: Path) -> None:
    """``next(iter(loader))`` with persistent workers drops the batches they prefetched; their buffers come
    back to the pools (no buffer beyond the pool's size is ever made), while the batches that were delivered
    and kept stay intact."""
    from brainage_hpc.data.batch_buffers import buffer_id, recycle

    cfg = _cfg(shards, num_workers=2, persistent_workers=True, start_method="fork")
    bundle = build_loader(cfg, "train", train=True, micro_batch=2, rank=0, world_size=1, device=CPU)
    reader = ShardReader(shards)
    per_worker = cfg.data.prefetch_factor + 3  # BufferPool's max_buffers
    kept = None
    for epoch in range(1, 5):  # each abandoned iteration drops up to 2 x prefetch_factor - 1 prefetched batches
        bundle.sampler.set_epoch(epoch)
        first = next(iter(bundle.loader.loader))
        if kept is None:
            kept = first  # delivered and held: its buffer must not be reused
        else:
            recycle(first["image"])
    ids = []
    for epoch in range(4, 8):
        bundle.sampler.set_epoch(epoch)
        for b in bundle.loader.loader:
            ids.append(buffer_id(b["image"]))
            recycle(b["image"])
    serials = sorted({serial for _, serial in ids})
    assert None not in ids and serials[-1] <= per_worker, f"buffers {serials} made: the abandoned ones were lost"
    assert kept is not None and torch.equal(kept["image"], torch.stack([torch.from_numpy(reader.read(s)) for s in kept["subject_id"]]))


def test_resume_mid_epoch_through_the_loader(shards: Path) -> None:
    """Consume 2 batches, save, rebuild, load: the rest of the epoch (augmentation included) is identical."""
    cfg = _cfg(shards, augment=AugmentConfig(enabled=True, affine_prob=1.0), balanced=True, task="classify4")
    kw = dict(split="train", train=True, micro_batch=2, rank=0, world_size=2, device=CPU)
    ref = build_loader(cfg, **kw)
    ref.sampler.set_epoch(2)
    full = _epoch(ref)

    run = build_loader(cfg, **kw)
    run.sampler.set_epoch(2)
    it = iter(run.loader)
    done = [next(it) for _ in range(2)]
    state = run.sampler.state_dict(samples_consumed=2 * 2)

    resumed = build_loader(cfg, **kw)
    resumed.sampler.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    rest = _epoch(resumed)
    assert len(done) + len(rest) == len(full)
    for a, b in zip(done + rest, full):
        assert a["subject_id"] == b["subject_id"]
        assert torch.equal(a["image"], b["image"])


def test_memory_cache_holds_only_the_rank_subset(shards: Path) -> None:
    kw = dict(split="train", train=True, micro_batch=2, rank=1, world_size=2, device=CPU)
    cached = build_loader(_cfg(shards, cache="memory"), **kw)
    np.testing.assert_array_equal(cached.dataset.cached_indices, cached.sampler.indices_for_rank())
    assert len(cached.dataset.cached_indices) < len(cached.dataset)
    plain = build_loader(_cfg(shards), **kw)
    for a, b in zip(_epoch(cached), _epoch(plain)):
        assert a["subject_id"] == b["subject_id"] and torch.equal(a["image"], b["image"])


def test_eval_loader_gives_each_subject_once(shards: Path) -> None:
    cfg = _cfg(shards, augment=AugmentConfig(enabled=True))
    seen = []
    for rank in range(2):
        bundle = build_loader(cfg, "val", train=False, micro_batch=2, rank=rank, world_size=2, device=CPU)
        assert bundle.sampler is None and bundle.device_augment is None
        batches = _epoch(bundle)
        assert len(batches) == len(bundle)
        ids = [s for b in batches for s in b["subject_id"]]
        assert ids == bundle.dataset.subject_ids[rank::2]
        ds = bundle.dataset
        np.testing.assert_array_equal(batches[0]["image"][0].numpy(), np.asarray(ds.read_volume(rank), dtype=np.float32))
        seen += ids
    assert sorted(seen) == sorted(load_manifest(shards).split_ids("val"))


def test_gpu_resident_batches_match_the_dataloader(shards: Path, caplog: pytest.LogCaptureFixture) -> None:
    """DeviceBatches (run here on the CPU) yields the DataLoader path's batches; cache=gpu on CPU falls back."""
    cfg = _cfg(shards, cache="gpu", augment=AugmentConfig(enabled=True, device="gpu"))
    kw = dict(split="train", train=True, micro_batch=2, rank=0, world_size=2, device=CPU)
    with caplog.at_level(logging.WARNING):
        bundle = build_loader(cfg, **kw)
    assert bundle.mode == "dataloader" and "DataLoader path" in caplog.text
    assert isinstance(bundle.device_augment, DeviceAugment)
    bundle.sampler.set_epoch(3)
    expect = _epoch(bundle)

    ds = ShardDataset(shards, "train")
    sampler = BrainSampler(len(ds), 2, 0, seed=4, labels=ds.labels)
    sampler.set_epoch(3)
    resident = DeviceBatches(ds, sampler, micro_batch=2, device=CPU)
    assert resident.images.dtype == torch.float16 and len(resident.images) == len(sampler.indices_for_rank())
    got = list(resident)
    assert len(got) == len(resident) == len(bundle)
    for a, b in zip(got, expect):
        _check_batch(a, 2)
        assert a["subject_id"] == b["subject_id"]
        assert torch.equal(a["image"], b["image"])
        for key in ("age", "age_bin", "label", "sex"):
            assert torch.equal(a[key].nan_to_num(-1), b[key].nan_to_num(-1)), key
    out = bundle.device_augment(expect[0])
    assert out["image"].shape == expect[0]["image"].shape and out["image"].dtype == torch.float32
