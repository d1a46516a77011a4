"""3D Grad-CAM and Grad-CAM++ for the brain-age models; NIfTI maps and PNG overlays.

Built on MONAI's ``monai.visualize.GradCAM`` (forward/backward hooks on one layer).
The channel weights are the gradients averaged over all three spatial axes
(D, H, W); the seed averaged over two axes only, which gives one weight per
channel *and* slice. The map ``ReLU(sum_c w_c A_c)`` is upsampled trilinearly to
the input grid and scaled to [0, 1] per subject (an all-zero map stays zero).

Differences from MONAI's defaults, and why:

* postprocessing: MONAI's ``default_normalizer`` maps (min, max) to (1, 0), i.e. it
  *inverts* the map; we scale by the maximum instead;
* Grad-CAM++: MONAI multiplies the gradients by ``exp(score)``, which overflows for
  scores above ~88 (a predicted age in years is such a score) and only rescales each
  subject's map; we leave it out, as the map is normalised anyway;
* the model is deep-copied and every ``inplace`` activation in the copy is switched
  off, so hooks never see an in-place-modified tensor and the caller's model is untouched.

The score is ``pred_age`` (years) for regressors and the logit of the target class
(default: the predicted class) for classifiers. Grad-CAM keeps only positive evidence,
so a regressor's map shows where features push the predicted age *up*
(``direction="older"``); ``direction="younger"`` explains ``-pred_age`` instead. A map
that is zero everywhere means nothing at that layer pushes the score that way.
"""

from __future__ import annotations

import copy
import difflib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DIRECTIONS", "METHODS", "GradCAM3d", "default_layer", "layer_choices", "run_gradcam", "save_overlay"]

METHODS: tuple[str, ...] = ("gradcam", "gradcampp")
DIRECTIONS: tuple[str, ...] = ("older", "younger")


def default_layer(model: nn.Module) -> str:
    """Name of the last conv block: ``features.<last>`` (CNN3d, SFCN), ``encoder.<last>`` (CVAE).

    Falls back to the last ``Conv3d`` of any other model.

    Raises:
        ValueError: the model has no ``Conv3d``.
    """
    for attr in ("features", "encoder"):
        seq = getattr(model, attr, None)
        if isinstance(seq, nn.Sequential) and len(seq):
            return f"{attr}.{len(seq) - 1}"
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv3d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv3d layer for Grad-CAM; pass a layer name")
    return convs[-1]


def layer_choices(model: nn.Module) -> list[str]:
    """Names of the conv layers and conv blocks of ``model`` (valid Grad-CAM layers)."""
    out = []
    for name, mod in model.named_modules():
        is_block = isinstance(mod, nn.Sequential) and any(isinstance(c, nn.Conv3d) for c in mod.children())
        if name and (isinstance(mod, nn.Conv3d) or is_block):
            out.append(name)
    return out


class _ScoreModel(nn.Module):
    """Adapter for MONAI: ``forward(x, sex) -> (B, K)`` scores of a dict-batch model."""

    def __init__(self, net: nn.Module, sign: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.sign = sign
        self.classify = getattr(net, "task", "regress") == "classify"

    def forward(self, x: Tensor, sex: Tensor) -> Tensor:
        out = self.net({"image": x, "sex": sex})
        return out["logits"] if self.classify else self.sign * out["pred_age"].reshape(-1, 1)  # (B, K) or (B, 1)


def _identity(x: Tensor) -> Tensor:
    return x


def _upsampler(size: Sequence[int]) -> Any:
    def up(x: Tensor) -> Tensor:
        return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)

    return up


def _make_cam(method: str, wrapper: nn.Module, target: str) -> Any:
    from monai.visualize import GradCAM

    class _GradCAMpp(GradCAM):
        """Grad-CAM++ (Chattopadhyay et al. 2018) without the per-subject ``exp(score)`` factor."""

        def compute_map(self, x, class_idx=None, retain_graph=False, layer_idx=-1, **kwargs):  # type: ignore[no-untyped-def]
            _, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
            acti, grad = acti[layer_idx], grad[layer_idx]
            b, c = grad.shape[:2]
            ones = [1] * (grad.dim() - 2)
            g2 = grad.pow(2)
            denom = 2 * g2 + (acti * grad.pow(3)).reshape(b, c, -1).sum(-1).reshape(b, c, *ones)
            denom = torch.where(denom != 0.0, denom, torch.ones_like(denom))
            weights = (g2 / denom * F.relu(grad)).reshape(b, c, -1).sum(-1).reshape(b, c, *ones)  # (B, C, 1, 1, 1)
            return F.relu((weights * acti).sum(1, keepdim=True))

    cls = GradCAM if method == "gradcam" else _GradCAMpp
    return cls(nn_module=wrapper, target_layers=target, upsampler=_upsampler, postprocessing=_identity)


class GradCAM3d:
    """Grad-CAM / Grad-CAM++ maps of one layer of a brain-age model.

    Args:
        model: a model taking ``{"image", "sex"}`` and returning ``pred_age`` (regress) or
            ``logits`` (``model.task == "classify"``). It is deep-copied, not modified.
        layer: module name in ``model.named_modules()``; default :func:`default_layer`.
        method: ``"gradcam"`` or ``"gradcampp"``.
        direction: regressors: explain what makes the predicted age ``"older"`` (default) or
            ``"younger"``; ignored for classifiers.

    Raises:
        ValueError: unknown method, direction or layer (with the valid options).

    Example:
        >>> from brainage_hpc.models.cnn3d import CNN3d
        >>> net = CNN3d(in_shape=(16, 16, 16), depth=2, width=2, padding="same")
        >>> cam = GradCAM3d(net)
        >>> cam.layer, cam(torch.randn(2, 1, 16, 16, 16), torch.zeros(2)).shape
        ('features.1', (2, 16, 16, 16))
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        method: Literal["gradcam", "gradcampp"] = "gradcam",
        direction: Literal["older", "younger"] = "older",
    ) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"Unknown direction '{direction}'. Valid: {', '.join(DIRECTIONS)}")
        if method not in METHODS:
            hint = difflib.get_close_matches(str(method), METHODS, n=1)
            did = f" Did you mean '{hint[0]}'?" if hint else ""
            raise ValueError(f"Unknown Grad-CAM method '{method}'.{did} Valid: {', '.join(METHODS)}")
        net = copy.deepcopy(model).eval()
        for mod in net.modules():
            if getattr(mod, "inplace", False):
                mod.inplace = False
        for p in net.parameters():
            p.requires_grad_(True)
        self.layer = layer or default_layer(net)
        names = {n for n, _ in net.named_modules() if n}
        if self.layer not in names:
            valid = layer_choices(net)
            hint = difflib.get_close_matches(self.layer, valid, n=1)
            did = f" Did you mean '{hint[0]}'?" if hint else ""
            raise ValueError(
                f"Layer '{self.layer}' is not a module of {type(model).__name__}.{did} Valid conv layers/blocks: {', '.join(valid)}"
            )
        self.method = method
        self.classify = getattr(net, "task", "regress") == "classify"
        self.direction = direction
        self._wrapper = _ScoreModel(net, sign=1.0 if direction == "older" else -1.0)
        self._cam = _make_cam(method, self._wrapper, f"net.{self.layer}")
        self._device = next(net.parameters()).device

    def __call__(self, image: Tensor, sex: Tensor, target: int | None = None) -> np.ndarray:
        """Maps for a batch.

        Args:
            image: (B, 1, D, H, W) z-scored volumes.
            sex: (B,) 0=F, 1=M.
            target: classifiers: class to explain (default: each subject's predicted class);
                ignored for regressors (the score is the predicted age).

        Returns:
            (B, D, H, W) float32 maps in [0, 1], finite, on the input grid.

        Raises:
            ValueError: the layer does not influence the score (no gradient reaches it).
        """
        x = image.detach().to(self._device, torch.float32).requires_grad_(True)  # lets the full backward hooks fire on inputs
        s = sex.to(self._device, torch.float32).reshape(-1)
        class_idx = target if self.classify else 0
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Backward hook for .* is not triggered")  # raised below instead
            try:
                maps = self._cam(x, class_idx=class_idx, sex=s)  # (B, 1, D, H, W)
            except (IndexError, KeyError):
                raise ValueError(f"layer '{self.layer}' does not influence the prediction (no gradient reaches it)") from None
        arr = np.nan_to_num(maps.detach().float().cpu().numpy()[:, 0], nan=0.0, posinf=0.0, neginf=0.0)
        peak = arr.reshape(arr.shape[0], -1).max(axis=1).reshape(-1, 1, 1, 1)
        return np.where(peak > 0, arr / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)


def save_overlay(image: np.ndarray, cam: np.ndarray, path: str | Path, title: str) -> Path:
    """PNG of axial, coronal and sagittal slices through the map's peak, map over the image.

    Args:
        image: (D, H, W) underlay (RAS, as in the shards).
        cam: (D, H, W) map in [0, 1].
        path: output PNG.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainage_hpc.report import ortho_slices, save_figure

    point = np.unravel_index(int(np.argmax(cam)), cam.shape) if cam.max() > 0 else None
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    lo, hi = np.percentile(image, [1, 99])
    for ax, (name, img), (_, c) in zip(axes, ortho_slices(image, point), ortho_slices(cam, point), strict=True):
        ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        shown = ax.imshow(np.ma.masked_less(c, 0.05), cmap="jet", origin="lower", vmin=0, vmax=1, alpha=0.5)
        ax.set_title(name)
        ax.axis("off")
    fig.colorbar(shown, ax=list(axes), shrink=0.8, label="Grad-CAM (normalised)")
    fig.suptitle(title)
    return save_figure(fig, path)


def run_gradcam(
    run: str | Path,
    shards: str | Path,
    out: str | Path,
    split: str = "test",
    subjects: Sequence[str] | None = None,
    layer: str | None = None,
    method: Literal["gradcam", "gradcampp"] = "gradcam",
    direction: Literal["older", "younger"] = "older",
    n_examples: int = 3,
    max_group: int = 0,
    batch_size: int = 2,
    device: str | None = None,
) -> dict[str, Any]:
    """Per-subject maps and the group-average map over a split, as NIfTI (shard-grid affine) and PNG.

    Writes ``gradcam-<subject>.nii.gz``/``.png`` for ``subjects`` (default: the first
    ``n_examples`` of the split), ``group-mean-gradcam.nii.gz``, ``group-mean-image.nii.gz``,
    ``group-mean.png``, ``gradcam.json`` and ``report.md`` into ``out``.

    Args:
        run: run folder or model file.
        shards: shard folder.
        out: output folder.
        split: split whose subjects are averaged.
        subjects: subject IDs for individual maps (must be in ``split``).
        layer: layer name (default: last conv block).
        method: ``"gradcam"`` or ``"gradcampp"``.
        direction: regressors: ``"older"`` (what raises the predicted age) or ``"younger"``.
        n_examples: individual maps when ``subjects`` is not given.
        max_group: average over the first ``max_group`` subjects only (0: all).
        batch_size: volumes per backward pass.
        device: torch device (default: CUDA when available).

    Returns:
        The dict written to ``gradcam.json``.
    """
    from brainage_hpc.data.dataset import ShardDataset
    from brainage_hpc.data.shards import load_manifest
    from brainage_hpc.evaluation.predict import load_model
    from brainage_hpc.report import markdown_table, save_nifti, write_json, write_report

    lm = load_model(run, device)
    manifest = load_manifest(shards)
    if tuple(manifest.shape) != tuple(lm.shape):
        raise ValueError(f"{manifest.root}: shards have shape {tuple(manifest.shape)}, the model was trained on {lm.shape}")
    ds = ShardDataset(manifest, split, task=lm.task)
    index = {s: i for i, s in enumerate(ds.subject_ids)}
    if subjects:
        missing = [s for s in subjects if s not in index]
        if missing:
            raise ValueError(f"subject(s) {', '.join(missing)} not in split '{split}' of {manifest.root}")
        chosen = list(dict.fromkeys(subjects))
    else:
        chosen = ds.subject_ids[: max(0, n_examples)]
    group = set(range(len(ds) if max_group <= 0 else min(max_group, len(ds))))
    todo = sorted(set(group) | {index[s] for s in chosen})
    cam = GradCAM3d(lm.model, layer=layer, method=method, direction=direction)
    affine = np.asarray(manifest.affine, dtype=np.float64)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cam_sum = np.zeros(lm.shape, dtype=np.float64)
    img_sum = np.zeros(lm.shape, dtype=np.float64)
    files, rows = [], []
    n_zero = 0
    for start in range(0, len(todo), max(1, batch_size)):
        idx = todo[start:start + max(1, batch_size)]
        items = [ds[i] for i in idx]
        image = torch.stack([it["image"] for it in items])  # (B, 1, D, H, W)
        maps = cam(image, torch.stack([it["sex"] for it in items]))  # (B, D, H, W)
        for i, it, m in zip(idx, items, maps, strict=True):
            vol = it["image"][0].numpy()
            if i in group:
                n_zero += int(m.max() <= 0)
                cam_sum += m
                img_sum += vol
            sid = it["subject_id"]
            if sid in chosen:
                save_nifti(m, affine, out_dir / f"gradcam-{sid}.nii.gz")
                save_overlay(vol, m, out_dir / f"gradcam-{sid}.png", f"{method} {sid} (age {float(it['age']):g}), layer {cam.layer}")
                files += [f"gradcam-{sid}.nii.gz", f"gradcam-{sid}.png"]
                rows.append([sid, float(it["age"]), f"[NIfTI](gradcam-{sid}.nii.gz)"])
    mean_cam = cam_sum / max(len(group), 1)
    mean_img = img_sum / max(len(group), 1)
    save_nifti(mean_cam, affine, out_dir / "group-mean-gradcam.nii.gz")
    save_nifti(mean_img, affine, out_dir / "group-mean-image.nii.gz")
    save_overlay(mean_img, mean_cam / max(mean_cam.max(), 1e-12), out_dir / "group-mean.png",
                 f"{method}: mean over {len(group)} subjects of '{split}', layer {cam.layer}")
    files += ["group-mean-gradcam.nii.gz", "group-mean-image.nii.gz", "group-mean.png"]
    score = "logit of the predicted class" if cam.classify else ("pred_age" if direction == "older" else "-pred_age") + " (years)"
    summary = {
        "run": str(run), "shards": str(manifest.root), "split": split, "model": lm.name, "task": lm.task,
        "method": method, "layer": cam.layer, "score": score, "subjects": chosen, "n_group": len(group),
        "n_zero_maps": n_zero, "shape": list(lm.shape), "affine": affine.tolist(), "files": files,
    }
    write_json(out_dir / "gradcam.json", summary)
    text = [
        f"- run `{run}` (model `{lm.name}`, task `{lm.task}`), split `{split}`; method `{method}`, layer `{cam.layer}`",
        f"- score explained: {summary['score']}; channel weights averaged over all three spatial axes",
        "- maps are NIfTI on the shard grid (affine of the shards), viewable over `group-mean-image.nii.gz`",
        f"- group mean over {len(group)} subjects: [group-mean-gradcam.nii.gz](group-mean-gradcam.nii.gz)",
    ]
    if n_zero:
        other = "younger" if direction == "older" else "older"
        text.append(f"- {n_zero} of {len(group)} maps are zero: nothing at this layer pushes the score that way "
                    f"(try `--direction {other}` or another `--layer`)")
    sections = [("Grad-CAM", text)]
    if rows:
        sections.append(("Subjects", markdown_table(["subject", "age", "map"], rows)))
    write_report(out_dir, f"Grad-CAM: {lm.name} on {split}", sections, ["group-mean.png"])
    return summary
