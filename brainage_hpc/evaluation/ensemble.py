"""Deep ensembles: several runs (e.g. the seeds of a sweep) used as one model.

``brainage predict/evaluate --checkpoint RUN1 RUN2 ...`` (or a sweep folder, whose
``sweep.json`` names its runs) loads every member and wraps them in
:class:`EnsembleModule`, a plain ``nn.Module`` with the model interface, so the rest of
inference (batches, cohort scoring, evaluate) is unchanged. Its outputs:

* ``pred_age``: the mean of the members' ages (years);
* ``logits``: log of the mean of the members' softmax (classifiers);
* ``member_ages`` (B, M): each member's age, whose standard deviation is the
  ``ensemble_sd`` column and normalises the conformal intervals
  (:mod:`brainage_hpc.evaluation.calibration`);
* ``features``: the first member's penultimate features (the OOD score).

Members must agree on the task, the input shape and, where recorded, the preprocessing
fingerprint (contract 4): otherwise one volume cannot be fed to all of them, and
loading is a one-line error. The ensemble's weight digest (``model_digest``) covers all
members, so its ``calibration.json`` (``brainage calibrate --checkpoint ... --out``) is
refused for any other set of weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from brainage_hpc.evaluation.predict import LoadedModel

__all__ = ["EnsembleModule", "expand_members", "load_models"]


class EnsembleModule(nn.Module):
    """Members run on the same batch; mean prediction, members' ages and the first member's features."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Args:
            batch: ``image`` (B, 1, D, H, W), ``sex`` (B,).
        Returns:
            ``pred_age`` (B,) (when every member gives one), ``member_ages`` (B, M), ``logits`` (B, K)
            for classifiers, ``features`` (B, F) of the first member.
        """
        from brainage_hpc.models.features import FEATURES_KEY, forward_with_features

        outs, feats = [], None
        for i, m in enumerate(self.members):
            out, f = forward_with_features(m, batch)
            outs.append(out)
            if i == 0:
                feats = f
        result: dict[str, Tensor] = {}
        if all("pred_age" in o for o in outs):
            ages = torch.stack([o["pred_age"].float() for o in outs], dim=1)  # (B, M)
            result["member_ages"] = ages
            result["pred_age"] = ages.mean(1)
        if all("logits" in o for o in outs):
            probs = torch.stack([torch.softmax(o["logits"].float(), dim=1) for o in outs]).mean(0)
            result["logits"] = torch.log(probs.clamp_min(1e-12))
        if feats is not None:
            result[FEATURES_KEY] = feats
        return result


def expand_members(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders/files from the ``--checkpoint`` arguments; a sweep folder stands for its runs.

    Raises:
        FileNotFoundError: a path does not exist, or a sweep folder has no run yet.
    """
    from brainage_hpc.launching.sweep import read_sweep

    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such run folder or checkpoint file")
        points = read_sweep(p) if p.is_dir() else []
        if points:
            runs = [p / pt.name for pt in points if (p / pt.name).is_dir()]
            if not runs:
                raise FileNotFoundError(f"{p}: sweep folder with no run folder yet")
            out += runs
        else:
            out.append(p)
    return out


def load_models(paths: Sequence[str | Path], device: str | torch.device | None = None,
                calibration: str | Path | None = None, use_calibration: bool = True) -> LoadedModel:
    """One run, or an ensemble of several, as a :class:`LoadedModel`.

    Args:
        paths: run folders, model files, or sweep folders (see :func:`expand_members`).
        device: torch device.
        calibration: a ``calibration.json`` to use instead of the run's (required to calibrate
            an ensemble's predictions, since no run folder holds it).
        use_calibration: False ignores every calibration (``brainage calibrate`` refits).

    Raises:
        FileNotFoundError, ValueError: a missing member, an export as a member, or members that disagree
            (task, input shape, preprocessing fingerprint) - one line naming the member.
    """
    from brainage_hpc.evaluation.calibration import check_calibration
    from brainage_hpc.evaluation.exported import ExportedModule, model_digest
    from brainage_hpc.evaluation.predict import load_model, read_calibration

    members = expand_members(paths)
    if not members:
        raise ValueError("--checkpoint: no run given")
    if len(members) == 1:
        lm = load_model(members[0], device, use_calibration)
    else:
        loaded = [load_model(m, device, use_calibration=False) for m in members]
        first = loaded[0]
        for m, lm_i in zip(members[1:], loaded[1:]):
            if isinstance(lm_i.model, ExportedModule) or isinstance(first.model, ExportedModule):
                raise ValueError(f"{m}: an ONNX/TorchScript export cannot be an ensemble member; use its run folder")
            if lm_i.task != first.task:
                raise ValueError(f"{m}: task {lm_i.task} differs from {members[0]}'s {first.task}; not one ensemble")
            if tuple(lm_i.shape) != tuple(first.shape):
                raise ValueError(f"{m}: input shape {lm_i.shape} differs from {members[0]}'s {first.shape}; not one ensemble")
            if first.fingerprint and lm_i.fingerprint and lm_i.fingerprint != first.fingerprint:
                raise ValueError(f"{m}: preprocessing fingerprint differs from {members[0]}'s; not one ensemble")
            if first.preprocess and lm_i.preprocess and lm_i.preprocess != first.preprocess:
                raise ValueError(f"{m}: preprocessing config differs from {members[0]}'s; not one ensemble")
        module = EnsembleModule([x.model for x in loaded]).eval()
        lm = dataclasses.replace(first, model=module, source=Path(members[0]), calibration=None,
                                 members=[str(m) for m in members])
        sweep_cal = Path(paths[0]) / "calibration.json"
        if calibration is None and use_calibration and len(paths) == 1 and sweep_cal.is_file():
            calibration = sweep_cal  # a sweep folder's own ensemble calibration
    if calibration is not None and use_calibration:
        cal: Any = read_calibration(Path(calibration))
        if cal is None:
            raise FileNotFoundError(f"{calibration}: no such calibration file")
        lm.calibration = check_calibration(cal, calibration, None if isinstance(lm.model, ExportedModule)
                                           else model_digest(lm.model))
    return lm
