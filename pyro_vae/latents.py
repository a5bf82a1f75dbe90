"""Latent families: the prior p(z), and the amortized posterior q(z | x) built from an encoding.

A family also says how wide the encoder's output and the decoder's input are, so the
networks are sized from it rather than from the latent dimension directly.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn.functional as F

from .config import VAEConfig

#: the smallest posterior standard deviation: softplus alone underflows to exactly 0.
MIN_SCALE = 1e-5


class GaussianLatent:
    """z ~ N(0, I) in ``dim`` dimensions, with a diagonal Normal posterior.

    The encoder emits ``2 * dim`` numbers: the mean, and a raw scale mapped through
    softplus (plus :data:`MIN_SCALE`), so the posterior scale is positive and never 0.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.encoder_features = 2 * dim
        self.decoder_features = dim

    def prior(self, batch_shape: torch.Size, like: torch.Tensor) -> dist.TorchDistribution:
        """N(0, I) for ``batch_shape`` data points, on the device and dtype of ``like``."""
        loc = like.new_zeros(()).expand((*batch_shape, self.dim))
        return dist.Normal(loc, like.new_ones(())).to_event(1)

    def posterior(self, encoded: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x) from the encoder output ``(..., 2 * dim)``."""
        loc, raw_scale = encoded.split(self.dim, dim=-1)
        return dist.Normal(loc, F.softplus(raw_scale) + MIN_SCALE).to_event(1)

    def code(self, encoded: torch.Tensor) -> torch.Tensor:
        """The single most representative z for an input: the posterior mean."""
        return encoded[..., : self.dim]


def make_latent(config: VAEConfig) -> GaussianLatent:
    """The latent family named by ``config.latent``."""
    return GaussianLatent(config.latent_dim)
