"""Loader benchmark: HDF5 shards vs NIfTI + nibabel + the same preprocessing.

``python -m benchmarks.loader [--quick] [--n 40] [--out bench_out/loader.json]``

Builds a synthetic HCP-layout cohort at ``--voxel-mm`` (1 mm by default; HCP
itself is 0.7 mm, so the NIfTI path is even slower on real data), preprocesses
it to ``--shape`` (128^3) shards with ``brainage preprocess``, then measures
volumes/s of one epoch for:

* NIfTI: what a user without this toolkit does: ``preprocess_volume`` (nibabel
  load, reorient, crop, resample, z-score) on every ``.nii.gz`` at load time;
* HDF5: :func:`brainage_hpc.data.loader.build_loader` over the shards;

each with cold and warm page cache, 0 and 2 workers, without and with MONAI CPU
augmentation (the same ``train_transforms`` in both). Extra rows give the HDF5
path with the batched :class:`DeviceAugment` (on the GPU when there is one).

Cold cache: ``echo 3 > /proc/sys/vm/drop_caches`` when root and writable,
otherwise ``posix_fadvise(DONTNEED)`` on every input file (a fresh copy of a
file would sit in the page cache right after being written).
To save time, ``--unique`` subjects are synthesised and copied under new IDs up
to ``--n``; file content does not change loading cost. The cohort and shards are
kept in ``--work`` and reused when the parameters match.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import BENCH_OUT, finish, machine_info, make_ratio, make_result, set_threads
from brainage_hpc.config import AugmentConfig, DataConfig, RunConfig, TrainConfig
from brainage_hpc.data.loader import build_loader, seed_worker
from brainage_hpc.data.shards import load_manifest
from brainage_hpc.data.transforms import DeviceAugment, eval_transforms, train_transforms
from brainage_hpc.ingest.hcp import T1W_RELPATH
from brainage_hpc.ingest.preprocess import PreprocessConfig, preprocess_volume

__all__ = ["main"]

log = logging.getLogger("benchmarks.loader")


class NiftiDataset(Dataset):
    """The baseline: NIfTI path -> ``preprocess_volume`` -> ``{"image": (1, D, H, W) float32}`` (+ transform)."""

    def __init__(self, paths: list[Path], cfg: PreprocessConfig, transform: Any) -> None:
        self.paths, self.cfg, self.transform = paths, cfg, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        vol = preprocess_volume(self.paths[i], self.cfg)  # (D, H, W) float16
        item = {"image": torch.from_numpy(vol.astype(np.float32))[None]}
        return self.transform(item)


def _make_cohort(hcp: Path, n: int, unique: int, voxel_mm: float, seed: int) -> None:
    from brainage_hpc.ingest.synthetic import SynthConfig, make_cohort

    unique = min(unique, n)
    make_cohort(hcp, SynthConfig(n_subjects=unique, seed=seed, voxel_mm=voxel_mm), progress=False, workers=2)
    for name in ("unrestricted.csv", "restricted.csv"):
        with open(hcp / name, newline="") as fh:
            reader = csv.DictReader(fh)
            fields, rows = list(reader.fieldnames or []), list(reader)
        extra = []
        for k in range(unique, n):
            src = rows[k % unique]
            new_id = f"9{k:05d}"
            extra.append({**src, "Subject": new_id})
            if name == "unrestricted.csv":
                dst = hcp / new_id / T1W_RELPATH
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(hcp / src["Subject"] / T1W_RELPATH, dst)
        with open(hcp / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(rows + extra)


def _prepare(work: Path, n: int, unique: int, voxel_mm: float, shape: int, target_mm: float, seed: int) -> dict[str, float]:
    params = {"n": n, "unique": unique, "voxel_mm": voxel_mm, "shape": shape, "target_mm": target_mm, "seed": seed}
    marker = work / "params.json"
    if marker.is_file() and json.loads(marker.read_text()) == params and (work / "shards" / "manifest.json").is_file():
        log.info("reusing cohort and shards in %s", work)
        return {}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from brainage_hpc.cli import main as cli

    t0 = time.perf_counter()
    _make_cohort(work / "hcp", n, unique, voxel_mm, seed)
    t1 = time.perf_counter()
    rc = cli(["preprocess", "--hcp-root", str(work / "hcp"), "--out", str(work / "shards"), "--shape", *[str(shape)] * 3,
              "--voxel-mm", str(target_mm), "--workers", "2",
              "--split-fractions", "1", "0", "0", "--no-progress"])
    if rc != 0:
        raise SystemExit(f"brainage preprocess failed with exit code {rc}")
    t2 = time.perf_counter()
    marker.write_text(json.dumps(params))
    return {"synth_s": t1 - t0, "preprocess_s": t2 - t1}


def _drop_page_cache(files: Iterable[Path]) -> str:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as fh:
                fh.write("3\n")
            return "drop_caches"
        except OSError:
            pass
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise_dontneed"


def _warm_page_cache(files: Iterable[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


class _Prime:
    """A loader whose persistent workers are started by a short untimed pass (``prime``) before ``timed``."""

    def __init__(self, loader: Iterable[dict[str, Any]], prime: Any, full: Any) -> None:
        self.loader, self._prime, self._full = loader, prime, full

    def prime(self) -> None:
        self._prime()
        for _ in self.loader:
            pass
        self._full()


class _LimitSampler:
    """Indices 0..n-1, or only the first ``limit`` of them (for priming the workers)."""

    def __init__(self, n: int) -> None:
        self.n, self.limit = n, n

    def __iter__(self) -> Any:
        return iter(range(min(self.n, self.limit)))

    def __len__(self) -> int:
        return min(self.n, self.limit)


def _hdf5(shards: Path, workers: int, batch: int, aug: AugmentConfig, device: torch.device) -> tuple[_Prime, Any]:
    cfg = RunConfig(
        data=DataConfig(shards=str(shards), shape=list(load_manifest(shards).shape), num_workers=workers,
                        persistent_workers=workers > 0, augment=aug),
        train=TrainConfig(seed=0),
    )
    bundle = build_loader(cfg, "train", train=True, micro_batch=batch, rank=0, world_size=1, device=device)
    s = bundle.sampler
    assert s is not None  # train loaders always have one
    k = batch * max(workers, 1)
    return _Prime(bundle.loader, lambda: s.load_state_dict(s.state_dict(len(s) - k)), lambda: s.set_epoch(1)), bundle


def _nifti(paths: list[Path], pcfg: PreprocessConfig, workers: int, batch: int, aug: AugmentConfig) -> _Prime:
    transform = train_transforms(aug, seed=0) if aug.enabled else eval_transforms()
    sampler = _LimitSampler(len(paths))
    kw: dict[str, Any] = {"multiprocessing_context": "fork", "persistent_workers": True} if workers > 0 else {}
    loader = DataLoader(NiftiDataset(paths, pcfg, transform), batch_size=batch, sampler=sampler, num_workers=workers,
                        drop_last=True, worker_init_fn=seed_worker, **kw)

    def limit(v: int) -> None:
        sampler.limit = v

    return _Prime(loader, lambda: limit(batch * max(workers, 1)), lambda: limit(len(paths)))


def _measure(run: _Prime, workers: int, cache: str, files: list[Path], augment: Any = None) -> dict[str, Any]:
    """Volumes/s of one epoch; worker start-up is excluded (persistent workers primed first)."""
    if workers > 0:
        run.prime()
    method = _drop_page_cache(files) if cache == "cold" else (_warm_page_cache(files) or "warm")
    t0 = time.perf_counter()
    n = 0
    for batch in run.loader:
        if augment is not None:
            batch = augment(batch)
        n += batch["image"].shape[0]
    if augment is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"vps": n / dt, "volumes": n, "seconds": dt, "cache_method": method}


def _row_cells(r: dict[str, Any]) -> list[str]:
    return [r["cache"], str(r["workers"]), r["augment"], f"{r['nifti_vps']:.2f}", f"{r['hdf5_vps']:.1f}", f"{r['ratio']:.1f}x"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="12 subjects, 2 mm -> 64^3 (a smoke run, not a measurement)")
    p.add_argument("--n", type=int, default=None, help="subjects (default 40; quick 12)")
    p.add_argument("--unique", type=int, default=8, help="distinct synthetic subjects, copied up to --n (default 8)")
    p.add_argument("--voxel-mm", type=float, default=None, help="voxel size of the synthetic NIfTI files (default 1; quick 2)")
    p.add_argument("--shape", type=int, default=None, help="cubic target shape of the shards (default 128; quick 64)")
    p.add_argument("--target-mm", type=float, default=None, help="voxel size of the shards (default 1; quick 2)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--work", default=None, help="cohort and shards, kept and reused (default bench_out/loader_data[_quick])")
    p.add_argument("--out", default=None, help="JSON result (default bench_out/loader.json)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    q = args.quick
    args.n = args.n or (12 if q else 40)
    args.unique = min(args.unique, 4) if q else args.unique
    args.voxel_mm = args.voxel_mm or (2.0 if q else 1.0)
    args.shape = args.shape or (64 if q else 128)
    args.target_mm = args.target_mm or (2.0 if q else 1.0)
    args.work = args.work or str(BENCH_OUT / ("loader_data_quick" if q else "loader_data"))
    out = args.out or str(BENCH_OUT / ("quick" if q else "") / "loader.json")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    set_threads(1)
    if args.n < args.batch:
        p.error(f"--n {args.n} must be at least --batch {args.batch}")
    machine = machine_info()

    work = Path(args.work)
    build_times = _prepare(work, args.n, args.unique, args.voxel_mm, args.shape, args.target_mm, args.seed)
    shards = work / "shards"
    manifest = load_manifest(shards)
    pcfg = PreprocessConfig.from_dict(manifest.preprocess)
    ids = manifest.split_ids("train")
    nifti_paths = [work / "hcp" / s / T1W_RELPATH for s in ids]
    shard_files = [shards / s["file"] for s in manifest.shards]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    off, on = AugmentConfig(enabled=False), AugmentConfig(enabled=True)

    rows, cold_method = [], ""
    for cache in ("cold", "warm"):
        for workers in args.workers:
            for aug_name, aug in (("none", off), ("MONAI CPU", on)):
                nifti = _measure(_nifti(nifti_paths, pcfg, workers, args.batch, aug), workers, cache, nifti_paths)
                hdf5 = _measure(_hdf5(shards, workers, args.batch, aug, device)[0], workers, cache, shard_files)
                if cache == "cold":
                    cold_method = hdf5["cache_method"]
                row = {"cache": cache, "workers": workers, "augment": aug_name, "volumes": hdf5["volumes"],
                       "nifti_vps": nifti["vps"], "hdf5_vps": hdf5["vps"], "ratio": hdf5["vps"] / nifti["vps"]}
                log.info("%s", row)
                rows.append(row)

    device_rows = []
    gpu_aug = AugmentConfig(enabled=True, device="gpu")
    for workers in args.workers:
        run, bundle = _hdf5(shards, workers, args.batch, gpu_aug, device)
        dev_aug = bundle.device_augment
        if not isinstance(dev_aug, DeviceAugment):
            raise RuntimeError("build_loader gave no DeviceAugment for augment.device=gpu")

        def to_device(b: dict[str, Any], dev_aug: DeviceAugment = dev_aug) -> dict[str, Any]:
            return dev_aug({**b, "image": b["image"].to(device, non_blocking=True)})

        rate = _measure(run, workers, "warm", shard_files, augment=to_device)
        ref = next(r for r in rows if r["cache"] == "warm" and r["workers"] == workers and r["augment"] == "MONAI CPU")
        device_rows.append({"cache": "warm", "workers": workers,
                            "augment": f"HDF5: DeviceAugment ({device.type}, batched); NIfTI: MONAI CPU",
                            "nifti_vps": ref["nifti_vps"], "hdf5_vps": rate["vps"], "ratio": rate["vps"] / ref["nifti_vps"]})

    plain = [r for r in rows if r["augment"] == "none"]
    worst = min(plain, key=lambda r: r["ratio"])
    ratio = make_ratio("HDF5 / NIfTI volumes/s, same preprocessing (lowest of cold/warm x workers)", worst["ratio"], 10.0, ">=")
    sizes = {
        "nii_gz_mb_per_subject": float(np.mean([f.stat().st_size for f in nifti_paths]) / 2**20),
        "shard_mb_per_subject": float(sum(f.stat().st_size for f in shard_files) / len(ids) / 2**20),
    }
    notes = [
        f"{len(ids)} subjects ({args.unique} synthesised at {args.voxel_mm:g} mm, copied under new IDs) -> "
        f"{list(manifest.shape)} at {args.target_mm:g} mm; batch {args.batch}; NIfTI = nibabel + preprocess_volume per item.",
        f"Cold cache by {cold_method}; workers are persistent and started before the timer.",
        "With MONAI CPU augmentation both paths are bounded by the per-volume resampling, so the ratio shrinks; "
        "DeviceAugment moves it onto the GPU (its CPU rows only show that it runs there).",
        f"Machine load: 1-min load average {machine.get('loadavg_1m')} at start, {os.getloadavg()[0]:.2f} at the end.",
    ]
    result = make_result(
        "loader", "Loader: HDF5 shards vs NIfTI + nibabel + preprocessing", argv, quick=q,
        config=vars(args) | {"target_shape": list(manifest.shape), "preprocess": manifest.preprocess},
        headers=["cache", "workers", "augmentation", "NIfTI vol/s", "HDF5 vol/s", "HDF5 / NIfTI"],
        rows=[_row_cells(r) for r in rows + device_rows], ratio=ratio, notes=notes, machine=machine,
        cold_cache_method=cold_method, build=build_times, sizes=sizes, results=rows, device_augment=device_rows,
    )
    return finish(result, out)


if __name__ == "__main__":
    sys.exit(main())
