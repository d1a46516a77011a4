"""3D Grad-CAM / Grad-CAM++: localisation on a toy model, shapes, layers, NIfTI and PNG outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from brainage_hpc.interpret.gradcam import GradCAM3d, default_layer, layer_choices, save_overlay
from brainage_hpc.models.cnn3d import CNN3d
from brainage_hpc.models.cvae import ConditionalVAE3d
from brainage_hpc.models.sfcn import SFCN
from brainage_hpc.report import save_nifti

S = 32
# off-centre and at different positions per axis, so a flipped or permuted map would miss it
BOX = (slice(4, 16), slice(14, 26), slice(8, 20))


class BoxModel(nn.Module):
    """Toy regressor whose output depends only on the voxels inside ``BOX``."""

    task = "regress"

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, S, S, S)
        mask[(0, 0, *BOX)] = 1.0
        self.register_buffer("mask", mask)
        self.features = nn.Sequential(nn.Sequential(nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.ReLU(inplace=True)))
        self.fc = nn.Linear(4, 1)
        with torch.no_grad():  # positive weights: more signal in the box -> older
            self.features[0][0].weight.abs_()
            self.fc.weight.abs_()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        a = self.features(batch["image"] * self.mask)  # (B, 4, D, H, W)
        return {"pred_age": self.fc(a.mean((2, 3, 4)))[:, 0] + 30.0}


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_map_mass_lies_in_the_box(method):
    torch.manual_seed(0)
    net = BoxModel()
    x = torch.rand(2, 1, S, S, S) + 0.5
    maps = GradCAM3d(net, method=method)(x, torch.zeros(2))
    assert maps.shape == (2, S, S, S)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() == pytest.approx(1.0)
    inside = maps[(slice(None), *BOX)].sum(axis=(1, 2, 3)) / maps.sum(axis=(1, 2, 3))
    assert (inside >= 0.8).all(), inside


@pytest.mark.parametrize(
    "model, layer",
    [
        # the deepest block with >= 8 voxels per axis (24 -> 12 -> 6 with 'same' padding)
        (CNN3d(in_shape=(24, 24, 24), depth=2, width=4, padding="same"), "features.0"),
        (CNN3d(in_shape=(24, 24, 24), task="classify", num_classes=4, depth=2, width=4), "features.0"),
        (SFCN(in_shape=(24, 24, 24), channels=(4, 8, 8, 4)), "features.0"),
        (ConditionalVAE3d(in_shape=(24, 24, 24), channels=(4, 8, 8), padding="same", feature_dim=8, latent_dim=4), "encoder.0"),
    ],
)
@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_real_models_give_finite_maps_on_the_input_grid(model, layer, method):
    torch.manual_seed(0)
    model.eval()
    assert default_layer(model) == layer
    inplace_before = [getattr(m, "inplace", None) for m in model.modules()]
    cam = GradCAM3d(model, method=method, direction="younger")
    maps = cam(torch.randn(2, 1, 24, 24, 24), torch.tensor([0.0, 1.0]))
    assert maps.shape == (2, 24, 24, 24) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and 0 <= maps.min() and maps.max() <= 1
    # the caller's model is untouched: no hooks, in-place flags as before
    assert [getattr(m, "inplace", None) for m in model.modules()] == inplace_before
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_classifier_target_class_and_layer_errors():
    torch.manual_seed(0)
    net = CNN3d(in_shape=(24, 24, 24), task="classify", num_classes=4, depth=2, width=4).eval()
    cam = GradCAM3d(net, layer="features.0.conv2")
    maps = cam(torch.randn(1, 1, 24, 24, 24), torch.zeros(1), target=3)
    assert maps.shape == (1, 24, 24, 24) and np.isfinite(maps).all()
    assert "features.0.conv2" in layer_choices(net)
    with pytest.raises(ValueError, match=r"Layer 'features\.7' is not a module of CNN3d\. Did you mean"):
        GradCAM3d(net, layer="features.7")
    with pytest.raises(ValueError, match="Unknown Grad-CAM method 'gradcamm'. Did you mean 'gradcam'"):
        GradCAM3d(net, method="gradcamm")  # type: ignore[arg-type]


def test_layer_off_the_prediction_path_is_a_clear_error():
    vae = ConditionalVAE3d(in_shape=(16, 16, 16), channels=(4, 8), padding="same", feature_dim=8, latent_dim=4).eval()
    cam = GradCAM3d(vae, layer="decoder.0")  # the decoder does not feed pred_age
    with pytest.raises(ValueError, match="does not influence the prediction"):
        cam(torch.randn(1, 1, 16, 16, 16), torch.zeros(1))


def test_nifti_keeps_the_affine_and_png_is_written(tmp_path):
    import nibabel as nib

    affine = np.array([[5.0, 0, 0, -77.5], [0, 5.0, 0, -77.5], [0, 0, 5.0, -77.5], [0, 0, 0, 1]])
    maps = GradCAM3d(BoxModel())(torch.rand(1, 1, S, S, S) + 0.5, torch.zeros(1))
    path = save_nifti(maps[0], affine, tmp_path / "cam.nii.gz")
    img = nib.load(path)
    assert img.shape == (S, S, S)
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_allclose(np.asarray(img.dataobj), maps[0])
    png = save_overlay(np.random.rand(S, S, S), maps[0], tmp_path / "cam.png", "toy")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cam.nii.gz", "cam.png"]  # no temp files left


def test_default_layer_skips_blocks_too_coarse_to_localise():
    net = CNN3d(in_shape=(48, 56, 48), depth=3, width=2)  # the demo geometry: 22x26x22 -> 9x11x9 -> 2x3x2
    assert default_layer(net) == "features.1"
    assert default_layer(nn.Sequential(nn.Conv3d(1, 2, 3))) == "0"  # no in_shape: the last Conv3d


class SplitModel(nn.Module):
    """Regressor with a dense (not pooled) head: +box A, -box B. Classic Grad-CAM cancels them."""

    task = "regress"

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Sequential(nn.Conv3d(1, 1, 1, bias=False)))
        with torch.no_grad():
            self.features[0][0].weight.fill_(1.0)
        w = torch.zeros(1, 1, S, S, S)
        w[(0, 0, *BOX)] = 1.0
        w[0, 0, 20:30, 2:12, 22:30] = -1.0
        self.register_buffer("w", w / w.abs().sum())

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        a = self.features(batch["image"])
        return {"pred_age": (a * self.w).sum((1, 2, 3, 4)) + 30.0}


def test_elementwise_abs_finds_both_signed_regions_where_classic_gradcam_does_not():
    x = torch.rand(2, 1, S, S, S) + 0.5
    both = np.zeros((S, S, S), bool)
    both[BOX] = True
    both[20:30, 2:12, 22:30] = True
    new = GradCAM3d(SplitModel())(x, torch.zeros(2))
    share = new[:, both].sum(1) / new.reshape(2, -1).sum(1)
    assert (share > 0.99).all(), share
    old = GradCAM3d(SplitModel(), weighting="pooled", direction="older")(x, torch.zeros(2))
    old_share = old[:, both].sum(1) / np.maximum(old.reshape(2, -1).sum(1), 1e-12)
    assert (old_share < 0.5).all(), old_share  # a spatially constant weight cannot localise
    with pytest.raises(ValueError, match="Unknown weighting"):
        GradCAM3d(SplitModel(), weighting="mean")  # type: ignore[arg-type]
