"""The alternatives the loader benchmark compares against, serving the *same* preprocessed volumes.

Every dataset here yields the same item as the others and the same batch after
``default_collate`` as :func:`brainage_hpc.data.loader.build_loader`'s DataLoader::

    image (B, 1, D, H, W) float16, age (B,) float32, age_bin (B,) int64,
    label (B,) int64, sex (B,) float32, subject_id list[str]

* ``.nii.gz`` read by nibabel: the preprocessed volumes saved as float32 NIfTI
  (NIfTI-1 has no float16), as a user without shards would keep them;
* MONAI ``PersistentDataset`` (``LoadImaged`` -> ``EnsureChannelFirstd`` -> float16,
  cached once as ``.pt`` files) and ``CacheDataset`` (the same, held in RAM);
* one ``.npy`` per volume read with ``np.load(mmap_mode="r")`` as nnU-Net does;
* nibabel + the full ``preprocess_volume`` per item from the raw NIfTI: the old
  baseline, which credits preprocessing-once rather than the format.

The files are written once from the shards (``export_formats``) and reused.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from brainage_hpc.data.dataset import ShardDataset

__all__ = [
    "Formats",
    "ItemMeta",
    "NiftiDataset",
    "NpyMmapDataset",
    "RawPreprocessDataset",
    "export_formats",
    "monai_cache_dataset",
    "monai_persistent_dataset",
]


class ItemMeta:
    """The non-image fields of every item, from the same manifest as the shards (0-d tensors)."""

    def __init__(self, ds: ShardDataset) -> None:
        self.ages, self.age_bins, self.labels, self.sexes = ds.ages, ds.age_bins, ds.labels, ds.sexes
        self.subject_ids = list(ds.subject_ids)

    def item(self, i: int) -> dict[str, Any]:
        return {
            "age": torch.tensor(self.ages[i]),  # float32
            "age_bin": torch.tensor(self.age_bins[i]),  # int64
            "label": torch.tensor(self.labels[i]),  # int64
            "sex": torch.tensor(self.sexes[i]),  # float32
            "subject_id": self.subject_ids[i],
        }


@dataclass
class Formats:
    """Per-subject files of one shard set, in split order."""

    npy: list[Path]
    nii_gz: list[Path]
    root: Path

    def mb_per_subject(self, kind: str) -> float:
        files = self.npy if kind == "npy" else self.nii_gz
        return float(np.mean([f.stat().st_size for f in files]) / 2**20)


def export_formats(ds: ShardDataset, root: Path) -> tuple[Formats, float]:
    """Write every volume of ``ds`` as ``.npy`` (float16, (1, D, H, W)) and ``.nii.gz`` (float32, (D, H, W)).

    Returns:
        The files and the seconds spent writing them (0 when reused).
    """
    import time

    import nibabel as nib

    marker = root / "done.json"
    key = {"n": len(ds), "shards": str(ds.root), "shape": list(ds.shape)}
    npy = [root / "npy" / f"{s}.npy" for s in ds.subject_ids]
    nii = [root / "nii" / f"{s}.nii.gz" for s in ds.subject_ids]
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return Formats(npy, nii, root), 0.0
    shutil.rmtree(root, ignore_errors=True)
    (root / "npy").mkdir(parents=True)
    (root / "nii").mkdir()
    affine = np.asarray(ds.manifest.affine, dtype=np.float64)
    t0 = time.perf_counter()
    for i in range(len(ds)):
        vol = np.asarray(ds.read_volume(i), dtype=np.float16)  # (1, D, H, W)
        np.save(npy[i], vol)
        nib.save(nib.Nifti1Image(vol[0].astype(np.float32), affine), nii[i])
    marker.write_text(json.dumps(key))
    return Formats(npy, nii, root), time.perf_counter() - t0


class NpyMmapDataset(Dataset):
    """One ``.npy`` per volume, ``np.load(mmap_mode="r")`` then a copy (nnU-Net's way)."""

    def __init__(self, paths: list[Path], meta: ItemMeta) -> None:
        self.paths, self.meta = paths, meta

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        vol = np.load(self.paths[i], mmap_mode="r")  # (1, D, H, W) float16, not read yet
        return {"image": torch.from_numpy(np.array(vol)), **self.meta.item(i)}


class NiftiDataset(Dataset):
    """The preprocessed volumes as ``.nii.gz``, read by nibabel (float32 on disk, float16 out)."""

    def __init__(self, paths: list[Path], meta: ItemMeta) -> None:
        self.paths, self.meta = paths, meta

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import nibabel as nib

        vol = np.asarray(nib.load(self.paths[i]).dataobj, dtype=np.float32)  # (D, H, W)
        return {"image": torch.from_numpy(vol.astype(np.float16))[None], **self.meta.item(i)}


def _monai_items(paths: list[Path], meta: ItemMeta) -> list[dict[str, Any]]:
    return [{"image": str(p), **meta.item(i)} for i, p in enumerate(paths)]


def _monai_transform() -> Any:
    from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged

    return Compose([
        LoadImaged(keys="image", image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
        EnsureTyped(keys="image", dtype=torch.float16, track_meta=False),
    ])


def monai_persistent_dataset(paths: list[Path], meta: ItemMeta, cache_dir: Path) -> Dataset:
    """MONAI ``PersistentDataset``: the deterministic transforms run once, results cached as ``.pt`` files."""
    from monai.data import PersistentDataset

    cache_dir.mkdir(parents=True, exist_ok=True)
    return PersistentDataset(_monai_items(paths, meta), transform=_monai_transform(), cache_dir=cache_dir)


def monai_cache_dataset(paths: list[Path], meta: ItemMeta) -> Dataset:
    """MONAI ``CacheDataset``: the same transforms' results held in RAM (``copy_cache=False``: nothing random follows)."""
    from monai.data import CacheDataset

    return CacheDataset(_monai_items(paths, meta), transform=_monai_transform(), cache_rate=1.0, num_workers=1,
                        progress=False, copy_cache=False)


class RawPreprocessDataset(Dataset):
    """The old baseline: raw NIfTI -> nibabel + ``preprocess_volume`` on every item."""

    def __init__(self, paths: list[Path], pcfg: Any, meta: ItemMeta) -> None:
        self.paths, self.pcfg, self.meta = paths, pcfg, meta

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from brainage_hpc.ingest.preprocess import preprocess_volume

        vol = preprocess_volume(self.paths[i], self.pcfg)  # (D, H, W) float16
        return {"image": torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float16))[None], **self.meta.item(i)}
