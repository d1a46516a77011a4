"""Faithfulness metrics on known maps, and every attribution method on a model with a planted age effect."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from brainage_hpc.interpret.faithfulness import (
    brain_mask,
    enrichment,
    perturbation_curves,
    spearman,
    truth_from_correlation,
)
from brainage_hpc.interpret.methods import attribute, check_methods

S = 16
BOX = (slice(3, 8), slice(8, 14), slice(5, 10))  # off-centre, different per axis


def _truth() -> np.ndarray:
    t = np.zeros((S, S, S))
    t[BOX] = 1.0
    return t


def test_enrichment_and_spearman_on_known_maps():
    rng = np.random.default_rng(0)
    truth = rng.random((S, S, S))
    mask = np.ones((S, S, S), bool)
    top = truth >= np.quantile(truth, 0.9)
    assert enrichment(top.astype(float), truth, mask) == pytest.approx(1 / 0.1, rel=0.02)  # all mass in the top 10 %
    assert enrichment(np.ones_like(truth), truth, mask) == pytest.approx(1.0, rel=0.02)  # chance
    assert enrichment(np.zeros_like(truth), truth, mask) == 0.0
    assert enrichment((~top).astype(float), truth, mask) == 0.0
    assert spearman(truth**3, truth, mask) == pytest.approx(1.0)
    assert spearman(-truth, truth, mask) == pytest.approx(-1.0)
    half = np.zeros_like(mask)
    half[:8] = True  # outside the mask nothing counts
    top_half = truth >= np.quantile(truth[half], 0.9)
    assert enrichment(np.where(half, top_half, 5.0), truth, half) == pytest.approx(10.0, rel=0.02)
    with pytest.raises(ValueError, match="does not match the map"):
        enrichment(np.ones((S, S, S)), np.ones((S, S, S + 1)), mask)


def test_correlation_truth_finds_the_voxels_that_change_with_age():
    rng = np.random.default_rng(1)
    ages = rng.uniform(22, 37, 30)
    vols = rng.normal(size=(30, S, S, S))
    vols[(slice(None), *BOX)] += (ages - 29)[:, None, None, None] * 0.5
    mask = brain_mask(vols, background=1e9)
    r = truth_from_correlation(vols, ages, mask)
    assert r[BOX].mean() > 0.9 and np.delete(r.ravel(), np.flatnonzero(_truth().ravel())).mean() < 0.3


class Planted(nn.Module):
    """Conv features, then a dense head that reads only the box (+) : age = 30 + mean(box)."""

    task = "regress"

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU()))
        with torch.no_grad():
            self.features[0][0].weight.zero_()
            self.features[0][0].weight[:, :, 1, 1, 1] = torch.tensor([[1.0], [-1.0]])
            self.features[0][0].bias.zero_()
        w = torch.zeros(2, S, S, S)
        w[(slice(None), *BOX)] = torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1)
        self.register_buffer("w", w / torch.tensor(_truth().sum()))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        a = self.features(batch["image"])
        return {"pred_age": 30.0 + 10.0 * (a * self.w).sum((1, 2, 3, 4))}


class PlantedCVAE(nn.Module):
    """CVAE stand-in: latent 0 is the age, decoding puts age-dependent intensity into the box only."""

    task = "regress"
    age_center, age_scale = 29.0, 4.0

    def __init__(self) -> None:
        super().__init__()
        self.prior = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.prior.weight.copy_(torch.tensor([[1.0], [0.0]]))
        self.register_buffer("box", torch.from_numpy(_truth()).float())

    def encode(self, image, sex):  # noqa: ANN001, ANN201
        from brainage_hpc.models.cvae import CVAEEncoding

        b = image.shape[0]
        return CVAEEncoding(torch.zeros(b, 2), torch.zeros(b, 2), torch.full((b,), 30.0), None)

    def decode(self, z, sex):  # noqa: ANN001, ANN201
        return (1.0 + z[:, 0].reshape(-1, 1, 1, 1, 1) * self.box)[:, None].reshape(-1, 1, S, S, S)

    def prior_mean(self, cond):  # noqa: ANN001, ANN201
        return self.prior(cond)

    def forward(self, batch):  # noqa: ANN001, ANN201
        return {"pred_age": torch.full((batch["image"].shape[0],), 30.0)}


@pytest.mark.parametrize("method", ["gradcam", "occlusion", "ig", "smoothgrad"])
def test_each_method_puts_its_mass_on_the_planted_region(method):
    torch.manual_seed(0)
    x = torch.rand(2, 1, S, S, S) + 0.5
    maps = attribute(method, Planted(), x, torch.zeros(2), patch=4, samples=4, steps=8)
    assert maps.shape == (2, S, S, S) and np.isfinite(maps).all() and maps.min() >= 0
    mask = np.ones((S, S, S), bool)
    truth = _truth() + np.random.default_rng(0).random((S, S, S)) * 1e-3  # ties broken, box still on top
    for m in maps:
        assert enrichment(m, truth, mask) >= 3.0, method  # box = 9.4 % of the volume: at most ~10.6x


def test_counterfactual_shows_what_ageing_changes():
    maps = attribute("counterfactual", PlantedCVAE(), torch.rand(2, 1, S, S, S), torch.zeros(2))
    truth = _truth() + np.random.default_rng(0).random((S, S, S)) * 1e-3
    assert enrichment(maps[0], truth, np.ones((S, S, S), bool)) > 9.0


def test_method_errors_are_one_line():
    with pytest.raises(ValueError, match="unknown method 'gradcm'. Did you mean 'gradcam'"):
        check_methods(["gradcm"], False, "run")
    with pytest.raises(ValueError, match="Planted: method .counterfactual. needs a conditional VAE run"):
        attribute("counterfactual", Planted(), torch.rand(1, 1, S, S, S), torch.zeros(1))


def test_deletion_in_map_order_beats_random_order():
    net = Planted()
    x = torch.rand(1, S, S, S) + 0.5
    mask = np.ones((S, S, S), bool)

    def f(v: torch.Tensor) -> torch.Tensor:
        return net({"image": v, "sex": torch.zeros(v.shape[0])})["pred_age"]

    good = perturbation_curves(f, x, _truth(), mask, background=0.0, steps=5, fraction=0.2)
    bad = perturbation_curves(f, x, 1 - _truth(), mask, background=0.0, steps=5, fraction=0.2)
    assert good["aopc_deletion"] > 3 * good["aopc_random"] > 0
    assert good["aopc_deletion"] > bad["aopc_deletion"] and good["aopc_insertion"] > bad["aopc_insertion"]
    assert len(good["deletion"]) == 6 and good["deletion"][0] == pytest.approx(0.0)


def test_truth_nifti_on_the_shard_grid_is_used_as_is_and_other_grids_need_a_reference(tmp_path):
    from brainage_hpc.interpret.truth import load_truth_map
    from brainage_hpc.report import save_nifti

    signed = np.where(_truth() > 0, -2.0, 0.5)
    path = save_nifti(signed, np.eye(4), tmp_path / "age_effect.nii.gz")
    np.testing.assert_allclose(load_truth_map(path, (S, S, S), None), np.abs(signed))
    with pytest.raises(ValueError, match=r"has shape \(16, 16, 16\), the shards \(8, 8, 8\), and there is no reference_brain"):
        load_truth_map(path, (8, 8, 8), {"shape": [8, 8, 8]})
