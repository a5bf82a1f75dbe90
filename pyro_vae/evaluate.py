"""Per-image evidence bounds: the ELBO and the importance-weighted bound (IWAE).

Both come from the same log importance weights
``log w_k = log p(x, z_k) - log q(z_k | x)``, ``z_k ~ q(z | x)``, computed per image from
Pyro traces of the model replayed against the guide. The ELBO is their mean; the
IWAE bound ``log (1/K) sum_k w_k`` (Burda et al., 2016) is a logsumexp taken *per image*,
never across the data plate, and tightens towards log p(x) as K grows.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from torch.distributions import kl_divergence

#: name of the vectorized particle plate; leading underscore keeps it out of user names.
PARTICLE_PLATE = "_pyro_vae_particles"


@torch.no_grad()
def log_weights(
    vae, x: torch.Tensor, num_particles: int = 1, analytic_kl: bool = False
) -> torch.Tensor:
    """``(num_particles, batch)`` log importance weights, particles vectorized in a plate.

    :param analytic_kl: return ``log p(x | z_k) - KL(q(z | x) || p(z))`` with the KL in
        closed form instead: not importance weights, but terms whose mean is the ELBO
        with an exact KL (less noisy, e.g. for discrete codes).
    """
    # a private param store scope: evaluating must not register parameters in the user's
    with (
        pyro.get_param_store().scope(),
        pyro.plate(PARTICLE_PLATE, num_particles, dim=-2, device=x.device),
    ):
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    z, obs = model_trace.nodes[vae.z_site], model_trace.nodes[vae.x_site]
    if analytic_kl:
        kl = kl_divergence(guide_trace.nodes[vae.z_site]["fn"], z["fn"])
        return obs["unscaled_log_prob"] - kl
    log_q = guide_trace.nodes[vae.z_site]["unscaled_log_prob"]
    return z["unscaled_log_prob"] + obs["unscaled_log_prob"] - log_q


def _batched(fn, data: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(data[i : i + batch_size]) for i in range(0, data.shape[0], batch_size)])


def elbo(
    vae,
    data: torch.Tensor,
    batch_size: int = 1000,
    num_particles: int = 1,
    analytic_kl: bool = False,
) -> torch.Tensor:
    """Per-image ELBO in nats (a ``(N,)`` tensor), averaged over ``num_particles`` draws;
    with ``analytic_kl`` the KL term is exact and only the reconstruction is sampled."""
    return _batched(
        lambda x: log_weights(vae, x, num_particles, analytic_kl).mean(0), data, batch_size
    )


def iwae_log_likelihood(
    vae,
    data: torch.Tensor,
    num_particles: int = 5000,
    batch_size: int = 100,
    particle_chunk: int = 500,
) -> torch.Tensor:
    """Per-image importance-weighted lower bound on log p(x), in nats (``(N,)``).

    Particles are drawn ``particle_chunk`` at a time and combined with a running
    logsumexp, so memory is bounded by ``batch_size * particle_chunk`` decoded images.
    """

    def bound(x: torch.Tensor) -> torch.Tensor:
        total = None
        for start in range(0, num_particles, particle_chunk):
            k = min(particle_chunk, num_particles - start)
            chunk = torch.logsumexp(log_weights(vae, x, k), dim=0)
            total = chunk if total is None else torch.logaddexp(total, chunk)
        return total - math.log(num_particles)

    return _batched(bound, data, batch_size)


def bits_per_dim(nats_per_image: float, num_pixels: int) -> float:
    """Negative log-likelihood of 8-bit images, in bits per pixel, from a density on
    dequantized data in [0, 1): the density on [0, 256) is 256^-D times smaller."""
    return (nats_per_image + num_pixels * math.log(256.0)) / (num_pixels * math.log(2.0))
