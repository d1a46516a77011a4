"""Conditional VAE (the seed's VAE-C): an age-aware latent space for 3D T1 volumes.

Layout (128³ input, seed settings)::

    encoder: Conv3d k5 s2 1→8 → 16 → 32, Conv3d k3 s2 →64   (each: conv → BN → Dropout3d → LeakyReLU)
             128 → 62 → 29 → 13 → 6 (spatial)
             Conv3d(64→128, kernel = remaining 6³) → LeakyReLU → flatten, concat sex   (B, 129)
    heads:   z mean, z log-variance (latent_dim)
             age: class logits (classify) | normalised age mean and log-variance (regress)
    prior:   z ~ N(z_a, I), z_a = Linear(cond → latent_dim); cond = one-hot class or normalised age
    decoder: concat(z, sex) → Linear → 128 → ConvTranspose3d(k = 6³) → mirror of the encoder
             (ConvTranspose3d with per-axis output_padding, so the output shape equals in_shape exactly)

Loss (every term returned separately)::

    loss = recon (voxel-mean MSE) + beta · KL(q(z|x) ‖ N(z_a, I)) (sum over latent, mean over batch)
           + age_weight · age (cross-entropy, or Gaussian NLL of the normalised age)

Differences from the seed, and why: the prior mean uses the TRUE age/label during
training (the seed fed a sample of the predicted age), falling back to the prediction
where the target is unknown; the 1³ bottleneck has no BatchNorm (it fails at batch 1);
the decoder also receives sex and mirrors the encoder for any input shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainage_hpc.models._common import (
    Padding,
    Task,
    cast_for,
    check_choice,
    check_class_ages,
    check_in_shape,
    check_task,
    conv_out,
    expected_age,
    finite_age_mask,
    gaussian_nll,
    masked_cross_entropy,
    sex_column,
)

__all__ = ["CVAEEncoding", "ConditionalVAE3d", "kl_to_prior"]


def kl_to_prior(mu: Tensor, logvar: Tensor, prior_mu: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) ‖ N(prior_mu, I)) per sample, summed over the latent axis.

    Args:
        mu: posterior mean, (B, Z).
        logvar: posterior log-variance, (B, Z).
        prior_mu: prior mean, (B, Z).

    Returns:
        (B,) float32, >= 0; exactly 0 when ``mu == prior_mu`` and ``logvar == 0``.

    Example:
        >>> m = torch.randn(3, 16)
        >>> kl_to_prior(m, torch.zeros(3, 16), m)
        tensor([0., 0., 0.])
    """
    mu, logvar, prior_mu = mu.float(), logvar.float(), prior_mu.float()
    return 0.5 * (torch.exp(logvar) + (mu - prior_mu).square() - 1.0 - logvar).sum(dim=1)


class CVAEEncoding(NamedTuple):
    """What the encoder gives for a batch.

    Attributes:
        mu: posterior mean, (B, Z).
        logvar: posterior log-variance, (B, Z).
        age: classify: class logits (B, K); regress: predicted age (B,) in years.
        age_logvar: regress: log-variance of the age in years² (B,); classify: ``None``.
    """

    mu: Tensor
    logvar: Tensor
    age: Tensor
    age_logvar: Tensor | None


def _encoder_shapes(
    in_shape: tuple[int, int, int], kernels: Sequence[int], pads: Sequence[int]
) -> list[tuple[int, int, int]]:
    shapes = [in_shape]
    for k, p in zip(kernels, pads, strict=True):
        d, h, w = (conv_out(s, k, 2, p) if s >= 1 else 0 for s in shapes[-1])
        shapes.append((d, h, w))
    return shapes


class ConditionalVAE3d(nn.Module):
    """Conditional VAE whose latent prior is centred on an age embedding (VAE-C).

    Args:
        in_shape: input spatial shape (D, H, W).
        task: ``"regress"`` (continuous age, Gaussian NLL) or ``"classify"`` (age classes, cross-entropy).
        num_classes: classes for ``task="classify"`` (>= 2); ignored for ``"regress"``.
        latent_dim: size Z of the latent code (seed: 16).
        channels: encoder channels, one stride-2 conv each (seed: 8, 16, 32, 64).
        kernel_sizes: kernel per encoder conv; default 5 for all but the last, which is 3 (seed).
        padding: ``"valid"`` (seed) or ``"same"`` (pad k // 2; each conv halves the size, rounding up).
        feature_dim: channels of the bottleneck conv whose kernel covers the remaining volume (seed: 128).
        dropout: ``Dropout3d`` probability after each encoder/decoder BN (seed: 0.2).
        beta: weight of the KL term.
        age_weight: weight of the age term.
        age_center: regress: age normalisation offset, years (HCP S1200 ≈ 29).
        age_scale: regress: age normalisation scale, years (HCP S1200 ≈ 4).
        class_ages: classify: optional representative age per class (years); enables ``pred_age``.

    Raises:
        ValueError: bad task/padding/kernels, or an in_shape the encoder cannot reduce.

    Examples::

        >>> import torch
        >>> vae = ConditionalVAE3d(in_shape=(32, 32, 32), task="classify", num_classes=4,
        ...                        channels=(4, 8, 8), padding="same")
        >>> out = vae({"image": torch.randn(2, 1, 32, 32, 32), "sex": torch.tensor([0.0, 1.0]),
        ...            "label": torch.tensor([0, 3])})
        >>> out["recon"].shape, out["logits"].shape, sorted(k for k in out if k.startswith("loss"))
        (torch.Size([2, 1, 32, 32, 32]), torch.Size([2, 4]), ['loss', 'loss/cls', 'loss/kl', 'loss/recon'])
        >>> vae.eval().generate(age=2, sex=1.0, n=3).shape
        torch.Size([3, 1, 32, 32, 32])
    """

    #: module whose output are the penultimate features (the encoder's posterior mean (B, Z)); read by
    #: :func:`brainage_hpc.models.features.forward_with_features` with a forward hook.
    penultimate = "z_mean"

    class_ages: Tensor | None

    def __init__(
        self,
        in_shape: Sequence[int],
        task: Task = "regress",
        num_classes: int = 1,
        *,
        latent_dim: int = 16,
        channels: Sequence[int] = (8, 16, 32, 64),
        kernel_sizes: Sequence[int] | None = None,
        padding: Padding = "valid",
        feature_dim: int = 128,
        dropout: float = 0.2,
        beta: float = 1.0,
        age_weight: float = 1.0,
        age_center: float = 29.0,
        age_scale: float = 4.0,
        class_ages: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        owner = "ConditionalVAE3d"
        self.in_shape = check_in_shape(in_shape, owner)
        n_cls = check_task(task, num_classes, owner)
        check_choice("padding", padding, ("valid", "same"), owner)
        channels = [int(c) for c in channels]
        kernels = [5] * (len(channels) - 1) + [3] if kernel_sizes is None else [int(k) for k in kernel_sizes]
        if not channels or min(channels) < 1 or len(kernels) != len(channels) or min(kernels) < 1:
            raise ValueError(
                f"{owner}: channels (>= 1 positive entries) and kernel_sizes (one per channel) do not match: "
                f"channels={channels}, kernel_sizes={kernels}"
            )
        if latent_dim < 1 or feature_dim < 1:
            raise ValueError(f"{owner}: latent_dim and feature_dim must be >= 1, got {latent_dim}, {feature_dim}")
        if age_scale <= 0:
            raise ValueError(f"{owner}: age_scale must be > 0 (years), got {age_scale}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{owner}: dropout must be in [0, 1), got {dropout}")
        pads = [k // 2 if padding == "same" else 0 for k in kernels]
        shapes = _encoder_shapes(self.in_shape, kernels, pads)
        if min(shapes[-1]) < 1:
            hint = "padding='same', fewer channels" if padding == "valid" else "fewer channels"
            raise ValueError(
                f"{owner}: in_shape={self.in_shape} with channels={channels}, kernel_sizes={kernels} and "
                f"padding='{padding}' collapses the encoder (spatial shapes: {' -> '.join(map(str, shapes))}). "
                f"Use {hint} or a larger in_shape."
            )

        self.task = task
        self.num_classes = n_cls
        self.latent_dim = latent_dim
        self.beta = float(beta)
        self.age_weight = float(age_weight)
        self.age_center = float(age_center)
        self.age_scale = float(age_scale)
        ages = check_class_ages(class_ages, n_cls, owner) if task == "classify" else None
        self.register_buffer("class_ages", ages, persistent=False)
        self.encoder_shapes = shapes

        # ---- encoder
        blocks: list[nn.Module] = []
        in_ch = 1
        for ch, k, p in zip(channels, kernels, pads, strict=True):
            blocks.append(
                nn.Sequential(
                    nn.Conv3d(in_ch, ch, kernel_size=k, stride=2, padding=p),
                    nn.BatchNorm3d(ch),
                    nn.Dropout3d(dropout),
                    nn.LeakyReLU(inplace=True),
                )
            )
            in_ch = ch
        self.encoder = nn.Sequential(*blocks)
        self.bottleneck = nn.Sequential(
            nn.Conv3d(in_ch, feature_dim, kernel_size=shapes[-1]), nn.LeakyReLU(inplace=True)
        )
        self.z_mean = nn.Linear(feature_dim + 1, latent_dim)
        self.z_logvar = nn.Linear(feature_dim + 1, latent_dim)
        if task == "classify":
            self.age_head = nn.Linear(feature_dim + 1, n_cls)  # class logits
            self.prior = nn.Linear(n_cls, latent_dim)  # one-hot class -> z_a
        else:
            self.age_head = nn.Linear(feature_dim + 1, 2)  # normalised age mean, log-variance
            self.prior = nn.Linear(1, latent_dim)  # normalised age -> z_a

        # ---- decoder (mirror of the encoder; output_padding makes every shape exact)
        self.decoder_fc = nn.Linear(latent_dim + 1, feature_dim)
        self.decoder_act = nn.LeakyReLU(inplace=True)
        self.decoder_expand = nn.Sequential(
            nn.ConvTranspose3d(feature_dim, in_ch, kernel_size=shapes[-1]),
            nn.BatchNorm3d(in_ch),
            nn.LeakyReLU(inplace=True),
        )
        up: list[nn.Module] = []
        for i in reversed(range(len(channels))):
            out_ch = channels[i - 1] if i > 0 else 1
            k, p = kernels[i], pads[i]
            # output_padding in {0, 1} per axis: what floor division dropped in the encoder conv
            pd, ph, pw = (
                s_in - ((s_out - 1) * 2 - 2 * p + k) for s_in, s_out in zip(shapes[i], shapes[i + 1], strict=True)
            )
            conv = nn.ConvTranspose3d(
                channels[i], out_ch, kernel_size=k, stride=2, padding=p, output_padding=(pd, ph, pw)
            )
            if i > 0:
                up.append(
                    nn.Sequential(conv, nn.BatchNorm3d(out_ch), nn.Dropout3d(dropout), nn.LeakyReLU(inplace=True))
                )
            else:
                up.append(conv)  # linear output: intensities are z-scored
        self.decoder = nn.Sequential(*up)

    # ------------------------------------------------------------------ parts

    def _features(self, image: Tensor, sex: Tensor) -> Tensor:
        x = cast_for(image, self.z_mean.weight)
        x = self.bottleneck(self.encoder(x)).flatten(1)  # (B, F)
        return torch.cat([x, sex_column(sex, x)], dim=1)  # (B, F + 1)

    def _age_years(self, age_head: Tensor) -> tuple[Tensor, Tensor]:
        """Regress head (B, 2) -> (age (B,) years, log-variance (B,) years²)."""
        head = age_head.float()
        age = head[:, 0] * self.age_scale + self.age_center
        logvar = head[:, 1].clamp(-8.0, 8.0) + 2.0 * math.log(self.age_scale)
        return age, logvar

    def encode(self, image: Tensor, sex: Tensor) -> CVAEEncoding:
        """Encode volumes into the posterior and the age prediction.

        Args:
            image: (B, 1, D, H, W), z-scored.
            sex: (B,), 0=F, 1=M.

        Returns:
            CVAEEncoding(mu (B, Z), logvar (B, Z), age (B, K) logits or (B,) years,
            age_logvar (B,) years² or None).
        """
        h = self._features(image, sex)
        head = self.age_head(h)
        mu, logvar = self.z_mean(h), self.z_logvar(h)
        if self.task == "classify":
            return CVAEEncoding(mu, logvar, head, None)
        age, age_logvar = self._age_years(head)
        return CVAEEncoding(mu, logvar, age, age_logvar)

    def decode(self, z: Tensor, sex: Tensor) -> Tensor:
        """Decode latent codes.

        Args:
            z: (B, Z) latent codes.
            sex: (B,), 0=F, 1=M.

        Returns:
            Reconstruction (B, 1, D, H, W) on the input's (z-scored) intensity scale.
        """
        z = cast_for(z, self.decoder_fc.weight)
        h = self.decoder_act(self.decoder_fc(torch.cat([z, sex_column(sex, z)], dim=1)))  # (B, F)
        h = self.decoder_expand(h.reshape(h.shape[0], -1, 1, 1, 1))  # (B, C, d, h, w)
        return self.decoder(h)  # (B, 1, D, H, W)

    def prior_mean(self, cond: Tensor) -> Tensor:
        """Prior mean z_a (B, Z) from the condition: one-hot/probabilities (B, K) or normalised age (B, 1)."""
        return self.prior(cast_for(cond, self.prior.weight))

    def _condition(self, head: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """True target where known, else the (detached) prediction: (B, K) or (B, 1)."""
        if self.task == "classify":
            probs = torch.softmax(head.float(), dim=1).detach()
            if "label" not in batch:
                return probs
            label = batch["label"].reshape(-1).long()
            known = (label >= 0).unsqueeze(1)
            onehot = F.one_hot(label.clamp(min=0), self.num_classes).float()
            return torch.where(known, onehot, probs)
        pred = head[:, :1].float().detach()
        if "age" not in batch:
            return pred
        mask, age = finite_age_mask(batch["age"])
        true = ((age - self.age_center) / self.age_scale).unsqueeze(1)
        return torch.where(mask.unsqueeze(1), true, pred)

    # ------------------------------------------------------------------ forward

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Encode, sample (posterior mean in eval mode), decode and, with targets, compute the loss.

        Args:
            batch: ``image`` (B, 1, D, H, W) z-scored; ``sex`` (B,) 0=F, 1=M; optional ``age`` (B,)
                years (NaN = unknown) for ``task="regress"``; optional ``label`` (B,) int64
                (negative = unknown) for ``task="classify"``.

        Returns:
            ``recon`` (B, 1, D, H, W), ``mu``/``logvar``/``prior_mu`` (B, Z); regress: ``pred_age`` (B,)
            years and ``age_logvar`` (B,) years²; classify: ``logits`` (B, K) (+ ``pred_age`` with
            ``class_ages``). With the target present also ``loss``, ``loss/recon``, ``loss/kl`` and
            ``loss/age`` (regress, Gaussian NLL) or ``loss/cls`` (classify), float32 scalars.
        """
        image, sex = batch["image"], batch["sex"]
        h = self._features(image, sex)
        mu, logvar, head = self.z_mean(h), self.z_logvar(h), self.age_head(h)
        if self.training:
            std = torch.exp(0.5 * logvar.float())
            z = mu.float() + std * torch.randn_like(std)
        else:
            z = mu
        recon = self.decode(z, sex)
        prior_mu = self.prior_mean(self._condition(head, batch))
        out: dict[str, Tensor] = {"recon": recon, "mu": mu, "logvar": logvar, "prior_mu": prior_mu}
        if self.task == "classify":
            out["logits"] = head
            if self.class_ages is not None:
                out["pred_age"] = expected_age(head, self.class_ages)
            has_target = "label" in batch
        else:
            out["pred_age"], out["age_logvar"] = self._age_years(head)
            has_target = "age" in batch
        if not has_target:
            return out

        recon_loss = F.mse_loss(recon.float(), image.float())
        kl = kl_to_prior(mu, logvar, prior_mu).mean()
        if self.task == "classify":
            age_name, age_loss = "loss/cls", masked_cross_entropy(head, batch["label"])
        else:
            mask, age = finite_age_mask(batch["age"])
            target = (age - self.age_center) / self.age_scale
            age_name, age_loss = "loss/age", gaussian_nll(head[:, 0], head[:, 1], target, mask)
        out["loss/recon"] = recon_loss
        out["loss/kl"] = kl
        out[age_name] = age_loss
        out["loss"] = recon_loss + self.beta * kl + self.age_weight * age_loss
        return out

    # ------------------------------------------------------------------ conveniences

    @torch.no_grad()
    def predict_age(self, image: Tensor, sex: Tensor) -> Tensor:
        """Predicted age in years, (B,), from the encoder only (call ``eval()`` first).

        Args:
            image: (B, 1, D, H, W), z-scored.
            sex: (B,), 0=F, 1=M.

        Returns:
            (B,) years; for ``task="classify"`` the expected age under the class softmax.

        Raises:
            ValueError: a classifier built without ``class_ages``.
        """
        enc = self.encode(image, sex)
        if self.task == "regress":
            return enc.age
        if self.class_ages is None:
            raise ValueError(
                "ConditionalVAE3d.predict_age: a classifier needs class_ages (one age in years per class); "
                "build it with class_ages=[...] or use forward(batch)['logits']"
            )
        return expected_age(enc.age, self.class_ages)

    @torch.no_grad()
    def generate(
        self,
        age: float | Tensor,
        sex: float | Tensor,
        n: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample volumes from the age-conditioned prior: z ~ N(z_a, I), then decode (call ``eval()`` first).

        Args:
            age: regress: age in years; classify: class index. A scalar, or a (n,) tensor.
            sex: 0=F, 1=M; a scalar, or a (n,) tensor.
            n: number of volumes.
            generator: optional ``torch.Generator`` (on the model's device) for reproducible samples.

        Returns:
            (n, 1, D, H, W) generated volumes (z-scored intensity scale).

        Raises:
            ValueError: ``n < 1``, a class index out of range, or ``age``/``sex`` of the wrong length.
        """
        if n < 1:
            raise ValueError(f"ConditionalVAE3d.generate: n must be >= 1, got {n}")
        device = self.prior.weight.device
        ages = _broadcast(age, n, "age", device)
        sexes = _broadcast(sex, n, "sex", device).float()
        if self.task == "classify":
            idx = ages.long()
            if bool(((idx < 0) | (idx >= self.num_classes) | (idx.float() != ages.float())).any()):
                raise ValueError(
                    f"ConditionalVAE3d.generate: a classifier takes a class index in 0..{self.num_classes - 1} "
                    f"as age, got {ages.tolist()}"
                )
            cond = F.one_hot(idx, self.num_classes).float()  # (n, K)
        else:
            cond = ((ages.float() - self.age_center) / self.age_scale).unsqueeze(1)  # (n, 1)
        prior_mu = self.prior_mean(cond).float()  # (n, Z)
        eps = torch.randn(prior_mu.shape, generator=generator, device=device)
        return self.decode(prior_mu + eps, sexes)


def _broadcast(value: float | Tensor, n: int, name: str, device: torch.device) -> Tensor:
    t = torch.as_tensor(value, device=device).reshape(-1)
    if t.numel() == 1:
        return t.expand(n)
    if t.numel() != n:
        raise ValueError(f"ConditionalVAE3d.generate: {name} must be a scalar or have n={n} entries, got {t.numel()}")
    return t
