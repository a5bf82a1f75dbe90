"""The model/guide contract: site names, shapes, plate scaling, devices, and exactness."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_vae import VAE, DataError, VAEConfig
from pyro_vae.evaluate import log_weights
from pyro_vae.latents import MIN_SCALE
from pyro_vae.nets import _LeadingDims


def binary_batch(n=8, shape=(1, 28, 28)):
    return (torch.rand(n, *shape) < 0.3).float()


def traces(vae, x, **kwargs):
    guide = poutine.trace(vae.guide).get_trace(x, **kwargs)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x, **kwargs)
    return model, guide


def test_site_names_and_shapes_follow_the_prefix():
    vae = VAE(name="digits", latent_dim=7)
    x = binary_batch(5)
    model, guide = traces(vae, x)
    assert (vae.data_site, vae.z_site, vae.x_site) == ("digits.data", "digits.z", "digits.x")
    sample_sites = {
        n for n, s in model.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)
    }
    assert sample_sites == {"digits.z", "digits.x"}
    assert model.nodes["digits.z"]["value"].shape == (5, 7)
    assert model.nodes["digits.x"]["is_observed"]
    assert model.nodes["digits.x"]["value"] is x
    frames = model.nodes["digits.x"]["cond_indep_stack"]
    assert [(f.name, f.dim, f.size) for f in frames] == [("digits.data", -1, 5)]
    assert guide.nodes["digits.z"]["fn"].event_shape == (7,)


def test_plate_scales_a_subsample_to_the_whole_data_set():
    vae = VAE(latent_dim=3)
    x = binary_batch(4)
    model, guide = traces(vae, x, num_data=100)
    model.compute_log_prob()
    guide.compute_log_prob()
    for trace, site in ((model, vae.x_site), (model, vae.z_site), (guide, vae.z_site)):
        node = trace.nodes[site]
        assert node["scale"] == 25.0
        torch.testing.assert_close(node["log_prob_sum"], 25.0 * node["unscaled_log_prob"].sum())
    # the loss of a batch is num_data / batch times the loss of the same batch unscaled
    pyro.set_rng_seed(1)
    scaled = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=100)
    pyro.set_rng_seed(1)
    plain = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    torch.testing.assert_close(scaled, 25.0 * plain)


def test_model_generates_batch_size_images_without_x():
    vae = VAE(likelihood="continuous-bernoulli", latent_dim=4)
    trace = poutine.trace(vae.model).get_trace(batch_size=6)
    drawn = trace.nodes[vae.x_site]["value"]
    assert drawn.shape == (6, 1, 28, 28) and not trace.nodes[vae.x_site]["is_observed"]
    assert ((drawn >= 0) & (drawn <= 1)).all()
    with pytest.raises(ValueError, match="batch_size"):
        vae.model()
    with pytest.raises(ValueError, match="needs x"):
        vae.guide()


def test_bad_shapes_are_named():
    vae = VAE()
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 1, 28, 28\)"):
        vae.model(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="num_data=2 is smaller"):
        vae.model(binary_batch(4), num_data=2)


def test_a_mistyped_keyword_is_named_with_the_closest_field():
    with pytest.raises(TypeError, match=r"'latent_dims' \(did you mean 'latent_dim'\?\)"):
        VAE(latent_dims=8)
    with pytest.raises(TypeError, match="'net'.*the fields are: image_shape, .*arch"):
        VAE(net="conv")


def test_grey_pixels_under_a_bernoulli_model_are_an_error():
    vae = VAE()
    with pytest.raises(DataError, match="bernoulli likelihood needs binary pixels"):
        Trace_ELBO().loss(vae.model, vae.guide, torch.full((2, 1, 28, 28), 0.5))


def test_kl_weight_scales_the_latent_site_in_model_and_guide_only():
    vae = VAE(latent_dim=3)
    x = binary_batch(4)
    with vae.kl_weight(0.25):
        model, guide = traces(vae, x, num_data=8)
    assert model.nodes[vae.z_site]["scale"] == 0.5  # 0.25 * 8 / 4
    assert guide.nodes[vae.z_site]["scale"] == 0.5
    assert model.nodes[vae.x_site]["scale"] == 2.0
    assert vae._kl_weight == 1.0, "the weight is restored on exit"


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_decoder_accepts_leading_sample_dims(arch):
    vae = VAE(arch=arch, latent_dim=5, hidden=32, channels=4)
    z = torch.randn(3, 2, 5)
    decoded = vae.decode(z)
    assert decoded.shape == (3, 2, 1, 28, 28)
    torch.testing.assert_close(decoded[1, 0], vae.decode(z[1, 0:1])[0])
    x = binary_batch(2)
    with pyro.plate("particles", 3, dim=-2):
        trace = poutine.trace(vae.guide).get_trace(x)
    assert trace.nodes[vae.z_site]["value"].shape == (3, 2, 5)


def test_predictive_returns_observations_but_uncondition_draws_replicates():
    vae = VAE(latent_dim=4)
    x = binary_batch(3)
    copied = Predictive(vae.model, guide=vae.guide, num_samples=2)(x)[vae.x_site]
    assert torch.equal(copied, x.expand_as(copied)), "the documented trap: obs comes back"
    replicated = Predictive(poutine.uncondition(vae.model), guide=vae.guide, num_samples=2)(x)
    draws = replicated[vae.x_site]
    assert draws.shape == (2, 3, 1, 28, 28)
    assert not torch.equal(draws, x.expand_as(draws))


def test_meanfield_elbo_matches_trace_elbo_in_expectation():
    vae = VAE(latent_dim=3)
    x = binary_batch(16)
    analytic = TraceMeanField_ELBO(num_particles=400, vectorize_particles=True).loss(
        vae.model, vae.guide, x
    )
    sampled = Trace_ELBO(num_particles=400, vectorize_particles=True).loss(vae.model, vae.guide, x)
    assert abs(analytic - sampled) / abs(analytic) < 0.01


class _Linear(_LeadingDims):
    def __init__(self, weight, bias):
        super().__init__()
        self.event_dims = 1
        self.net = nn.Sequential(
            nn.Linear(weight.shape[1], weight.shape[0]), nn.Unflatten(1, (1, 2, 3))
        )
        with torch.no_grad():
            self.net[0].weight.copy_(weight)
            self.net[0].bias.copy_(bias)


class _ExactPosterior(_LeadingDims):
    """Encoder of the exact posterior of x = W z + b + N(0, s^2 I) when W has orthogonal
    columns: q = N(S W^T (x - b) / s^2, S), S = (I + W^T W / s^2)^-1 is diagonal."""

    def __init__(self, weight, bias, sigma):
        super().__init__()
        self.event_dims = 3
        self.weight, self.bias, self.sigma = weight, bias, sigma
        self.net = self._encode

    def _encode(self, x):
        variance = 1.0 / (1.0 + (self.weight**2).sum(0) / self.sigma**2)
        loc = ((x.flatten(1) - self.bias) @ self.weight) * variance / self.sigma**2
        std = variance.sqrt().expand_as(loc) - MIN_SCALE
        raw = std + torch.log(-torch.expm1(-std))  # inverse softplus
        return torch.cat([loc, raw], -1)


def test_elbo_is_exact_log_evidence_for_exact_posterior_of_linear_gaussian():
    torch.set_default_dtype(torch.float64)
    try:
        sigma, d = 0.5, 2
        q, _ = torch.linalg.qr(torch.randn(6, d))
        weight = q * torch.tensor([2.0, 0.7])  # orthogonal columns, distinct norms
        bias = torch.randn(6)
        vae = VAE(
            image_shape=(1, 2, 3),
            likelihood="gaussian",
            gaussian_sigma="fixed",
            sigma_init=sigma,
            latent_dim=d,
            hidden=4,
        )
        vae.decoder = _Linear(weight, bias)
        vae.encoder = _ExactPosterior(weight, bias, sigma)
        x = (torch.randn(10, d) @ weight.T + bias + sigma * torch.randn(10, 6)).reshape(10, 1, 2, 3)
        covariance = weight @ weight.T + sigma**2 * torch.eye(6)
        exact = torch.distributions.MultivariateNormal(bias, covariance).log_prob(x.flatten(1))
        weights = log_weights(vae, x, num_particles=50)
        # every importance weight equals p(x): the ELBO gap KL(q || p(z|x)) is zero
        torch.testing.assert_close(weights, exact.expand_as(weights), atol=1e-6, rtol=0)
        loss = Trace_ELBO().loss(vae.model, vae.guide, x)
        assert math.isclose(loss, -exact.sum().item(), rel_tol=1e-8)
    finally:
        torch.set_default_dtype(torch.float32)


def test_everything_lives_on_the_inputs_dtype():
    vae = VAE(latent_dim=3).double()
    x = binary_batch(2).double()
    model, guide = traces(vae, x)
    assert model.nodes[vae.z_site]["value"].dtype == torch.float64
    assert vae.sample(2).dtype == torch.float64
    assert VAEConfig.from_dict(vae.config.to_dict()) == vae.config


def test_the_gaussian_latents_fast_densities_equal_torchs_normal():
    """DiagonalNormal scores its own draws from their noise, StandardNormal in two
    operations: the values and gradients of torch's general Normal, and the general
    formula for anything else (another distribution's draw, a draw changed in place)."""
    from pyro_vae.latents import DiagonalNormal, StandardNormal

    torch.manual_seed(0)
    loc = torch.randn(4, 3, requires_grad=True)
    raw = torch.randn(4, 3, requires_grad=True)
    scale = torch.nn.functional.softplus(raw) + MIN_SCALE
    q, reference = DiagonalNormal(loc, scale), torch.distributions.Normal(loc, scale)
    z = q.rsample()
    prior = StandardNormal(torch.zeros(4, 3), torch.ones(4, 3))
    ours = q.log_prob(z).sum() - prior.log_prob(z).sum() + z.pow(3).sum()
    theirs = reference.log_prob(z).sum() - torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
    theirs = theirs + z.pow(3).sum()
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, (loc, raw), retain_graph=True),
                    torch.autograd.grad(theirs, (loc, raw)), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)
    other = DiagonalNormal(loc.detach() + 1, scale.detach())
    torch.testing.assert_close(
        other.log_prob(z), torch.distributions.Normal(loc + 1, scale).log_prob(z)
    )
    changed = q.rsample()
    with torch.no_grad():
        changed.add_(2.0)
    torch.testing.assert_close(q.log_prob(changed), reference.log_prob(changed))
    assert prior.log_prob(torch.zeros(7, 4, 3)).shape == (7, 4, 3)
