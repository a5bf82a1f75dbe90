"""Posterior predictive checks: replicates are real draws, p-values mean what they say,
and the InferenceData is one that ArviZ reads, plots and saves."""

from __future__ import annotations

import arviz as az
import matplotlib
import pytest
import torch
from pyro.distributions import OneHotCategorical
from pyro.infer import Predictive
from torch import nn

from pyro_vae import VAE, ppc
from pyro_vae.evaluate import evaluate_vae
from pyro_vae.likelihoods import make_likelihood
from pyro_vae.nets import MLPDecoder, MLPEncoder

matplotlib.use("Agg")
IMAGE = (1, 6, 6)
LIKELIHOODS = ("bernoulli", "continuous-bernoulli", "gaussian")


def small_vae(likelihood: str, **kwargs) -> VAE:
    torch.manual_seed(0)
    return VAE(image_shape=IMAGE, likelihood=likelihood, latent_dim=2, hidden=16, **kwargs).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (8, *IMAGE), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_replicates_are_fresh_draws_of_the_observed_shape(likelihood, images):
    vae = small_vae(likelihood)
    draws = ppc.replicate(vae, images, num_draws=300, batch_size=5)
    n = images.shape[0]
    assert draws.observed.shape == images.shape
    assert draws.replicated.shape == (300, *images.shape)
    assert draws.z.shape == (300, n, 2) and draws.log_lik_observed.shape == (300, n)
    # not copies of the data, and different from draw to draw
    assert (draws.replicated != draws.observed).float().mean() > 0.2
    assert (draws.replicated[0] != draws.replicated[1]).float().mean() > 0.2
    # x_rep ~ p(x | z): averaged over draws, replicates match the decoder's mean at those z
    expected = vae.decode(draws.z).mean(0)
    assert (draws.replicated.mean(0) - expected).abs().mean() < 0.03
    # the scores are the likelihood's own log-densities under the same z
    like = vae.likelihood.distribution(vae.decoder(draws.z))
    assert torch.allclose(draws.log_lik_observed, like.log_prob(draws.observed), atol=1e-4)
    assert torch.allclose(draws.log_lik_replicated, like.log_prob(draws.replicated), atol=1e-4)


def test_predictive_on_the_conditioned_model_would_copy_the_data(images):
    """The trap replicate() avoids: Predictive returns an observed site unchanged."""
    vae = small_vae("bernoulli")
    draws = ppc.replicate(vae, images, num_draws=3)
    copied = Predictive(vae.model, guide=vae.guide, num_samples=3)(draws.observed)[vae.x_site]
    assert torch.equal(copied, draws.observed.expand_as(copied))
    assert not torch.equal(draws.replicated, copied)


def test_prior_predictive_draws_come_from_the_prior(images):
    vae = small_vae("gaussian")
    draws = ppc.replicate(vae, images, num_draws=400)
    z = draws.prior_z
    assert z.shape == (400, images.shape[0], 2)
    assert z.mean().abs() < 0.05 and (z.std() - 1).abs() < 0.05
    assert draws.prior_replicated.shape == draws.replicated.shape


def test_replicate_is_deterministic_under_a_seed(images):
    vae = small_vae("continuous-bernoulli")
    first = ppc.replicate(vae, images, num_draws=4, seed=3)
    again = ppc.replicate(vae, images, num_draws=4, seed=3)
    other = ppc.replicate(vae, images, num_draws=4, seed=4)
    assert torch.equal(first.replicated, again.replicated) and torch.equal(first.z, again.z)
    assert not torch.equal(first.replicated, other.replicated)


def test_mid_p_values_are_uniform_for_data_like_the_replicates_and_halve_ties():
    gen = torch.Generator().manual_seed(0)
    observed = torch.randn(4000, generator=gen)
    replicated = torch.randn(199, 4000, generator=gen)
    p = ppc.mid_p_value(observed, replicated)
    assert abs(p.mean() - 0.5) < 0.02
    for q in (0.1, 0.5, 0.9):
        assert abs((p < q).float().mean() - q) < 0.03
    same = torch.ones(5, 3)
    assert torch.equal(ppc.mid_p_value(same[0], same), torch.full((3,), 0.5))


def test_p_values_flag_data_the_model_cannot_produce():
    vae = small_vae("bernoulli")
    white = torch.full((20, *IMAGE), 255, dtype=torch.uint8)  # every pixel lit
    checks = ppc.check(ppc.replicate(vae, white, num_draws=50))
    for name in ("mean_intensity", "lit_fraction", "pixel_mean"):
        assert checks[name].p_value == 0.0
        assert checks[name].extreme_fraction() == 1.0
        assert (checks[name].p_values < 0.025).all()


def test_p_values_are_uniform_when_the_model_and_guide_are_exact():
    """A decoder that ignores z (so p(z | x) = p(z)) and a guide equal to the prior: the
    replicates come from exactly the distribution of the data, so every image's p-value is
    uniform over images (up to the discreteness of binary statistics)."""
    vae = small_vae("bernoulli")
    last_decoder, last_encoder = (
        [m for m in net.net if isinstance(m, torch.nn.Linear)][-1]
        for net in (vae.decoder, vae.encoder)
    )
    with torch.no_grad():
        last_decoder.weight.zero_()
        last_decoder.bias.normal_(0.0, 1.5)
        last_encoder.weight.zero_()
        last_encoder.bias.copy_(torch.tensor([0.0, 0.0, 0.5413, 0.5413]))  # softplus -> 1
    gen = torch.Generator().manual_seed(1)
    probs = torch.sigmoid(last_decoder.bias).reshape(IMAGE)
    data = torch.bernoulli(probs.expand(400, *IMAGE), generator=gen)
    checks = ppc.check(ppc.replicate(vae, data, num_draws=100))
    for name in ("mean_intensity", "lit_fraction", "log_likelihood"):
        p = checks[name].p_values
        assert abs(p.mean() - 0.5) < 0.05, name
        assert abs((p < 0.25).float().mean() - 0.25) < 0.07, name
        assert checks[name].extreme_fraction() < 0.1, name
    assert abs(checks["pixel_mean"].p_values.mean() - 0.5) < 0.1


def test_inference_data_groups_dims_netcdf_and_plot_ppc(images, tmp_path):
    vae = small_vae("bernoulli")
    draws = ppc.replicate(vae, images, num_draws=7)
    idata = ppc.to_inference_data(draws, vae)
    expected_groups = {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "prior",
        "prior_predictive",
        "observed_data",
    }
    assert set(idata.groups()) == expected_groups
    n = images.shape[0]
    assert dict(idata.posterior["z"].sizes) == {"chain": 1, "draw": 7, "image": n, "z_dim_0": 2}
    pp = idata.posterior_predictive
    assert pp["x"].dims == ("chain", "draw", "image", "channel", "row", "col")
    assert pp["x"].shape == (1, 7, n, *IMAGE)
    assert pp["mean_intensity"].dims == ("chain", "draw", "image")
    assert pp["pixel_mean"].dims == ("chain", "draw", "channel", "row", "col")
    assert idata.observed_data["x"].dims == ("image", "channel", "row", "col")
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "image")
    assert (idata.observed_data["x"].values == draws.observed.numpy()).all()
    assert (pp["x"].values[0] == draws.replicated.numpy()).all()
    assert (idata.log_likelihood["x"].values[0] == draws.log_lik_observed.numpy()).all()
    assert idata.prior_predictive["x"].shape == (1, 7, n, *IMAGE)

    path = tmp_path / "ppc.nc"
    idata.to_netcdf(str(path))
    loaded = az.from_netcdf(str(path))
    assert set(loaded.groups()) == expected_groups
    assert (loaded.posterior_predictive["x"].values == pp["x"].values).all()

    for group in ("posterior", "prior"):
        fig = ppc.plot_statistics(idata, group)
        # one panel per statistic, each with the observed data's curve against the draws
        assert len(fig.axes) >= 3
        for ax in fig.axes[:3]:
            labels = [line.get_label() for line in ax.lines]
            assert "Observed" in labels and f"{group.title()} predictive" in labels
        matplotlib.pyplot.close(fig)


class OneHotCodes:
    """Discrete codes as the relaxed-categorical latent has them at evaluation: ``groups``
    one-hot vectors of ``classes`` per image under a uniform prior. Only the generic latent
    interface (prior, posterior, code, network sizes) is implemented."""

    def __init__(self, groups: int, classes: int):
        self.shape = (groups, classes)
        self.encoder_features = self.decoder_features = groups * classes

    def prior(self, batch_shape, like):
        logits = like.new_zeros(()).expand((*batch_shape, *self.shape))
        return OneHotCategorical(logits=logits).to_event(1)

    def posterior(self, encoded):
        return OneHotCategorical(logits=encoded.unflatten(-1, self.shape)).to_event(1)

    def code(self, encoded):
        logits = encoded.unflatten(-1, self.shape)
        return nn.functional.one_hot(logits.argmax(-1), self.shape[1]).to(logits.dtype)


class FlatCodeDecoder(nn.Module):
    def __init__(self, codes: OneHotCodes):
        super().__init__()
        self.net = MLPDecoder(codes.decoder_features, 16, IMAGE)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.flatten(-2))


def test_one_hot_codes_are_checked_and_evaluated_like_any_latent(images):
    vae = small_vae("bernoulli")
    codes = OneHotCodes(groups=3, classes=4)
    vae.latent = codes
    vae.encoder = MLPEncoder(IMAGE, 16, codes.encoder_features)
    vae.decoder = FlatCodeDecoder(codes)
    vae.likelihood = make_likelihood(vae.config)
    draws = ppc.replicate(vae, images, num_draws=5)
    n = images.shape[0]
    assert draws.z.shape == (5, n, 3, 4) and (draws.z.sum(-1) == 1).all()
    assert draws.prior_z.shape == (5, n, 3, 4)
    idata = ppc.to_inference_data(draws, vae)
    assert idata.posterior["z"].dims == ("chain", "draw", "image", "z_dim_0", "z_dim_1")
    assert set(ppc.check(draws)) == {
        "mean_intensity",
        "lit_fraction",
        "pixel_mean",
        "log_likelihood",
    }
    result = evaluate_vae(vae, images, num_particles=20, batch_size=4)
    assert len(result.kl_per_unit) == 3 and len(result.activity) == 3
    assert all(k <= torch.log(torch.tensor(4.0)).item() + 1e-5 for k in result.kl_per_unit)
    assert result.log_likelihood >= result.elbo - 1.0
