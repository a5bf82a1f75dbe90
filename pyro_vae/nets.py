"""Plain PyTorch networks: image -> feature vector (encoders) and vector -> image (decoders).

No Pyro in here. Encoders end in a linear layer of ``out_features`` raw numbers, which
a latent family turns into a distribution; decoders output raw per-pixel parameters
of shape ``(channels, height, width)``, which a likelihood turns into a distribution.
Both accept any number of leading batch dimensions (particles, samples) so that
vectorized inference works without reshaping at the call site.
"""

from __future__ import annotations

import torch
from torch import nn


class _LeadingDims(nn.Module):
    """Applies ``self.net`` to the last ``event_dims`` dimensions of any batch shape."""

    event_dims: int
    net: nn.Module

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        lead = inputs.shape[: inputs.dim() - self.event_dims]
        flat = inputs.reshape((-1, *inputs.shape[inputs.dim() - self.event_dims :]))
        out = self.net(flat)
        return out.reshape((*lead, *out.shape[1:]))


def _mlp(sizes: list[int]) -> list[nn.Module]:
    """Linear layers through ``sizes`` with Softplus between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.Softplus())
    return layers


class MLPEncoder(_LeadingDims):
    """(…, C, H, W) image -> (…, out_features) through ``depth`` Softplus hidden layers
    (one, as in Pyro's VAE example, by default)."""

    def __init__(
        self, image_shape: tuple[int, int, int], hidden: int, out_features: int, depth: int = 1
    ):
        super().__init__()
        self.event_dims = 3
        pixels = image_shape[0] * image_shape[1] * image_shape[2]
        self.net = nn.Sequential(nn.Flatten(), *_mlp([pixels, *[hidden] * depth, out_features]))


class MLPDecoder(_LeadingDims):
    """(…, in_features) code -> (…, C, H, W) raw pixel parameters."""

    def __init__(
        self, in_features: int, hidden: int, image_shape: tuple[int, int, int], depth: int = 1
    ):
        super().__init__()
        self.event_dims = 1
        pixels = image_shape[0] * image_shape[1] * image_shape[2]
        self.net = nn.Sequential(
            *_mlp([in_features, *[hidden] * depth, pixels]), nn.Unflatten(1, image_shape)
        )


class ConvEncoder(_LeadingDims):
    """(…, C, H, W) -> (…, out_features): two stride-2 convolutions, then two linear layers.

    Height and width must be multiples of 4 (checked by :class:`~pyro_vae.VAEConfig`).
    """

    def __init__(
        self, image_shape: tuple[int, int, int], channels: int, hidden: int, out_features: int
    ):
        super().__init__()
        c, h, w = image_shape
        self.event_dims = 3
        self.net = nn.Sequential(
            nn.Conv2d(c, channels, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(2 * channels * (h // 4) * (w // 4), hidden),
            nn.SiLU(),
            nn.Linear(hidden, out_features),
        )


class ConvDecoder(_LeadingDims):
    """(…, in_features) -> (…, C, H, W): the mirror image of :class:`ConvEncoder`."""

    def __init__(
        self, in_features: int, channels: int, hidden: int, image_shape: tuple[int, int, int]
    ):
        super().__init__()
        c, h, w = image_shape
        self.event_dims = 1
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2 * channels * (h // 4) * (w // 4)),
            nn.SiLU(),
            nn.Unflatten(1, (2 * channels, h // 4, w // 4)),
            nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(channels, c, 4, stride=2, padding=1),
        )
