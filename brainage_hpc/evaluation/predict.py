"""Inference with a trained run: load the model, predict batches, predict raw NIfTI files.

A run folder (plain or DeepSpeed) or an exported ``model.pt`` carries everything
inference needs: weights, the run config, the volume shape, the shard grid's
affine and the preprocessing config. :func:`predict_files` applies exactly the
preprocessing the shards were built with (:func:`~brainage_hpc.ingest.preprocess.preprocess_volume`),
so a raw T1w of any shape, voxel size and orientation can be scored.

Every model gives, per subject, ``pred_age`` (years) and, where it can, the
4-class seed bin and the 2-class (<31 vs >=31) prediction, so every run can be
placed in the seed's table (DESIGN.md section 4):

* regressors: bins from the predicted age;
* 4-class classifiers: argmax bin; 2-class = P(bin >= 2) >= 0.5; age = the model's
  ``pred_age`` (with ``class_ages``) or the expected bin centre;
* 2-class classifiers: argmax; age from the model or the expected class centre.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from brainage_hpc.config import RunConfig

__all__ = [
    "FilePrediction",
    "LoadedModel",
    "SEX_CHOICES",
    "class_centres",
    "find_nifti",
    "load_model",
    "predict_batch",
    "predict_files",
]

log = logging.getLogger(__name__)
SEX_CHOICES = ("M", "F", "unknown")
_N_CLASSES = {"regress": 0, "classify4": 4, "classify2": 2}


def class_centres(n_classes: int) -> np.ndarray:
    """Representative age (years) per class: the centre of the 4 seed bins, or of <31 / >=31.

    Example:
        >>> class_centres(2).tolist()
        [26.0, 34.0]
    """
    from brainage_hpc.data.ages import AGE_BIN_RANGES, bin_centre

    if n_classes == 4:
        return np.array([bin_centre(b) for b in range(4)])
    if n_classes == 2:
        lo, hi = AGE_BIN_RANGES[0][0], AGE_BIN_RANGES[1][1]
        lo2, hi2 = AGE_BIN_RANGES[2][0], AGE_BIN_RANGES[3][1]
        return np.array([(lo + hi - 1) / 2, (lo2 + hi2 - 1) / 2])
    raise ValueError(f"n_classes must be 2 or 4, got {n_classes}")


@dataclass
class LoadedModel:
    """A trained network ready for inference (eval mode) plus what the run recorded.

    Attributes:
        model: the network, in eval mode on ``device``.
        cfg: the run's config.
        shape: (D, H, W) of the training volumes.
        affine: (4, 4) affine of the shard grid (voxel -> RAS mm).
        preprocess: preprocessing config of the shards (``PreprocessConfig.to_dict()``).
        step: training step of the weights.
        source: run folder or model file the weights came from.
        device: where the model lives.
    """

    model: nn.Module
    cfg: RunConfig
    shape: tuple[int, int, int]
    affine: np.ndarray
    preprocess: dict[str, Any]
    step: int | None
    source: Path
    device: torch.device

    @property
    def task(self) -> str:
        """Config task: ``regress``, ``classify4`` or ``classify2``."""
        return self.cfg.model.task

    @property
    def n_classes(self) -> int:
        """Classes of the task (0 for regression)."""
        return _N_CLASSES[self.task]

    @property
    def name(self) -> str:
        """Model name in the registry (``cnn3d``, ``sfcn``, ``cvae``)."""
        return self.cfg.model.name


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_model(path: str | Path, device: str | torch.device | None = None) -> LoadedModel:
    """Load a run folder (plain or DeepSpeed) or an exported ``model.pt`` for inference.

    Args:
        path: run folder or checkpoint/model file.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.

    Returns:
        The :class:`LoadedModel` in eval mode.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no checkpoint.
        ValueError: not a brainage checkpoint, or the weights do not fit the recorded model.
    """
    from brainage_hpc.config import ConfigError, config_from_dict
    from brainage_hpc.engine.checkpoint import load_inference_bundle
    from brainage_hpc.models.registry import build_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder or checkpoint file")
    bundle = load_inference_bundle(path)
    try:
        cfg = config_from_dict(dict(bundle["config"]), source=str(path))
    except (ConfigError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: checkpoint holds no usable run config ({exc})") from None
    shape = tuple(int(s) for s in (bundle.get("shape") or cfg.data.shape))
    if len(shape) != 3:
        raise ValueError(f"{path}: recorded volume shape {shape} is not (D, H, W)")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_cfg = dataclasses.replace(cfg.model, compile=False, channels_last=False)
    model = build_model(model_cfg, shape)
    try:
        model.load_state_dict(_strip_prefixes(dict(bundle["state_dict"])), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{path}: weights do not match model '{cfg.model.name}' of shape {shape} ({first})") from None
    affine = bundle.get("affine")
    if affine is None:
        from brainage_hpc.ingest.preprocess import PreprocessConfig, reference_affine

        affine = reference_affine(PreprocessConfig.from_dict(bundle["preprocess"])) if bundle.get("preprocess") else np.eye(4)
    return LoadedModel(
        model=model.to(dev).eval(),
        cfg=cfg,
        shape=shape,  # type: ignore[arg-type]
        affine=np.asarray(affine, dtype=np.float64),
        preprocess=dict(bundle.get("preprocess") or {}),
        step=bundle.get("step"),
        source=path,
        device=dev,
    )


@torch.no_grad()
def predict_batch(lm: LoadedModel, image: torch.Tensor, sex: torch.Tensor) -> dict[str, np.ndarray]:
    """Predict ages and classes for one batch.

    Args:
        lm: the loaded model.
        image: (B, 1, D, H, W) z-scored volumes (as stored in the shards).
        sex: (B,) 0=F, 1=M.

    Returns:
        ``pred_age`` (B,) years; ``bin4_pred`` (B,) int (-1 where the task gives no 4-class
        answer); ``class2_pred`` (B,) int; ``probs`` (B, K) float for classifiers, (B, 0) otherwise.
    """
    from brainage_hpc.data.ages import age_to_bin

    batch = {"image": image.to(lm.device, torch.float32), "sex": sex.to(lm.device, torch.float32)}
    out = lm.model(batch)
    n = image.shape[0]
    if lm.n_classes:
        probs = torch.softmax(out["logits"].float(), dim=1).cpu().numpy().astype(np.float64)  # (B, K)
        age = out["pred_age"].float().cpu().numpy() if "pred_age" in out else probs @ class_centres(lm.n_classes)
        if lm.n_classes == 4:
            bin4 = probs.argmax(1)
            class2 = (probs[:, 2:].sum(1) >= 0.5).astype(np.int64)
        else:
            bin4 = np.full(n, -1, dtype=np.int64)
            class2 = probs.argmax(1)
    else:
        probs = np.zeros((n, 0))
        age = out["pred_age"].float().cpu().numpy()
        bin4 = np.array([age_to_bin(float(a)) if np.isfinite(a) else -1 for a in age], dtype=np.int64)
        class2 = np.where(bin4 >= 0, (bin4 >= 2).astype(np.int64), -1)
    return {"pred_age": np.asarray(age, dtype=np.float64), "bin4_pred": bin4, "class2_pred": class2, "probs": probs}


@dataclass
class FilePrediction:
    """Result for one input file: predictions, or the one-line error that stopped it."""

    file: str
    pred_age: float | None = None
    bin4_pred: int | None = None
    class2_pred: int | None = None
    probs: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None


def find_nifti(inputs: Sequence[str | Path]) -> tuple[list[Path], list[FilePrediction]]:
    """Expand files and folders into NIfTI files (``*.nii``, ``*.nii.gz``; folders recursively, sorted).

    Returns:
        (files to process, error records for inputs that do not exist or hold no NIfTI).
    """
    files: list[Path] = []
    errors: list[FilePrediction] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.name.endswith((".nii", ".nii.gz")))
            if not found:
                errors.append(FilePrediction(str(p), error=f"{p}: folder holds no .nii or .nii.gz file"))
            files += found
        elif p.exists():
            files.append(p)
        else:
            errors.append(FilePrediction(str(p), error=f"{p}: no such file or folder"))
    return files, errors


def predict_files(
    lm: LoadedModel, paths: Sequence[str | Path], sex: Literal["M", "F", "unknown"] = "unknown"
) -> list[FilePrediction]:
    """Preprocess raw T1w NIfTI files as the run's shards were, then predict each.

    A file that cannot be read or is not one 3D volume gets a one-line ``error`` naming it;
    the other files are still processed.

    Args:
        lm: the loaded model.
        paths: NIfTI files (any shape, voxel size, orientation; skull-stripped).
        sex: ``"M"``, ``"F"``, or ``"unknown"`` (mean of the predictions for both sexes;
            models that ignore sex give the same answer).

    Returns:
        One :class:`FilePrediction` per path, in order.
    """
    from brainage_hpc.ingest.preprocess import PreprocessConfig, preprocess_volume

    if sex not in SEX_CHOICES:
        raise ValueError(f"sex={sex!r} is not valid. Valid: {', '.join(SEX_CHOICES)}")
    if not lm.preprocess:
        raise ValueError(f"{lm.source}: the run recorded no preprocessing config; cannot prepare raw NIfTI files")
    pcfg = PreprocessConfig.from_dict(lm.preprocess)
    if tuple(pcfg.shape) != tuple(lm.shape):
        raise ValueError(f"{lm.source}: preprocessing shape {pcfg.shape} differs from the model's {lm.shape}")
    sexes = [1.0, 0.0] if sex == "unknown" else [1.0 if sex == "M" else 0.0]
    results: list[FilePrediction] = []
    for path in paths:
        try:
            vol = preprocess_volume(path, pcfg)  # (D, H, W) float16
        except (OSError, ValueError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            results.append(FilePrediction(str(path), error=msg if str(path) in msg else f"{path}: {msg}"))
            continue
        image = torch.from_numpy(vol.astype(np.float32))[None, None].expand(len(sexes), 1, *vol.shape)
        out = predict_batch(lm, image, torch.tensor(sexes))
        probs = out["probs"].mean(0)
        age = float(out["pred_age"].mean())
        if not np.isfinite(age):
            results.append(FilePrediction(str(path), error=f"{path}: the model gave a non-finite prediction"))
            continue
        if lm.n_classes == 4:
            bin4, class2 = int(probs.argmax()), int(probs[2:].sum() >= 0.5)
        elif lm.n_classes == 2:
            bin4, class2 = None, int(probs.argmax())
        else:
            from brainage_hpc.data.ages import age_to_bin

            bin4 = age_to_bin(age)
            class2 = int(bin4 >= 2)
        results.append(FilePrediction(str(path), age, bin4, class2, [float(p) for p in probs]))
    return results
