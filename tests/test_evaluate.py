"""Held-out bounds against a linear-Gaussian VAE whose log p(x) is known in closed form.

The model is x = W z + b + sigma * eps, z ~ N(0, I), so p(x) = N(b, W W^T + sigma^2 I)
and the posterior p(z | x) is Gaussian with covariance S = (I + W^T W / sigma^2)^-1.
The guide gets the exact posterior mean but a diagonal, too-narrow scale, so the ELBO is
strictly below log p(x) and the importance-weighted bound has room to close the gap.
The third latent coordinate is switched off (a zero column of W) and its guide is the
prior, so it is an inactive unit with zero KL by construction.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from pyro_vae import VAE
from pyro_vae import evaluate as ev
from pyro_vae.latents import MIN_SCALE

IMAGE = (1, 2, 3)  # six "pixels"
SIGMA = 0.5
SCALE_INFLATION = 0.7  # guide scale / exact posterior standard deviation


class LinearGaussian:
    """A VAE whose decoder is x = W z + b and whose encoder gives the exact posterior mean."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        pixels = math.prod(IMAGE)
        self.W = torch.zeros(pixels, 3)
        self.W[:, :2] = torch.randn(pixels, 2, generator=gen)
        self.b = torch.randn(pixels, generator=gen) * 0.3
        self.vae = VAE(
            image_shape=IMAGE,
            likelihood="gaussian",
            gaussian_sigma="fixed",
            sigma_init=SIGMA,
            latent_dim=3,
            hidden=4,
        ).eval()
        decoder = nn.Linear(3, pixels)
        decoder.weight.data, decoder.bias.data = self.W.clone(), self.b.clone()
        self.vae.decoder.net = nn.Sequential(decoder, nn.Unflatten(1, IMAGE))
        self.post_cov = torch.linalg.inv(torch.eye(3) + self.W.T @ self.W / SIGMA**2)
        gain = self.post_cov @ self.W.T / SIGMA**2  # posterior mean = gain (x - b)
        scale = self.post_cov.diagonal().sqrt() * SCALE_INFLATION
        scale[2] = 1.0  # the switched-off coordinate: posterior = prior
        raw = scale - MIN_SCALE + torch.log(-torch.expm1(-(scale - MIN_SCALE)))
        encoder = nn.Linear(pixels, 6)
        encoder.weight.data = torch.cat([gain, torch.zeros(3, pixels)])
        encoder.bias.data = torch.cat([-gain @ self.b, raw])
        self.vae.encoder.net = nn.Sequential(nn.Flatten(), encoder)
        self.guide_scale = F.softplus(raw) + MIN_SCALE

    def sample(self, n: int, seed: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(n, 3, generator=gen)
        x = z @ self.W.T + self.b + SIGMA * torch.randn(n, self.W.shape[0], generator=gen)
        return x.reshape(n, *IMAGE)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + SIGMA**2 * torch.eye(self.W.shape[0])
        return MultivariateNormal(self.b, cov).log_prob(x.flatten(1))

    def guide(self, x: torch.Tensor) -> Normal:
        mean = (x.flatten(1) - self.b) @ (self.post_cov @ self.W.T / SIGMA**2).T
        return Normal(mean, self.guide_scale)

    def exact_elbo(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) - KL(q(z | x) || p(z | x)), both Gaussian."""
        q = self.guide(x)
        q_full = MultivariateNormal(q.loc, torch.diag_embed(q.scale**2))
        posterior = MultivariateNormal(q.loc, self.post_cov)  # the guide's mean is exact
        return self.log_marginal(x) - kl_divergence(q_full, posterior)


@pytest.fixture(scope="module")
def linear():
    return LinearGaussian()


@pytest.fixture(scope="module")
def data(linear):
    return linear.sample(200)


def test_elbo_estimate_matches_closed_form(linear, data):
    torch.manual_seed(0)
    estimate = ev.elbo(linear.vae, data, num_particles=4000)
    exact = linear.exact_elbo(data)
    assert (exact < linear.log_marginal(data) - 0.05).all()  # the guide is really off
    assert torch.allclose(estimate, exact, atol=0.1)


def test_iwae_closes_the_gap_to_log_marginal(linear, data):
    torch.manual_seed(0)
    exact, lower = linear.log_marginal(data), linear.exact_elbo(data)
    gaps = {}
    for k in (1, 10, 100, 3000):
        bound = ev.iwae_log_likelihood(linear.vae, data, k, batch_size=100, particle_chunk=1000)
        gaps[k] = (exact - bound).mean().item()
        # a lower bound in expectation: on average over images it cannot exceed log p(x)
        assert gaps[k] > -0.01, (k, gaps[k])
        if k >= 10:  # above the ELBO on average, and image by image once K is large
            assert bound.mean() > lower.mean() + 0.1, k
    assert (bound >= lower).all()
    assert (exact - lower).mean() > 0.15  # the room IWAE has to close
    assert gaps[1] > gaps[10] > gaps[100] and gaps[3000] < 0.01


def test_kl_per_unit_active_units_and_decomposition(linear, data):
    result = ev.evaluate_vae(
        linear.vae, data, num_particles=200, batch_size=20, particle_chunk=100, elbo_particles=500
    )
    q = linear.guide(data)
    exact_kl = kl_divergence(q, Normal(0.0, 1.0)).mean(0)
    assert torch.allclose(torch.tensor(result.kl_per_unit), exact_kl, atol=1e-4)
    assert result.kl_per_unit[2] < 1e-6 and min(result.kl_per_unit[:2]) > 0.1
    assert result.activity[2] == 0.0
    assert torch.allclose(torch.tensor(result.activity[:2]), q.loc[:, :2].var(0), rtol=1e-4)
    assert result.active_units == 2
    # ELBO = E_q[log p(x | z)] - KL, estimated two ways
    assert abs(result.elbo + result.reconstruction_nll + result.kl) < 0.1
    assert result.elbo < result.log_likelihood
    assert result.data == "as given" and result.bits_per_dim is None
    assert result.nll == -result.log_likelihood


def test_evaluation_is_deterministic_under_a_seed(linear, data):
    def run(seed: int) -> ev.Evaluation:
        result = ev.evaluate_vae(linear.vae, data, num_particles=30, batch_size=8, seed=seed)
        return dataclasses.replace(result, seconds=0.0)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = run(0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    assert run(0) == first
    assert run(1).log_likelihood != first.log_likelihood


def test_dequantized_images_get_bits_per_dim_and_binary_ones_do_not():
    images = torch.randint(0, 256, (12, 1, 4, 4), dtype=torch.uint8)
    for likelihood in ("gaussian", "continuous-bernoulli"):
        vae = VAE(image_shape=(1, 4, 4), likelihood=likelihood, latent_dim=2, hidden=8).eval()
        result = ev.evaluate_vae(vae, images, num_particles=5)
        assert result.data == "dequantized"
        assert result.bits_per_dim == pytest.approx(ev.bits_per_dim(result.nll, 16))
        assert result.bits_per_dim < result.elbo_bits_per_dim  # the tighter bound
    vae = VAE(image_shape=(1, 4, 4), likelihood="bernoulli", latent_dim=2, hidden=8).eval()
    result = ev.evaluate_vae(vae, images, num_particles=5)
    assert result.data == "binarized" and result.bits_per_dim is None


def test_bits_per_dim_of_the_uniform_density_is_eight():
    # log p = 0 on [0, 1)^D is the uniform density: each 8-bit level has probability 1/256
    assert ev.bits_per_dim(0.0, 784) == pytest.approx(8.0)


def test_bad_input_is_a_clear_error(linear, data):
    with pytest.raises(ValueError, match="num_particles"):
        ev.evaluate_vae(linear.vae, data, num_particles=0)
    with pytest.raises(ValueError, match="but the model expects"):
        ev.evaluate_vae(linear.vae, data[:, :, :1], num_particles=2)


def test_a_vae_of_vectors_is_evaluated_and_fitted_with_held_out_vectors():
    """Held-out data of a VAE of vectors are (N, D), as its training data: evaluate_vae,
    fit's test set and the shape errors all take the same shape rule."""
    from pyro_vae import DataError, Run, fit

    torch.manual_seed(0)
    vae = VAE(image_shape=(5,), likelihood="gaussian", latent_dim=2, hidden=8, sigma_init=0.5)
    vectors = torch.randn(40, 5) * 0.5
    run = Run(epochs=1, accelerator="cpu", progress=False)
    history = fit(vae, vectors, vectors[:10], batch_size=20, run=run)
    assert history.epochs[0].test_elbo is not None
    result = ev.evaluate_vae(vae, vectors[:6], num_particles=4)
    assert result.data == "as given" and math.isfinite(result.log_likelihood)
    with pytest.raises(DataError, match="vectors are 4 but the model expects 5"):
        ev.evaluate_vae(vae, vectors[:6, :4], num_particles=4)
