"""MONAI train/eval transforms and the batched DeviceAugment (run on the CPU here)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from brainage_hpc.config import AugmentConfig
from brainage_hpc.data.transforms import DeviceAugment, eval_transforms, train_transforms

ALL_ON = AugmentConfig(
    enabled=True, flip_prob=1.0, flip_axes=[0, 1, 2], affine_prob=1.0, elastic_prob=1.0,
    intensity_prob=1.0, noise_prob=1.0,
)
SHAPES = [(1, 16, 16, 16), (1, 12, 20, 16)]


def _volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("aug", [AugmentConfig(), ALL_ON], ids=["default", "all_on"])
def test_train_transforms_keep_shape_and_dtype(shape: tuple[int, ...], aug: AugmentConfig) -> None:
    t = train_transforms(aug, seed=0)
    item = {"image": _volume(shape), "subject_id": "100206", "age": torch.tensor(25.0)}
    out = t(item)
    assert type(out["image"]) is torch.Tensor  # plain tensor, not a MetaTensor
    assert out["image"].shape == shape and out["image"].dtype == torch.float32
    assert out["subject_id"] == "100206" and out["age"].item() == 25.0
    assert torch.isfinite(out["image"]).all()


def test_train_transforms_accept_float16_input() -> None:
    out = train_transforms(ALL_ON, seed=0)({"image": _volume((1, 8, 8, 8)).half()})
    assert out["image"].dtype == torch.float32


def test_train_transforms_are_reproducible_with_a_seed() -> None:
    x = _volume((1, 16, 16, 16))
    outs = [train_transforms(ALL_ON, seed=s)({"image": x})["image"] for s in (3, 3, 4)]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    # a stream of outputs is reproducible too, and set_random_state resets it
    t = train_transforms(AugmentConfig(), seed=5)
    first = [t({"image": x})["image"] for _ in range(4)]
    t.set_random_state(seed=5)
    assert all(torch.equal(a, t({"image": x})["image"]) for a in first)


def test_flip_is_left_right_by_default() -> None:
    x = _volume((1, 6, 7, 8))
    aug = AugmentConfig(flip_prob=1.0, affine_prob=0.0, intensity_shift=0.0, intensity_scale=0.0, noise_std=0.0)
    assert torch.equal(train_transforms(aug, seed=0)({"image": x})["image"], x.flip(1))
    d = DeviceAugment(aug, seed=0)({"image": x[None]})["image"]
    assert torch.equal(d[0], x.flip(1))


def test_disabled_and_eval_transforms_are_identity() -> None:
    x = _volume((1, 8, 8, 8))
    for t in (eval_transforms(), train_transforms(AugmentConfig(enabled=False))):
        out = t({"image": x})["image"]
        assert type(out) is torch.Tensor and torch.equal(out, x)


@pytest.mark.parametrize(
    "change, match",
    [(dict(flip_prob=1.5), "flip_prob"), (dict(rotate_deg=-1.0), "rotate_deg"), (dict(flip_axes=[3]), "flip_axes")],
)
def test_invalid_config_is_rejected(change: dict, match: str) -> None:
    aug = dataclasses.replace(AugmentConfig(), **change)
    with pytest.raises(ValueError, match=match):
        train_transforms(aug)
    with pytest.raises(ValueError, match=match):
        DeviceAugment(aug)


@pytest.mark.parametrize("shape", [(3, 1, 16, 16, 16), (2, 1, 12, 20, 16)])
def test_device_augment_keeps_shape_and_dtype(shape: tuple[int, ...]) -> None:
    x = _volume(shape).half()
    batch = {"image": x, "age": torch.arange(shape[0], dtype=torch.float32), "subject_id": ["a"] * shape[0]}
    out = DeviceAugment(ALL_ON, seed=0)(batch)
    assert out["image"].shape == shape and out["image"].dtype == torch.float32
    assert out["age"] is batch["age"] and out["subject_id"] is batch["subject_id"]
    assert batch["image"] is x  # input not modified
    assert torch.isfinite(out["image"]).all()


def test_device_augment_is_reproducible() -> None:
    x = _volume((4, 1, 16, 16, 16))
    a, b, c = DeviceAugment(AugmentConfig(), seed=1), DeviceAugment(AugmentConfig(), seed=1), DeviceAugment(AugmentConfig(), seed=2)
    seq_a = [a({"image": x})["image"] for _ in range(3)]
    seq_b = [b({"image": x})["image"] for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(seq_a, seq_b))
    assert not torch.equal(seq_a[0], c({"image": x})["image"])
    assert not torch.equal(seq_a[0], seq_a[1])  # a stream, not a constant
    # state_dict round trip continues the same stream
    state = a.state_dict()
    nxt = a({"image": x})["image"]
    d = DeviceAugment(AugmentConfig(), seed=99)
    d.load_state_dict(state)
    assert torch.equal(d({"image": x})["image"], nxt)


def test_device_augment_identity_affine_and_translation() -> None:
    x = _volume((2, 1, 10, 12, 14))
    still = AugmentConfig(flip_prob=0.0, affine_prob=1.0, rotate_deg=0.0, scale=0.0, translate_vox=0.0,
                          intensity_shift=0.0, intensity_scale=0.0, noise_std=0.0)
    out = DeviceAugment(still, seed=0)({"image": x})["image"]
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    # a translation of t voxels moves content by t voxels along each axis (W here)
    da = DeviceAugment(dataclasses.replace(still, translate_vox=3.0), seed=0)
    theta = da._affine_theta(1, (10, 12, 14), torch.Generator().manual_seed(0), torch.device("cpu"))
    shift_w = theta[0, 0, 3].item() * 14 / 2  # normalised -> voxels
    assert -3.0 <= shift_w <= 3.0
    theta_int = theta.clone()
    theta_int[0, :, 3] = torch.tensor([2 * 2 / 14, 0.0, 0.0])  # exactly 2 voxels along W
    grid = torch.nn.functional.affine_grid(theta_int, [1, 1, 10, 12, 14], align_corners=False)
    moved = torch.nn.functional.grid_sample(x[:1], grid, align_corners=False)
    torch.testing.assert_close(moved[..., :-2], x[:1, ..., 2:], atol=1e-5, rtol=0)


def test_device_augment_rejects_unbatched_input() -> None:
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        DeviceAugment(AugmentConfig())({"image": torch.zeros(1, 8, 8, 8)})
