"""Posterior predictive checks and pictures of a VAE of vectors, ``VAE(image_shape=(D,))``:
vectors get per-dimension statistics and the log-likelihood discrepancy (never the
image-only ones), an InferenceData whose dimensions say ``vector`` and ``dim``, and
figures that draw vectors rather than fail on them (issue 16)."""

from __future__ import annotations

import json

import arviz as az
import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pyro_vae import VAE, plots, ppc
from pyro_vae.errors import UsageError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

D = 5
VECTOR_CHECKS = {"dim_mean", "dim_std", "log_likelihood"}


def vector_vae(likelihood: str = "gaussian", dims: int = D, **kwargs) -> VAE:
    torch.manual_seed(0)
    return VAE(image_shape=(dims,), likelihood=likelihood, latent_dim=2, hidden=16, **kwargs).eval()


def exact_vae(means: torch.Tensor, sigma: float) -> VAE:
    """A Gaussian VAE of vectors whose decoder ignores z and returns ``means``, with a fixed
    ``sigma``, and whose guide is the prior: data drawn from Normal(means, sigma) are
    exactly what it generates, so its checks must find nothing wrong."""
    vae = vector_vae(dims=len(means), gaussian_sigma="fixed", sigma_init=sigma)
    last_decoder, last_encoder = (
        [m for m in net.net if isinstance(m, torch.nn.Linear)][-1]
        for net in (vae.decoder, vae.encoder)
    )
    with torch.no_grad():
        last_decoder.weight.zero_()
        last_decoder.bias.copy_(means)
        last_encoder.weight.zero_()
        last_encoder.bias.copy_(torch.tensor([0.0, 0.0, 0.5413, 0.5413]))  # softplus -> 1
    return vae


@pytest.fixture(scope="module")
def vectors() -> torch.Tensor:
    return torch.randn(8, D, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def draws(vectors) -> ppc.Replicates:
    return ppc.replicate(vector_vae(), vectors, num_draws=7, batch_size=3)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli", "continuous-bernoulli"])
def test_vectors_get_per_dimension_statistics_and_the_log_likelihood(likelihood):
    gen = torch.Generator().manual_seed(1)
    data = torch.rand(8, D, generator=gen)
    if likelihood == "bernoulli":
        data = data.round()
    draws = ppc.replicate(vector_vae(likelihood), data, num_draws=30)
    assert draws.observed.shape == (8, D) and draws.replicated.shape == (30, 8, D)
    checks = ppc.check(draws)
    assert set(checks) == VECTOR_CHECKS  # nothing about pixels, intensity or lit pixels
    for name in ("dim_mean", "dim_std"):
        check = checks[name]
        # one value per dimension: over the vectors for the data, per draw for replicates
        assert check.observed.shape == (D,) and check.replicated.shape == (30, D)
        assert check.p_values.shape == (D,)
        assert ((check.p_values >= 0) & (check.p_values <= 1)).all()
        assert 0.0 <= check.p_value <= 1.0
    assert torch.allclose(checks["dim_mean"].observed, draws.observed.mean(0))
    assert torch.allclose(checks["dim_mean"].replicated, draws.replicated.mean(1))
    assert torch.allclose(checks["dim_std"].observed, draws.observed.std(0, correction=0))
    assert torch.allclose(checks["dim_std"].replicated, draws.replicated.std(1, correction=0))
    # the discrepancy is compared draw by draw, the data against the replicate under one z
    loglik = checks["log_likelihood"]
    assert torch.equal(loglik.observed, draws.log_lik_observed)
    assert torch.equal(loglik.replicated, draws.log_lik_replicated)
    assert loglik.p_values.shape == (8,) and 0.0 <= loglik.p_value <= 1.0
    ll_obs, ll_rep = draws.log_lik_observed, draws.log_lik_replicated
    expected = ((ll_rep > ll_obs).float() + (ll_rep == ll_obs).float() / 2).mean(0)
    assert torch.allclose(loglik.p_values, expected)
    summary = json.loads(json.dumps({name: c.summary() for name, c in checks.items()}))
    assert summary["dim_std"]["observed_mean"] == pytest.approx(
        draws.observed.std(0, correction=0).mean().item()
    )


def test_per_dimension_p_values_are_uniform_for_an_exact_model_and_flag_misfit_dimensions():
    """The real data set is one draw from the model, so the p-values of its per-dimension
    statistics are uniform over the dimensions; a dimension the model gets wrong, and
    only that one, gets a p-value of 0."""
    dims = 40
    means = torch.linspace(-2.0, 2.0, dims)
    vae = exact_vae(means, sigma=0.5)
    gen = torch.Generator().manual_seed(2)
    data = means + 0.5 * torch.randn(400, dims, generator=gen)
    exact = ppc.check(ppc.replicate(vae, data, num_draws=200))
    for name in ("dim_mean", "dim_std"):
        p = exact[name].p_values
        assert p.shape == (dims,)
        assert abs(p.mean() - 0.5) < 0.15, name
        assert exact[name].extreme_fraction() < 0.2, name
    assert abs(exact["log_likelihood"].p_values.mean() - 0.5) < 0.05

    shifted = data.clone()
    shifted[:, 3] += 1.0  # the data are larger there than anything the model draws
    shifted[:, 1] = means[1] + 2.0 * (shifted[:, 1] - means[1])  # and twice as spread here
    misfit = ppc.check(ppc.replicate(vae, shifted, num_draws=200))
    assert misfit["dim_mean"].p_values[3] == 0.0 and misfit["dim_std"].p_values[1] == 0.0
    # the replicates do not depend on the data here (z is ignored), so every other
    # dimension keeps the p-value it had
    others = [i for i in range(dims) if i not in (1, 3)]
    for name in ("dim_mean", "dim_std"):
        assert torch.equal(misfit[name].p_values[others], exact[name].p_values[others])
    # the misfit dimensions make the data fit their own z worse than the replicates do
    assert misfit["log_likelihood"].p_value == 1.0
    assert exact["log_likelihood"].p_value < 1.0


def test_inference_data_of_vectors_names_vector_and_dim(draws, tmp_path):
    idata = ppc.to_inference_data(draws, vector_vae())
    n, s = draws.observed.shape[0], draws.num_draws
    assert idata.posterior["z"].dims == ("chain", "draw", "vector", "z_dim_0")
    pp = idata.posterior_predictive
    assert pp["x"].dims == ("chain", "draw", "vector", "dim") and pp["x"].shape == (1, s, n, D)
    assert set(pp.data_vars) == {"x", "dim_mean", "dim_std"}
    for name in ("dim_mean", "dim_std"):
        assert pp[name].dims == ("chain", "draw", "dim") and pp[name].shape == (1, s, D)
        assert idata.observed_data[name].dims == ("dim",)
        assert idata.prior_predictive[name].shape == (1, s, D)
    assert idata.observed_data["x"].dims == ("vector", "dim")
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "vector")
    assert np.allclose(idata.observed_data["dim_std"].values, draws.observed.std(0, correction=0))
    assert (pp["x"].values[0] == draws.replicated.numpy()).all()
    assert idata.attrs["data"] == "vectors"

    path = tmp_path / "ppc.nc"
    idata.to_netcdf(str(path))
    loaded = az.from_netcdf(str(path))
    assert loaded.posterior_predictive["dim_mean"].dims == ("chain", "draw", "dim")
    assert (loaded.log_likelihood["x"].values == idata.log_likelihood["x"].values).all()

    for group in ("posterior", "prior"):
        fig = ppc.plot_statistics(idata, group)
        assert isinstance(fig, Figure) and len(fig.axes) == 2  # dim_mean and dim_std
        for ax in fig.axes:
            labels = [line.get_label() for line in ax.lines]
            assert "Observed" in labels and f"{group.title()} predictive" in labels
        plt.close(fig)


def test_data_that_are_neither_images_nor_vectors_are_refused_by_name(draws):
    odd = ppc.Replicates(
        observed=draws.observed[:, None],  # (N, 1, D): no layout the checks know
        z=draws.z,
        replicated=draws.replicated[:, :, None],
        log_lik_observed=draws.log_lik_observed,
        log_lik_replicated=draws.log_lik_replicated,
        prior_z=draws.prior_z,
        prior_replicated=draws.prior_replicated[:, :, None],
    )
    for call in (ppc.check, ppc.to_inference_data):
        with pytest.raises(UsageError, match=r"\(N, C, H, W\) images or \(N, D\) vectors"):
            call(odd)


# ---------------------------------------------------------------------------- pictures
def heat_maps(fig: Figure) -> list:
    return [image for ax in fig.axes for image in ax.get_images()]


def test_image_grid_draws_vectors_as_rows_of_a_heat_map(vectors):
    fig = plots.image_grid(vectors, "some vectors")
    assert isinstance(fig, Figure)
    (shown,) = heat_maps(fig)
    # one row per vector, one column per dimension, the values themselves
    assert np.allclose(shown.get_array(), vectors.numpy())
    assert shown.get_clim() == pytest.approx((vectors.min().item(), vectors.max().item()))
    assert fig.axes[0].get_title() == "some vectors"
    assert len(fig.axes) == 2  # the heat map and its colour bar
    plt.close(fig)
    # values in [0, 1] keep the scale of images: 0 is black, 1 is white
    fig = plots.image_grid(torch.rand(4, D) * 0.5)
    assert heat_maps(fig)[0].get_clim() == (0.0, 1.0)
    plt.close(fig)


def test_reconstructions_of_vectors_share_one_colour_scale(vectors):
    fig = plots.reconstructions(vectors, 0.5 * vectors)
    maps = heat_maps(fig)
    assert len(maps) == 2
    assert np.allclose(maps[0].get_array(), vectors.numpy())
    assert np.allclose(maps[1].get_array(), 0.5 * vectors.numpy())
    assert maps[0].get_clim() == maps[1].get_clim()
    assert [ax.get_title() for ax in fig.axes[:2]] == ["originals", "reconstructions"]
    plt.close(fig)


def test_replicate_grid_of_vectors_draws_each_vector_against_its_replicates(draws):
    observed, replicated = draws.observed[:4], draws.replicated[:3, :4]
    fig = plots.replicate_grid(observed, replicated)
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == 4  # one per held-out vector
    for i, ax in enumerate(panels):
        data = [line for line in ax.lines if line.get_label() == "held-out"]
        assert len(data) == 1 and np.allclose(data[0].get_ydata(), observed[i].numpy())
        reps = [line.get_ydata() for line in ax.lines if line.get_label() != "held-out"]
        assert np.allclose(np.stack(reps), replicated[:, i].numpy())
    plt.close(fig)


def test_p_value_map_of_vectors_is_one_bar_per_dimension(draws):
    p = ppc.check(draws)["dim_mean"].p_values
    p[0] = 0.0  # the worst p-value must show as the longest bar, not as none
    fig = plots.p_value_map(p)
    (ax,) = fig.axes[:1]
    bars = ax.patches
    assert len(bars) == D
    # each bar runs from 0.5 (typical) to the dimension's p-value
    assert np.allclose([bar.get_y() for bar in bars], 0.5)
    assert np.allclose([bar.get_y() + bar.get_height() for bar in bars], p.numpy())
    assert bars[0].get_height() == -0.5
    assert ax.get_ylim() == (0.0, 1.0) and "dimension" in ax.get_title()
    plt.close(fig)


def test_discrepancy_scatter_of_vectors(draws):
    loglik = ppc.check(draws)["log_likelihood"]
    fig = plots.discrepancy_scatter(loglik.observed, loglik.replicated, loglik.p_value)
    points = fig.axes[0].collections[0].get_offsets()
    assert len(points) == draws.observed.shape[0] * draws.num_draws
    plt.close(fig)


def test_image_pictures_are_unchanged_and_tile_refuses_vectors_by_name(vectors):
    images = torch.rand(6, 1, 3, 4, generator=torch.Generator().manual_seed(0))
    fig = plots.image_grid(images)
    (shown,) = heat_maps(fig)
    assert np.array_equal(shown.get_array(), plots.tile(images))
    assert shown.get_clim() == (0, 1) and len(fig.axes) == 1
    plt.close(fig)
    fig = plots.reconstructions(images, images.flip(0), ncol=3)
    assert [np.array(m.get_array()).shape for m in heat_maps(fig)] == [(9, 16), (9, 16)]
    plt.close(fig)
    fig = plots.p_value_map(torch.rand(1, 3, 4))
    assert heat_maps(fig)[0].get_array().shape == (3, 4)
    plt.close(fig)
    with pytest.raises(UsageError, match="image_grid"):
        plots.tile(vectors)
