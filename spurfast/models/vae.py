"""The VAE: a plain encoder (conv + activation stack, then two linear heads) and a conv decoder.

The encoder is deliberately this simple: `spurfast.kernels.encoder_triton` implements
exactly this forward pass, and `spurfast.kernels.reference.encoder_forward` is its
PyTorch ground truth.  Every conv is kernel 4, stride 2, padding 1 (halves H and W).
"""
from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import backends
from ..kernels import reference as ref

KERNEL, STRIDE, PADDING = 4, 2, 1


def _per_channel(name: str, value) -> tuple[float, ...]:
    """mean/std as a tuple of floats, read as the encoders read them (`reference.flat_floats`: a
    number, a tensor or array, or sequences of them).  A 0-d tensor failed iterating and "0.5"
    split into characters, naming neither field."""
    try:
        return tuple(ref.flat_floats(value))
    except (TypeError, ValueError):
        raise TypeError(f"VAEConfig {name} must be a number or a sequence of numbers, one per input channel, "
                        f"got {value!r}") from None


@dataclass
class VAEConfig:
    in_channels: int = 1
    image_size: int = 28
    channels: tuple[int, ...] = (32, 64)
    latent_dim: int = 16
    activation: str = "relu"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __post_init__(self):
        # plain ints (numpy ones fail save_vae's JSON after the training); floats are refused
        try:
            self.in_channels, self.image_size, self.latent_dim = (
                operator.index(self.in_channels), operator.index(self.image_size), operator.index(self.latent_dim))
        except TypeError:
            raise TypeError(f"in_channels, image_size and latent_dim must be integers, got {self.in_channels!r}, "
                            f"{self.image_size!r} and {self.latent_dim!r}") from None
        try:  # int() made a width of 8.7 a silent 8
            self.channels = tuple(operator.index(c) for c in self.channels)
        except TypeError:   # (its message named the list: tuple() of a lone 32 raised a bare TypeError)
            raise TypeError(f"channels must be a sequence of integer conv widths, e.g. (32, 64), got "
                            f"{self.channels!r}") from None
        # one number stands for every channel, as a one-entry sequence does ("'float' object is not iterable")
        self.mean, self.std = _per_channel("mean", self.mean), _per_channel("std", self.std)
        if int(self.in_channels) < 1 or int(self.image_size) < 1:
            raise ValueError(f"in_channels and image_size must be >= 1, got {self.in_channels} and {self.image_size}")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must list at least one conv width, all >= 1, got {self.channels}")
        # the encoder normalises per input channel: one value for all, or one per channel
        for name, vals in (("mean", self.mean), ("std", self.std)):
            if len(vals) not in (1, self.in_channels):
                want = "1" if self.in_channels == 1 else f"1 or {self.in_channels}"
                raise ValueError(f"{name} has {len(vals)} entries for in_channels={self.in_channels}; "
                                 f"expected {want}")
        if not all(math.isfinite(v) for v in self.mean + self.std) or min(self.std) <= 0:
            raise ValueError(f"std must be > 0 and mean/std finite, got mean={self.mean}, std={self.std}")
        if self.activation not in ref.ACTIVATIONS:
            raise ValueError(f"activation must be one of {ref.ACTIVATIONS}, got {self.activation!r}")
        if not 1 <= self.latent_dim <= 4096:
            raise ValueError(f"latent_dim must be in [1, 4096], got {self.latent_dim}")
        if self.image_size % (2 ** len(self.channels)):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2^{len(self.channels)} "
                             f"for {len(self.channels)} stride-2 convs")

    @property
    def final_hw(self) -> int:
        return self.image_size // 2 ** len(self.channels)

    @property
    def flat_dim(self) -> int:
        return self.channels[-1] * self.final_hw ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_images(cls, channels: int, size: int, latent_dim: int = 16) -> "VAEConfig":
        """The shipped encoders: 1x28x28 (two convs) and RGB 64x64 and up (four convs)."""
        if size == 28:
            return cls(channels, 28, (32, 64), latent_dim, mean=(0.5,) * channels, std=(0.5,) * channels)
        n = 4 if size >= 64 else 2
        widths = (32, 64, 128, 256)[:n]
        return cls(channels, size, widths, latent_dim, mean=(0.5,) * channels, std=(0.5,) * channels)


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c = config
        try:  # a huge image_size (--size 100000) asks for terabytes in the linear heads
            convs, prev = [], c.in_channels
            for w in c.channels:
                convs.append(nn.Conv2d(prev, w, KERNEL, STRIDE, PADDING))
                prev = w
            self.convs = nn.ModuleList(convs)
            self.fc_mu = nn.Linear(c.flat_dim, c.latent_dim)
            self.fc_logvar = nn.Linear(c.flat_dim, c.latent_dim)
            self.fc_dec = nn.Linear(c.latent_dim, c.flat_dim)
            dec, rev = [], list(c.channels[::-1]) + [c.in_channels]
            for a, b in zip(rev[:-1], rev[1:]):
                dec.append(nn.ConvTranspose2d(a, b, KERNEL, STRIDE, PADDING))
            self.deconvs = nn.ModuleList(dec)
        except RuntimeError as exc:
            raise ValueError(f"cannot build a VAE for {c.in_channels}x{c.image_size}x{c.image_size} images with "
                             f"channels={c.channels}, latent_dim={c.latent_dim} ({3 * c.flat_dim * c.latent_dim:,} "
                             f"weights in the linear layers): {str(exc).strip().splitlines()[-1][:300]}") from None

    # ---- encoder (the fused kernel's contract)
    def encoder_params(self) -> dict:
        c = self.config
        return dict(
            conv_weights=[m.weight for m in self.convs],
            conv_biases=[m.bias for m in self.convs],
            head_weight=torch.cat([self.fc_mu.weight, self.fc_logvar.weight], 0),
            head_bias=torch.cat([self.fc_mu.bias, self.fc_logvar.bias], 0),
            mean=c.mean, std=c.std, stride=STRIDE, padding=PADDING, activation_name=c.activation,
        )

    def _encode_train(self, x):
        h = ref.normalise_input(x, self.config.mean, self.config.std)
        for conv in self.convs:
            h = ref.activation(conv(h), self.config.activation)
        h = h.flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, backend: str | None = None):
        """Inference encoder through the backend registry: returns fp32 (mu, logvar)."""
        _, fn = backends.resolve("encoder", backend, x.device.type)
        return fn(x, **self.encoder_params())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        c = self.config
        h = self.fc_dec(z).view(-1, c.channels[-1], c.final_hw, c.final_hw)
        for i, d in enumerate(self.deconvs):
            h = d(ref.activation(h, c.activation))
        return torch.sigmoid(h)

    def forward(self, x):
        mu, logvar = self._encode_train(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(z), mu, logvar


def vae_loss(recon, x, mu, logvar, beta: float = 1.0):
    """Per-image BCE reconstruction (summed over pixels) + beta * KL, averaged over the batch.
    ``x`` as the VAE takes it: uint8 images are in [0, 255] (the target is x / 255, as the
    encoder reads them; raw, BCE refused targets above 1 after training had begun)."""
    target = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    rec = F.binary_cross_entropy(recon, target, reduction="sum") / len(x)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
    return rec + beta * kl, rec, kl
