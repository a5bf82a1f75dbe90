"""Each likelihood's log-density against torch's own distributions, and its data checks."""

import pytest
import torch
import torch.distributions as td

from pyro_vae import VAEConfig
from pyro_vae.errors import DataError
from pyro_vae.likelihoods import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    GaussianLikelihood,
    make_likelihood,
)
from pyro_vae.nets import MLPDecoder, MLPEncoder

SHAPE = (1, 4, 3)


@pytest.fixture
def params():
    return torch.randn(5, *SHAPE) * 2


def test_bernoulli_matches_torch(params):
    x = (torch.rand(5, *SHAPE) < 0.5).float()
    params = torch.cat([params, torch.full((1, *SHAPE), 80.0), torch.full((1, *SHAPE), -80.0)])
    x = torch.cat([x, torch.zeros(1, *SHAPE), torch.ones(1, *SHAPE)])
    mine, theirs = params.clone().requires_grad_(), params.clone().requires_grad_()
    ours = BernoulliLikelihood().distribution(mine).log_prob(x)
    ref = td.Bernoulli(logits=theirs).log_prob(x).sum((-3, -2, -1))
    assert ours.shape == (7,)
    torch.testing.assert_close(ours, ref)
    # the gradient the decoder gets is torch's too, saturated logits included
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad)


def test_bernoulli_image_broadcasts_expands_and_masks(params):
    likelihood = BernoulliLikelihood()
    x = (torch.rand(5, *SHAPE) < 0.5).float()
    draws = torch.stack([params, -params, params / 2])  # (3, 5, ...): leading sample dims
    ours = likelihood.distribution(draws).log_prob(x)
    torch.testing.assert_close(ours, td.Bernoulli(logits=draws).log_prob(x).sum((-3, -2, -1)))
    d = likelihood.distribution(params)
    wide = d.expand((2, 5))
    assert type(wide) is type(d) and wide.batch_shape == (2, 5)
    torch.testing.assert_close(wide.log_prob(x), d.log_prob(x).expand(2, 5))
    keep = torch.tensor([True, False, True, True, False])
    torch.testing.assert_close(d.mask(keep).log_prob(x), d.log_prob(x) * keep)


def test_continuous_bernoulli_matches_torch(params):
    x = torch.rand(5, *SHAPE)
    ours = ContinuousBernoulliLikelihood().distribution(params).log_prob(x)
    ref = td.ContinuousBernoulli(logits=params).log_prob(x).sum((-3, -2, -1))
    torch.testing.assert_close(ours, ref)
    # the normalized density integrates to one on [0, 1] (midpoint rule, one pixel)
    grid = (torch.arange(2000) + 0.5) / 2000
    density = td.ContinuousBernoulli(logits=torch.tensor(1.7)).log_prob(grid).exp()
    assert abs(density.mean().item() - 1.0) < 1e-3


@pytest.mark.parametrize("sigma", ["shared", "pixel", "fixed"])
def test_gaussian_matches_torch(params, sigma):
    likelihood = GaussianLikelihood(SHAPE, sigma=sigma, init=0.3, floor=1e-3)
    x = torch.randn(5, *SHAPE)
    torch.testing.assert_close(likelihood.sigma, torch.full_like(likelihood.sigma, 0.3))
    ours = likelihood.distribution(params).log_prob(x)
    ref = td.Normal(params, 0.3).log_prob(x).sum((-3, -2, -1))
    torch.testing.assert_close(ours, ref)
    learned = [p for p in likelihood.parameters()]
    assert len(learned) == (0 if sigma == "fixed" else 1)
    if sigma == "pixel":
        assert learned[0].shape == SHAPE


def test_gaussian_sigma_never_below_floor():
    likelihood = GaussianLikelihood(SHAPE, sigma="shared", init=0.1, floor=1e-3)
    with torch.no_grad():
        likelihood.raw_sigma.fill_(-1e4)
    assert likelihood.sigma.item() >= 1e-3
    assert torch.isfinite(likelihood.distribution(torch.zeros(SHAPE)).log_prob(torch.zeros(SHAPE)))


def test_default_gaussian_is_calibrated_not_unit_sigma():
    likelihood = make_likelihood(VAEConfig(likelihood="gaussian"))
    assert isinstance(likelihood, GaussianLikelihood)
    assert any(p.requires_grad for p in likelihood.parameters()), "sigma should be learned"
    assert likelihood.sigma.item() < 1.0


def test_bernoulli_refuses_grey_pixels():
    with pytest.raises(DataError, match="binary"):
        BernoulliLikelihood().check_data(torch.full((2, *SHAPE), 0.5))
    BernoulliLikelihood().check_data(torch.ones(2, *SHAPE))


@pytest.mark.parametrize("cls", [BernoulliLikelihood, ContinuousBernoulliLikelihood])
def test_nan_and_out_of_range_pixels_are_refused(cls):
    x = torch.zeros(2, *SHAPE)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        cls().check_data(x)
    with pytest.raises(DataError):
        cls().check_data(torch.full((2, *SHAPE), 1.5))
    with pytest.raises(DataError, match="floating"):
        cls().check_data(torch.zeros(2, *SHAPE, dtype=torch.uint8))


def test_gaussian_likelihood_and_mlps_take_vectors():
    """Data of shape (D,), such as another VAE's codes, pass through the MLPs and the
    Gaussian likelihood with one event dimension, whatever the leading dimensions."""
    encoder, decoder = MLPEncoder((5,), 8, 3), MLPDecoder(3, 8, (5,))
    codes = torch.randn(2, 4, 5)
    assert encoder(codes).shape == (2, 4, 3) and decoder(encoder(codes)).shape == (2, 4, 5)
    likelihood = GaussianLikelihood((5,), sigma="pixel", init=0.5)
    mean = decoder(encoder(codes))
    d = likelihood.distribution(mean)
    assert d.event_shape == (5,) and d.batch_shape == (2, 4)
    expected = td.Normal(mean, 0.5).log_prob(codes).sum(-1)
    assert torch.allclose(d.log_prob(codes), expected, atol=1e-5)
