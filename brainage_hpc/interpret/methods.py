"""Attribution methods for brain-age models, one function per method, one map per subject.

Every method takes the model, a batch ``image`` (B, 1, D, H, W) and ``sex`` (B,) and
returns non-negative (B, D, H, W) float32 maps on the input grid (larger = more
important to the predicted age). The score is ``pred_age`` (years) when the model gives
one, else the logit of the predicted class.

* ``gradcam``: :class:`~brainage_hpc.interpret.gradcam.GradCAM3d` with its (fixed) defaults;
* ``occlusion``: MONAI ``OcclusionSensitivity``; patches set to the background value,
  ``|pred(occluded) - pred|`` per patch (no gradients: the most model-agnostic method);
* ``ig``: Captum ``IntegratedGradients`` from the background (blank) volume, ``|attr|``;
* ``smoothgrad``: Captum ``NoiseTunnel(Saliency)``, mean ``|grad|`` over noisy copies;
* ``counterfactual`` (CVAE only): encode the subject, move its latent along the age prior
  from its age ``a`` to ``a + delta`` and decode both: ``|decode(z_{a+delta}) - decode(z_a)|``,
  i.e. what the generative model changes in *this* brain when it ages.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["CVAE_METHODS", "METHODS", "attribute", "check_methods", "score_fn"]

METHODS: tuple[str, ...] = ("gradcam", "occlusion", "ig", "smoothgrad", "counterfactual")
CVAE_METHODS: tuple[str, ...] = ("counterfactual",)


def check_methods(methods: list[str], is_cvae: bool, source: str) -> None:
    """Raise ValueError for an unknown method or a CVAE-only method on another model."""
    import difflib

    for m in methods:
        if m not in METHODS:
            hint = difflib.get_close_matches(m, METHODS, n=1)
            did = f" Did you mean '{hint[0]}'?" if hint else ""
            raise ValueError(f"unknown method '{m}'.{did} Valid: {', '.join(METHODS)}")
        if m in CVAE_METHODS and not is_cvae:
            raise ValueError(f"{source}: method '{m}' needs a conditional VAE run (encode/decode); this model is not one")


def _plain(model: nn.Module) -> nn.Module:
    net = copy.deepcopy(model).eval()
    for mod in net.modules():
        if getattr(mod, "inplace", False):
            mod.inplace = False
    return net


def score_fn(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """``(image, sex) -> (B,)`` score: ``pred_age`` if the model gives one, else the top logit."""

    def f(x: Tensor, sex: Tensor) -> Tensor:
        out = model({"image": x, "sex": sex.expand(x.shape[0]) if sex.numel() == 1 else sex})
        if "pred_age" in out:
            return out["pred_age"].float().reshape(-1)
        return out["logits"].float().max(1).values

    return f


def _gradcam(model: nn.Module, image: Tensor, sex: Tensor, **kw: Any) -> np.ndarray:
    from brainage_hpc.interpret.gradcam import GradCAM3d

    return GradCAM3d(model, layer=kw.get("layer")).__call__(image, sex)


def _occlusion(model: nn.Module, image: Tensor, sex: Tensor, *, patch: int = 6, background: float = 0.0,
               n_batch: int = 32, **_: Any) -> np.ndarray:
    from monai.visualize import OcclusionSensitivity

    net = _plain(model)
    f = score_fn(net)
    maps = []
    for x, s in zip(image, sex, strict=True):
        x1 = x[None]

        class _Fixed(nn.Module):
            def forward(self, v: Tensor) -> Tensor:
                return f(v, s.reshape(1)).reshape(-1, 1)

        occ = OcclusionSensitivity(_Fixed(), mask_size=patch, n_batch=n_batch, mode=float(background), overlap=0.0,
                                   activate=False, verbose=False)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence")  # inside MONAI's indexing
            full = f(x1, s.reshape(1))[0]
            occ_map, _ = occ(x1)  # (1, 1, D, H, W): score with the patch around each voxel occluded
        maps.append((occ_map[0, 0].as_tensor() if hasattr(occ_map, "as_tensor") else occ_map[0, 0]) - full)
    return torch.stack(maps).abs().float().cpu().numpy()


def _ig(model: nn.Module, image: Tensor, sex: Tensor, *, background: float = 0.0, steps: int = 16, **_: Any) -> np.ndarray:
    from captum.attr import IntegratedGradients

    f = score_fn(_plain(model))
    ig = IntegratedGradients(f)
    attr = ig.attribute(image, baselines=torch.full_like(image, background), additional_forward_args=(sex,),
                        n_steps=steps, internal_batch_size=max(2, steps))
    return attr[:, 0].abs().detach().float().cpu().numpy()


def _smoothgrad(model: nn.Module, image: Tensor, sex: Tensor, *, samples: int = 12, noise: float = 0.15,
                seed: int = 0, **_: Any) -> np.ndarray:
    from captum.attr import NoiseTunnel, Saliency

    f = score_fn(_plain(model))
    torch.manual_seed(seed)
    stdev = float(noise * (image.max() - image.min()))
    attr = NoiseTunnel(Saliency(f)).attribute(image, nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=4,
                                              stdevs=stdev, additional_forward_args=(sex,))
    return attr[:, 0].abs().detach().float().cpu().numpy()


def _counterfactual(model: nn.Module, image: Tensor, sex: Tensor, *, delta: float = 10.0, **_: Any) -> np.ndarray:
    import torch.nn.functional as F

    net = model.eval()

    def cond(age: Tensor) -> Tensor:
        if getattr(net, "task", "regress") != "classify":
            return ((age - net.age_center) / net.age_scale).unsqueeze(1)
        from brainage_hpc.data.ages import age_to_bin, bin_to_class

        cls = [bin_to_class(age_to_bin(float(a)), int(net.num_classes)) for a in age]
        return F.one_hot(torch.tensor(cls, device=age.device), net.num_classes).float()

    with torch.no_grad():
        enc = net.encode(image, sex)
        age = enc.age.float() if getattr(net, "task", "regress") != "classify" else None
        if age is None:  # classifier CVAE: expected age of the predicted class is not needed, only the shift
            from brainage_hpc.evaluation.predict import class_centres

            age = torch.as_tensor(class_centres(int(net.num_classes)), device=image.device)[enc.age.argmax(1)].float()
        shift = net.prior_mean(cond(age + delta)).float() - net.prior_mean(cond(age)).float()
        young = net.decode(enc.mu, sex).float()
        old = net.decode(enc.mu + shift, sex).float()
    return (old - young)[:, 0].abs().cpu().numpy()


_IMPL: dict[str, Callable[..., np.ndarray]] = {
    "gradcam": _gradcam, "occlusion": _occlusion, "ig": _ig, "smoothgrad": _smoothgrad, "counterfactual": _counterfactual,
}


def attribute(method: str, model: nn.Module, image: Tensor, sex: Tensor, **options: Any) -> np.ndarray:
    """(B, D, H, W) non-negative float32 maps of ``method`` (see the module docstring).

    Raises:
        ValueError: unknown method.
    """
    check_methods([method], hasattr(model, "encode") and hasattr(model, "decode"), type(model).__name__)
    dev = next(model.parameters()).device
    maps = _IMPL[method](model, image.to(dev, torch.float32), sex.to(dev, torch.float32).reshape(-1), **options)
    return np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
