"""Inference with a trained run: load the model, predict batches.

A run folder (plain or DeepSpeed) or an exported ``model.pt`` carries everything
inference needs: weights, the run config, the volume shape, the shard grid's
affine and the preprocessing config. Scoring NIfTI files (a cohort, resumable,
in parallel) is :mod:`brainage_hpc.evaluation.cohort_predict`.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from brainage_hpc.config import RunConfig

__all__ = [
    "LoadedModel",
    "SEX_CHOICES",
    "class_centres",
    "load_model",
    "predict_batch",
    "read_calibration",
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
        device: where the model lives (CPU for ONNX/TorchScript exports).
        fingerprint: preprocessing fingerprint of the training shards (contract 4), when recorded.
        calibration: the run's ``calibration.json`` (contract 7), when present.
        members: the runs of an ensemble (:mod:`brainage_hpc.evaluation.ensemble`), None for one run.
    """

    model: nn.Module
    cfg: RunConfig
    shape: tuple[int, int, int]
    affine: np.ndarray
    preprocess: dict[str, Any]
    step: int | None
    source: Path
    device: torch.device
    fingerprint: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    members: list[str] | None = None

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


def load_model(path: str | Path, device: str | torch.device | None = None, use_calibration: bool = True) -> LoadedModel:
    """Load a run folder (plain or DeepSpeed), an exported ``model.pt``, ``.onnx`` or TorchScript file.

    Args:
        path: run folder or checkpoint/model file.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available (ONNX/TorchScript run on CPU).
        use_calibration: read and check the run's ``calibration.json``; False ignores it
            (``brainage calibrate`` refitting a stale one).

    Returns:
        The :class:`LoadedModel` in eval mode.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no checkpoint.
        ValueError: not a brainage checkpoint, or the weights do not fit the recorded model.
    """
    from brainage_hpc.config import ConfigError, config_from_dict
    from brainage_hpc.engine.checkpoint import load_inference_bundle
    from brainage_hpc.evaluation.exported import is_exported_file
    from brainage_hpc.models.registry import build_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder or checkpoint file")
    kind = is_exported_file(path)
    if kind is not None:
        return _load_exported(path, kind)
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
    calibration = (bundle.get("calibration") or read_calibration(path)) if use_calibration else None
    if calibration is not None:
        from brainage_hpc.evaluation.calibration import check_calibration
        from brainage_hpc.evaluation.exported import model_digest

        where = path / "calibration.json" if path.is_dir() and (path / "calibration.json").exists() else path
        calibration = check_calibration(calibration, where, model_digest(model))
    return LoadedModel(
        model=model.to(dev).eval(),
        cfg=cfg,
        shape=shape,  # type: ignore[arg-type]
        affine=np.asarray(affine, dtype=np.float64),
        preprocess=dict(bundle.get("preprocess") or {}),
        step=bundle.get("step"),
        source=path,
        device=dev,
        fingerprint=bundle.get("fingerprint"),
        calibration=calibration,
    )


def read_calibration(path: Path) -> dict[str, Any] | None:
    """A run folder's ``calibration.json`` (contract 7), or None; a ``*.json`` file itself is read too.

    Raises:
        ValueError: the file exists but is not readable JSON.
    """
    import json

    path = Path(path)
    target = path / "calibration.json" if path.is_dir() else (path if path.suffix == ".json" else None)
    if target is None or not target.exists():
        return None
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{target}: unreadable calibration ({type(exc).__name__}: {exc})") from None
    return data if isinstance(data, dict) else None


def _load_exported(path: Path, kind: Any) -> LoadedModel:
    from brainage_hpc.config import ConfigError, config_from_dict
    from brainage_hpc.evaluation.exported import load_exported

    module, meta = load_exported(path, kind)
    try:
        cfg = config_from_dict(dict(meta["config"]), source=str(path))
    except (ConfigError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: export holds no usable run config ({exc})") from None
    shape = tuple(int(s) for s in meta["shape"])
    return LoadedModel(
        model=module.eval(),
        cfg=cfg,
        shape=shape,  # type: ignore[arg-type]
        affine=np.asarray(meta.get("affine") if meta.get("affine") is not None else np.eye(4), dtype=np.float64),
        preprocess=dict(meta.get("preprocess") or {}),
        step=meta.get("step"),
        source=path,
        device=torch.device("cpu"),
        fingerprint=meta.get("fingerprint"),
        calibration=meta.get("calibration"),
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
        answer); ``class2_pred`` (B,) int; ``probs`` (B, K) float for classifiers, (B, 0) otherwise;
        ``features`` (B, F) penultimate features ((B, 0) when the model gives none); for an
        ensemble also ``member_ages`` (B, M).
    """
    from brainage_hpc.data.ages import age_to_bin
    from brainage_hpc.models.features import forward_with_features

    batch = {"image": image.to(lm.device, torch.float32), "sex": sex.to(lm.device, torch.float32)}
    out, feats = forward_with_features(lm.model, batch)
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
    result = {"pred_age": np.asarray(age, dtype=np.float64), "bin4_pred": bin4, "class2_pred": class2, "probs": probs,
              "features": np.zeros((n, 0)) if feats is None else feats.cpu().numpy().astype(np.float64)}
    if "member_ages" in out:  # an ensemble (evaluation.ensemble): members' ages (B, M)
        result["member_ages"] = out["member_ages"].float().cpu().numpy().astype(np.float64)
    return result
