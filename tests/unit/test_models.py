"""Model zoo: shapes, losses, gradients, parameter counts, geometry errors, registry, summary.

Fast (CPU, < 1 min): tiny widths at 32³/64³, the seed CNN and CVAE at their real
widths at 128³ with batch 1-2, SFCN's size counted on the meta device.
"""

from __future__ import annotations

import argparse
import doctest
import math
from types import SimpleNamespace

import pytest
import torch

from brainage_hpc.models import (
    MODEL_NAMES,
    SFCN,
    CNN3d,
    ConditionalVAE3d,
    build_model,
    kl_to_prior,
    model_params,
    param_count,
    resolve_task,
    soft_age_labels,
    summarize,
)

NAN = float("nan")


@pytest.fixture(autouse=True)
def cap_threads():
    """Budget: < 1 min on 2 CPU cores; the global setting is restored for other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))  # never more than 2; honours OMP_NUM_THREADS=1 from the Makefile
    yield
    torch.set_num_threads(before)


def make_batch(shape: tuple[int, int, int], batch: int = 2, task: str = "regress", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"image": torch.randn(batch, 1, *shape, generator=g), "sex": (torch.arange(batch) % 2).float()}
    if task == "regress":
        out["age"] = 22.0 + 15.0 * torch.rand(batch, generator=g)
    else:
        out["label"] = torch.arange(batch) % 4
    return out


def first_conv(model: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv3d))


# (id, class, own params, in_shape, batch): small widths at 32³/64³, real widths at the seed's 128³.
SHAPE_TABLE = [
    ("cnn3d-64-valid", CNN3d, {"width": 4, "depth": 3}, (64, 64, 64), 2),
    ("cnn3d-32-same", CNN3d, {"width": 4, "depth": 3, "padding": "same"}, (32, 32, 32), 2),
    ("cnn3d-anisotropic", CNN3d, {"width": 4, "depth": 2}, (40, 48, 36), 2),
    ("cnn3d-seed-128", CNN3d, {}, (128, 128, 128), 1),
    ("sfcn-64", SFCN, {"channels": (4, 8, 16, 16, 16, 8)}, (64, 64, 64), 2),
    ("sfcn-32-short", SFCN, {"channels": (4, 8, 8, 4)}, (32, 32, 32), 2),
    ("cvae-64", ConditionalVAE3d, {"channels": (4, 8, 8, 16), "feature_dim": 32}, (64, 64, 64), 2),
    ("cvae-32-same", ConditionalVAE3d, {"channels": (4, 8, 8), "padding": "same"}, (32, 32, 32), 2),
    ("cvae-seed-128", ConditionalVAE3d, {}, (128, 128, 128), 2),
]


# The seed CNN at 128³ (the slowest case, ~3 s) runs for one task only.
FORWARD_CASES = [
    pytest.param(*row[1:], task, id=f"{row[0]}-{task}")
    for row in SHAPE_TABLE
    for task in ("regress", "classify")
    if not (row[0] == "cnn3d-seed-128" and task == "classify")
]


@pytest.mark.parametrize(("cls", "params", "shape", "batch", "task"), FORWARD_CASES)
def test_forward_backward(cls, params, shape, batch, task):
    torch.manual_seed(0)
    model = cls(in_shape=shape, task=task, num_classes=4, **params)
    out = model(make_batch(shape, batch, task))
    if task == "regress":
        assert out["pred_age"].shape == (batch,)
        assert "loss/age" in out
    else:
        assert out["logits"].shape == (batch, 4)
        assert "loss/cls" in out
    if cls is ConditionalVAE3d:
        assert out["recon"].shape == (batch, 1, *shape)
        for key in ("mu", "logvar", "prior_mu"):
            assert out[key].shape == (batch, model.latent_dim)
        assert {"loss/recon", "loss/kl"} <= set(out)
    losses = {k: v for k, v in out.items() if k == "loss" or k.startswith("loss/")}
    for name, value in losses.items():
        assert value.shape == () and value.dtype == torch.float32 and torch.isfinite(value), name
    out["loss"].backward()
    grad = first_conv(model).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # DDP without find_unused_parameters needs every parameter in the graph.
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters without gradient: {unused}"
    print(f"{cls.__name__} {shape} {task}: {param_count(model):,} params")


def test_no_targets_no_loss():
    for model in (
        CNN3d(in_shape=(32, 32, 32), depth=2),
        SFCN(in_shape=(32, 32, 32), channels=(4, 4, 4)),
        ConditionalVAE3d(in_shape=(32, 32, 32), channels=(4, 8), padding="same"),
    ):
        out = model({"image": torch.randn(2, 1, 32, 32, 32), "sex": torch.zeros(2)})
        assert out["pred_age"].shape == (2,)
        assert not any(k.startswith("loss") for k in out)


@pytest.mark.parametrize(
    "model",
    [
        CNN3d(in_shape=(32, 32, 32), depth=2, loss="mse"),
        SFCN(in_shape=(32, 32, 32), channels=(4, 4, 4)),
        ConditionalVAE3d(in_shape=(32, 32, 32), channels=(4, 8), padding="same"),
    ],
    ids=["cnn3d", "sfcn", "cvae"],
)
def test_unknown_ages_are_masked(model):
    image = torch.randn(3, 1, 32, 32, 32)
    sex = torch.tensor([0.0, 1.0, 0.0])
    out = model({"image": image, "sex": sex, "age": torch.full((3,), NAN)})
    assert out["loss/age"].item() == 0.0 and out["loss/age"].requires_grad
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()
    model.eval()  # no dropout/sampling: NaN rows must not change the loss of the known rows
    part = model({"image": image, "sex": sex, "age": torch.tensor([25.0, NAN, 31.0])})["loss/age"]
    known = model({"image": image[[0, 2]], "sex": sex[[0, 2]], "age": torch.tensor([25.0, 31.0])})["loss/age"]
    assert torch.isfinite(part) and math.isclose(part.item(), known.item(), rel_tol=1e-4, abs_tol=1e-5)


def test_negative_labels_are_masked():
    model = CNN3d(in_shape=(32, 32, 32), task="classify", num_classes=4, depth=2).eval()
    out = model({"image": torch.randn(2, 1, 32, 32, 32), "sex": torch.zeros(2), "label": torch.tensor([-1, -1])})
    assert out["loss"].item() == 0.0


@pytest.mark.parametrize(
    "model",
    [
        CNN3d(in_shape=(32, 32, 32), task="classify", num_classes=4, depth=3, padding="same"),
        SFCN(in_shape=(32, 32, 32), channels=(4, 8, 8, 4)),
        ConditionalVAE3d(in_shape=(32, 32, 32), channels=(4, 8, 8), padding="same"),
        ConditionalVAE3d(in_shape=(32, 32, 32), task="classify", num_classes=2, channels=(4, 8), padding="same"),
    ],
    ids=["cnn3d", "sfcn", "cvae-regress", "cvae-classify"],
)
def test_bf16_autocast_forward_is_finite(model):
    batch = make_batch((32, 32, 32), 2, model.task)
    if model.task == "classify":
        batch["label"] = batch["label"] % model.num_classes
    batch["image"] = batch["image"].bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    for key, value in out.items():
        assert torch.isfinite(value.float()).all(), key
    assert out["loss"].dtype == torch.float32
    out["loss"].backward()


def test_bf16_weights_without_autocast():
    """DeepSpeed bf16 casts the weights themselves and feeds bf16 inputs."""
    model = ConditionalVAE3d(in_shape=(32, 32, 32), channels=(4, 8), padding="same").to(torch.bfloat16)
    batch = make_batch((32, 32, 32))
    batch["image"] = batch["image"].bfloat16()
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["recon"].dtype == torch.bfloat16


# ---------------------------------------------------------------- parameter counts


def seed_cnn_count(num_outputs: int, width: int = 8, depth: int = 4, head_kernel: int = 4) -> int:
    """S500MRI_clf by formula: blocks conv(in→out/2) BN conv(out/2→out) BN; head conv k, Linear(2C+1)."""
    total, c_in = 0, 1
    for i in range(depth):
        c_out = width * 2**i
        hid = c_out // 2
        total += (c_in * hid * 27 + hid) + 2 * hid + (hid * c_out * 27 + c_out) + 2 * c_out
        c_in = c_out
    head = 2 * c_in
    total += c_in * head * head_kernel**3 + head
    return total + (head + 1) * num_outputs + num_outputs


def seed_cvae_count(num_classes: int, latent: int = 16) -> int:
    """VAE-C at 128³: encoder k5,k5,k5,k3 s2 (8,16,32,64) → 6³; bottleneck k6 → 128; mirrored decoder."""
    enc = [(1, 8, 5), (8, 16, 5), (16, 32, 5), (32, 64, 3)]
    total = sum(ci * co * k**3 + co + 2 * co for ci, co, k in enc)  # conv + BN
    total += 64 * 128 * 6**3 + 128  # bottleneck conv
    total += 2 * (129 * latent + latent)  # z mean, log-variance
    if num_classes > 1:
        total += 129 * num_classes + num_classes + num_classes * latent + latent  # logits, prior
    else:
        total += 129 * 2 + 2 + latent + latent  # age mean+log-variance, prior
    total += (latent + 1) * 128 + 128  # decoder Linear
    total += 128 * 64 * 6**3 + 64 + 2 * 64  # expand ConvTranspose + BN
    total += sum(co * ci * k**3 + ci + 2 * ci for ci, co, k in enc[1:])  # ConvTranspose + BN
    return total + 8 * 1 * 5**3 + 1  # last ConvTranspose to one channel


@pytest.mark.parametrize(("task", "k"), [("regress", 1), ("classify", 4), ("classify", 2)])
def test_param_counts_seed_models(task, k):
    with torch.device("meta"):
        cnn = CNN3d(in_shape=(128, 128, 128), task=task, num_classes=k)
        vae = ConditionalVAE3d(in_shape=(128, 128, 128), task=task, num_classes=k)
    print(f"seed CNN @128³ {task}{k}: {param_count(cnn):,}; CVAE @128³: {param_count(vae):,}")
    assert cnn.feature_shape == (4, 4, 4)
    assert param_count(cnn) == seed_cnn_count(k)
    assert vae.encoder_shapes[-1] == (6, 6, 6)
    assert param_count(vae) == seed_cvae_count(k)


def test_param_count_sfcn_about_3m():
    with torch.device("meta"):
        model = SFCN(in_shape=(160, 192, 160), task="regress", age_min=42, age_max=82)  # the paper's 40 bins
    n = param_count(model)
    print(f"SFCN @160x192x160: {n:,} params")
    assert abs(n - 3_000_000) <= 300_000


# ---------------------------------------------------------------- model specifics


def test_sfcn_soft_labels_and_expectation():
    edges = torch.arange(20.0, 41.0)
    p = soft_age_labels(torch.tensor([20.0, 29.5, 55.0]), edges, sigma=1.0)
    assert torch.allclose(p.sum(1), torch.ones(3))
    centers = 0.5 * (edges[1:] + edges[:-1])
    assert abs(float(p[1] @ centers) - 29.5) < 1e-3  # symmetric inside the range
    assert int(p[2].argmax()) == 19  # clamped to the last bin
    model = SFCN(in_shape=(32, 32, 32), channels=(4, 4, 4), bin_width=2.0)
    assert model.bin_centers[0].item() == 21.0 and model.num_outputs == 10
    pred = model({"image": torch.randn(2, 1, 32, 32, 32), "sex": torch.zeros(2)})["pred_age"]
    assert ((pred > 20) & (pred < 40)).all()


def test_class_ages_give_expected_age():
    model = CNN3d(in_shape=(32, 32, 32), task="classify", num_classes=4, depth=2, class_ages=[23.5, 28, 33, 37])
    out = model({"image": torch.randn(2, 1, 32, 32, 32), "sex": torch.zeros(2)})
    assert out["pred_age"].shape == (2,) and ((out["pred_age"] > 23.5) & (out["pred_age"] < 37)).all()
    with pytest.raises(ValueError, match="class_ages has 2 entries"):
        CNN3d(in_shape=(32, 32, 32), task="classify", num_classes=4, depth=2, class_ages=[1, 2])


def test_kl_zero_when_posterior_equals_prior():
    mu = torch.randn(5, 16)
    assert torch.equal(kl_to_prior(mu, torch.zeros(5, 16), mu), torch.zeros(5))
    kl = kl_to_prior(mu, torch.full((5, 16), 0.3), mu + 1.0)
    assert (kl > 0).all()
    expected = 0.5 * (math.exp(0.3) + 1.0 - 1.0 - 0.3) * 16
    assert torch.allclose(kl, torch.full((5,), expected))


@pytest.mark.parametrize(
    ("shape", "padding", "real"),
    [
        ((32, 32, 32), "same", True),
        ((48, 48, 48), "valid", True),
        ((64, 64, 64), "valid", False),
        ((128, 128, 128), "valid", False),
        ((96, 112, 96), "valid", False),
        ((33, 47, 61), "same", False),
    ],
)
def test_cvae_output_shape_equals_input(shape, padding, real):
    device = "cpu" if real else "meta"
    with torch.device(device):
        vae = ConditionalVAE3d(in_shape=shape, padding=padding).eval()
        out = vae({"image": torch.zeros(1, 1, *shape), "sex": torch.zeros(1)})
        gen = vae.generate(age=30.0, sex=1.0, n=2)
    assert out["recon"].shape == (1, 1, *shape)
    assert gen.shape == (2, 1, *shape)


def test_cvae_methods():
    shape = (32, 32, 32)
    vae = ConditionalVAE3d(in_shape=shape, channels=(4, 8, 8), padding="same").eval()
    image, sex = torch.randn(3, 1, *shape), torch.tensor([0.0, 1.0, 1.0])
    enc = vae.encode(image, sex)
    assert enc.mu.shape == (3, 16) and enc.age.shape == (3,) and enc.age_logvar.shape == (3,)
    assert vae.decode(enc.mu, sex).shape == (3, 1, *shape)
    assert torch.allclose(vae.predict_age(image, sex), enc.age)
    a = vae.generate(torch.tensor([25.0, 35.0]), 0.0, n=2, generator=torch.Generator().manual_seed(1))
    b = vae.generate(torch.tensor([25.0, 35.0]), 0.0, n=2, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 1, *shape) and torch.equal(a, b)
    with pytest.raises(ValueError, match="n=3 entries"):
        vae.generate(torch.tensor([25.0, 35.0]), 0.0, n=3)
    # eval mode decodes the posterior mean: deterministic
    batch = {"image": image, "sex": sex}
    assert torch.equal(vae(batch)["recon"], vae(batch)["recon"])
    clf = ConditionalVAE3d(in_shape=shape, task="classify", num_classes=4, channels=(4, 8), padding="same").eval()
    with pytest.raises(ValueError, match="class index in 0..3"):
        clf.generate(age=4, sex=0.0)
    with pytest.raises(ValueError, match="needs class_ages"):
        clf.predict_age(image, sex)


# ---------------------------------------------------------------- geometry errors


def test_invalid_geometry_messages():
    with pytest.raises(ValueError, match=r"in_shape=\(64, 64, 64\) with depth=4 .*padding='same' or depth<=3"):
        CNN3d(in_shape=(64, 64, 64))
    with pytest.raises(ValueError, match="too small for 5 pooling stages"):
        SFCN(in_shape=(16, 16, 16))
    with pytest.raises(ValueError, match="collapses the encoder.*padding='same'"):
        ConditionalVAE3d(in_shape=(32, 32, 32))
    with pytest.raises(ValueError, match="Valid: valid, same"):
        CNN3d(in_shape=(64, 64, 64), padding="full")
    with pytest.raises(ValueError, match="num_classes >= 2"):
        SFCN(in_shape=(64, 64, 64), task="classify", num_classes=1)
    with pytest.raises(ValueError, match="three positive ints"):
        CNN3d(in_shape=(64, 64))


# ---------------------------------------------------------------- registry


def model_cfg(
    name: str = "cnn3d",
    task: str = "regress",
    params: dict | None = None,
    channels_last: bool = False,
    compile: bool = False,
) -> SimpleNamespace:
    return SimpleNamespace(name=name, task=task, params=params or {}, channels_last=channels_last, compile=compile)


def test_registry_builds_every_model():
    params = {"cnn3d": {"depth": 2}, "sfcn": {"channels": [4, 4, 4]}, "cvae": {"channels": [4, 8], "padding": "same"}}
    for name in MODEL_NAMES:
        for task, expected in (("regress", "regress"), ("classify4", "classify"), ("classify2", "classify")):
            model = build_model(model_cfg(name, task, params[name]), [32, 32, 32])
            assert model.task == expected
    assert resolve_task("classify2") == ("classify", 2)


def test_registry_did_you_mean():
    with pytest.raises(ValueError) as err:
        build_model(model_cfg("cvea"), [64, 64, 64])
    assert str(err.value) == "Unknown model 'cvea'. Did you mean 'cvae'? Valid: cnn3d, sfcn, cvae."
    with pytest.raises(
        ValueError, match=r"Unknown parameter 'widht' for model 'cnn3d'. Did you mean 'width'\? Valid params: width=8"
    ):
        build_model(model_cfg(params={"widht": 4}), [64, 64, 64])
    with pytest.raises(ValueError, match="model.params.num_classes is set by the config"):
        build_model(model_cfg(params={"num_classes": 3}), [64, 64, 64])
    with pytest.raises(ValueError, match="Unknown task 'classify3'"):
        build_model(model_cfg(task="classify3"), [64, 64, 64])
    assert "latent_dim" in model_params("cvae") and "in_shape" not in model_params("cvae")


def test_registry_channels_last_and_compile():
    model = build_model(model_cfg(params={"depth": 2}, channels_last=True), [32, 32, 32])
    w = model.features[0].conv1.weight
    assert w.is_contiguous(memory_format=torch.channels_last_3d)
    compiled = build_model(model_cfg(params={"depth": 2}, compile=True), [32, 32, 32])
    assert hasattr(compiled, "_orig_mod") and param_count(compiled) == param_count(model)


# ---------------------------------------------------------------- summary and command


def test_summary_counts_conv_flops():
    model = CNN3d(in_shape=(32, 32, 32), depth=2)
    s = summarize(model, (32, 32, 32))
    first = s.layers[0]
    assert first.name == "features.0.conv1" and first.out_shape == (4, 30, 30, 30)
    assert first.macs == 4 * 30**3 * 27
    assert s.total_params == param_count(model)
    assert s.macs == sum(layer.macs for layer in s.layers) and s.gflops > 0
    text = s.format()
    assert "features.0.conv1" in text and "GFLOPs per volume" in text


def test_model_summary_command(tmp_path, capsys):
    from brainage_hpc.commands import model_summary

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "model:\n  name: cvae\n  task: classify4\n  params: {channels: [4, 8], padding: same}\n"
        "data:\n  shape: [32, 32, 32]\n"
    )
    parser = argparse.ArgumentParser()
    model_summary.add_arguments(parser)
    assert model_summary.run(parser.parse_args(["--config", str(cfg)])) == 0
    out = capsys.readouterr().out
    assert "ConditionalVAE3d, input (1, 32, 32, 32)" in out and "Total params" in out
    args = parser.parse_args(
        ["--config", str(cfg), "--in-shape", "128", "128", "128", "model.params={}", "model.task=regress"]
    )
    assert model_summary.run(args) == 0
    assert f"Total params: {seed_cvae_count(1):,}" in capsys.readouterr().out


def test_docstring_examples():
    import brainage_hpc.models.cnn3d as cnn3d
    import brainage_hpc.models.cvae as cvae
    import brainage_hpc.models.registry as registry
    import brainage_hpc.models.sfcn as sfcn
    import brainage_hpc.models.summary as summary

    for module in (cnn3d, sfcn, cvae, registry, summary):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"{module.__name__}: {result.failed} doctest failures"
