"""Truth maps for faithfulness: where intensity really depends on age, on the shard grid.

Two sources:

* ``auto``: ``|Pearson r|`` per voxel of intensity vs age over the *train* split of the
  shards (never the explained subjects). Needs no resampling and measures what the model
  could learn; this is what ``brainage explain`` and the demo report use by default;
* a NIfTI such as a synthetic cohort's ``truth/age_effect.nii.gz`` (the generator's
  voxel-wise age effect on the *cohort's* grid). A file already on the shard grid is used
  as is; otherwise it is mapped with the shards' own geometry step (RAS, crop around the
  brain of ``reference_brain.nii.gz`` next to it, one resampling), using ``|effect|``.
  Each subject's crop is centred on its own brain, so this mapping is approximate to
  a voxel or so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["load_truth_map", "truth_auto"]


def truth_auto(manifest: object, mask: np.ndarray | None = None, split: str = "train", max_subjects: int = 400) -> np.ndarray:
    """``|Pearson r|`` of intensity vs age per voxel over ``split`` of the shards."""
    from brainage_hpc.data.dataset import ShardDataset
    from brainage_hpc.interpret.faithfulness import truth_from_correlation

    ds = ShardDataset(manifest, split)  # type: ignore[arg-type]
    keep = [i for i in range(len(ds)) if np.isfinite(ds.ages[i])][:max_subjects]
    if len(keep) < 3:
        raise ValueError(f"{ds.root}: split '{split}' has {len(keep)} subjects with an age; --truth auto needs >= 3")
    images = np.stack([np.asarray(ds.read_volume(i), dtype=np.float32) for i in keep])
    ds.close()
    return truth_from_correlation(images.reshape(len(keep), *ds.shape), ds.ages[keep], mask)


def load_truth_map(path: str | Path, shape: tuple[int, ...], preprocess: dict | None) -> np.ndarray:
    """``|truth|`` on the shard grid from a NIfTI on the shard grid or on the cohort's grid.

    Raises:
        ValueError: the file is not 3D, or is on another grid and cannot be mapped
            (no ``reference_brain.nii.gz`` next to it or no preprocessing config).
    """
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: truth map not found")
    img = nib.load(str(path))
    data = np.abs(np.asarray(img.dataobj, dtype=np.float32))
    if data.ndim != 3:
        raise ValueError(f"{path}: truth map must be 3D, has shape {tuple(data.shape)}")
    if tuple(data.shape) == tuple(shape):
        return np.nan_to_num(data)
    ref = path.parent / "reference_brain.nii.gz"
    if preprocess is None or not ref.exists():
        raise ValueError(f"{path}: truth map has shape {tuple(data.shape)}, the shards {tuple(shape)}, and there is no "
                         f"{ref.name} next to it to map it through the preprocessing")
    return _to_shard_grid(data, np.asarray(img.affine, dtype=np.float64), ref, preprocess)


def _to_shard_grid(data: np.ndarray, affine: np.ndarray, ref: Path, preprocess: dict) -> np.ndarray:
    import math

    import nibabel as nib
    import torch
    from monai.data import MetaTensor
    from monai.transforms import CropForeground, Orientation

    from brainage_hpc.ingest.preprocess import _RAS_LABELS, PreprocessConfig, _geometry

    cfg = PreprocessConfig.from_dict(preprocess)
    rimg = nib.load(str(ref))
    x = MetaTensor(torch.from_numpy(np.asarray(rimg.dataobj, dtype=np.float32)[None]), affine=torch.as_tensor(rimg.affine))
    x = Orientation(axcodes="RAS", labels=_RAS_LABELS)(x)
    spacing = np.sqrt((np.asarray(x.affine)[:3, :3] ** 2).sum(axis=0))
    margin = [math.ceil(cfg.crop_margin_mm / s) for s in spacing]
    x = CropForeground(select_fn=lambda v: v > 0, margin=margin, allow_smaller=True)(x)
    src = np.asarray(x.affine, dtype=np.float64)
    centre = src[:3, :3] @ ((np.asarray(x.shape[1:], dtype=float) - 1) / 2) + src[:3, 3]
    return np.abs(_geometry(data, affine, cfg, centre_mm=centre))
