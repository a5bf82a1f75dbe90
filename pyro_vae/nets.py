"""Plain PyTorch networks: image -> feature vector (encoders) and vector -> image (decoders).

No Pyro in here. Encoders end in a linear layer of ``out_features`` raw numbers, which
a latent family turns into a distribution; decoders output raw per-pixel parameters
of shape ``(channels, height, width)``, which a likelihood turns into a distribution.
The MLPs also read and write vectors of shape ``(D,)``, such as another VAE's codes.
Both accept any number of leading batch dimensions (particles, samples) so that
vectorized inference works without reshaping at the call site.
"""

from __future__ import annotations

import math

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


def _shape(features: int | tuple[int, ...]) -> tuple[int, ...]:
    return (features,) if isinstance(features, int) else tuple(features)


class MLPEncoder(_LeadingDims):
    """(…, C, H, W) image -> (…, out_features) through ``depth`` Softplus hidden layers
    (one, as in Pyro's VAE example, by default). A tuple ``out_features`` gives outputs of
    that shape, e.g. ``(groups, classes)`` logits of discrete codes. ``image_shape`` may
    have any number of dimensions: ``(D,)`` reads vectors, such as another VAE's codes."""

    def __init__(
        self,
        image_shape: tuple[int, ...],
        hidden: int,
        out_features: int | tuple[int, ...],
        depth: int = 1,
    ):
        super().__init__()
        self.event_dims = len(image_shape)
        pixels = math.prod(image_shape)
        out = _shape(out_features)
        self.net = nn.Sequential(
            nn.Flatten(), *_mlp([pixels, *[hidden] * depth, math.prod(out)]), nn.Unflatten(1, out)
        )


class MLPDecoder(_LeadingDims):
    """(…, in_features) code -> (…, C, H, W) raw pixel parameters. A tuple ``in_features``
    takes codes of that shape, e.g. ``(groups, classes)`` one-hot codes; ``image_shape``
    may have any number of dimensions, as for :class:`MLPEncoder`."""

    def __init__(
        self,
        in_features: int | tuple[int, ...],
        hidden: int,
        image_shape: tuple[int, ...],
        depth: int = 1,
    ):
        super().__init__()
        shape = _shape(in_features)
        self.event_dims = len(shape)
        pixels = math.prod(image_shape)
        # a flat code keeps the layer indices (and checkpoint keys) of a plain MLP
        flatten = [nn.Flatten()] if len(shape) > 1 else []
        self.net = nn.Sequential(
            *flatten,
            *_mlp([math.prod(shape), *[hidden] * depth, pixels]),
            nn.Unflatten(1, image_shape),
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


class ConvGridEncoder(_LeadingDims):
    """(…, C, H, W) -> (…, H/4, W/4, classes): logits of a grid of codes, one per 4 x 4 patch.

    Fully convolutional, as the dVAE of DALL-E is, so a code describes its own part of
    the image and the grid keeps the image's layout.
    """

    def __init__(self, image_shape: tuple[int, int, int], channels: int, classes: int):
        super().__init__()
        self.event_dims = 3
        self.net = nn.Sequential(
            nn.Conv2d(image_shape[0], channels, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * channels, classes, 1),
            _ChannelsLast(),
        )


class ConvGridDecoder(_LeadingDims):
    """(…, h, w, classes) one-hot grid -> (…, C, 4h, 4w): the mirror of :class:`ConvGridEncoder`.

    The first 1 x 1 convolution is a learned embedding of each code.
    """

    def __init__(self, classes: int, channels: int, image_shape: tuple[int, int, int]):
        super().__init__()
        self.event_dims = 3
        self.net = nn.Sequential(
            _ChannelsFirst(),
            nn.Conv2d(classes, 2 * channels, 1),
            nn.SiLU(),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(channels, image_shape[0], 4, stride=2, padding=1),
        )


class _ChannelsLast(nn.Module):
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.permute(0, 2, 3, 1)


class _ChannelsFirst(nn.Module):
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.permute(0, 3, 1, 2)
