"""A discrete VAE with a learned token prior in place of the uniform one: the latent
site's density is the prior's (a conditional prior's caption marginalized), it sums to
one over every code, and the model, Predictive and the evaluation bounds work with it."""

from __future__ import annotations

import itertools
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive

from pyro_vae import VAE, UsageError
from pyro_vae.evaluate import (
    elbo,
    evaluate_vae,
    iwae_log_likelihood,
    kl_monte_carlo,
    kl_per_unit,
)
from pyro_vae.prior import TokenPrior, TokenPriorConfig


def discrete_vae() -> VAE:
    pyro.set_rng_seed(0)
    return VAE(image_shape=(1, 8, 8), latent="relaxed-categorical", groups=3, classes=4,
               hidden=16)  # fmt: skip


def token_prior(num_classes: int = 0) -> TokenPrior:
    config = TokenPriorConfig(vocab_size=4, length=3, num_classes=num_classes, n_layer=1,
                              n_head=2, n_embd=16)  # fmt: skip
    prior = TokenPrior(config)
    with torch.no_grad():  # a prior far from uniform, so a wrong density would show
        for p in prior.parameters():
            p.mul_(8.0)
    return prior.eval()


@pytest.mark.parametrize("num_classes", [0, 3])
def test_the_latent_site_is_scored_by_the_prior_and_sums_to_one(num_classes):
    prior = token_prior(num_classes)
    combined = discrete_vae().with_prior(prior)
    codes = torch.tensor(list(itertools.product(range(4), repeat=3)))  # all 64 sequences
    z = torch.nn.functional.one_hot(codes, 4).float()
    trace = poutine.trace(poutine.condition(combined.model, data={combined.z_site: z})).get_trace()
    log_p = trace.nodes[combined.z_site]["fn"].log_prob(z)
    if num_classes:
        per_caption = [prior.log_prob(codes, torch.full((64,), c)) for c in range(num_classes)]
        expected = torch.logsumexp(torch.stack(per_caption), 0) - math.log(num_classes)
    else:
        expected = prior.log_prob(codes)
    torch.testing.assert_close(log_p, expected)
    assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-5)
    assert log_p.std() > 1.0  # far from the uniform prior's constant -3 log 4


def test_the_combined_model_generates_evaluates_and_refuses_training():
    vae = discrete_vae()
    combined = vae.with_prior(token_prior(3))
    assert not combined.training and vae.training  # the original is left as it was
    for name, value in vae.state_dict().items():
        assert torch.equal(combined.state_dict()[name], value)
    pyro.set_rng_seed(1)
    images = combined.model(batch_size=5)
    assert images.shape == (5, 1, 8, 8)
    draws = Predictive(combined.model, num_samples=4)(batch_size=2)
    assert draws[combined.z_site].shape == (4, 2, 3, 4)
    assert (draws[combined.z_site].sum(-1) == 1).all()
    x = (torch.rand(10, 1, 8, 8) < 0.4).float()
    bound = iwae_log_likelihood(combined, x, num_particles=50)
    lower = elbo(combined, x, num_particles=50)
    assert torch.isfinite(bound).all() and (bound >= lower - 1e-4).all()
    uniform = iwae_log_likelihood(vae.eval(), x, num_particles=50)
    assert not torch.allclose(bound, uniform)  # the prior counts
    combined.train()
    with pytest.raises(UsageError, match="learned token prior is for evaluation"):
        combined.model(x)


def test_a_prior_of_other_codes_or_a_gaussian_vae_is_refused():
    with pytest.raises(UsageError, match="fit the prior on this VAE's tokens"):
        discrete_vae().with_prior(TokenPrior(TokenPriorConfig(vocab_size=5, length=3)))
    with pytest.raises(UsageError, match="needs discrete codes"):
        VAE(latent_dim=2, hidden=8).with_prior(token_prior())


def test_evaluate_vae_scores_the_combined_model_with_a_monte_carlo_kl():
    """A learned prior couples the codes, so there is no KL per unit: evaluate_vae (which
    refused the combined model before) reports the KL as the mean of log q - log p over
    draws, which for the uniform prior matches the closed form it replaces."""
    x = torch.rand(40, 1, 8, 8).round()
    vae = discrete_vae().eval()
    with torch.no_grad():  # a sharper, image-dependent posterior than a fresh encoder's
        for p in vae.encoder.parameters():
            p.mul_(3.0)
    closed = kl_per_unit(vae, x).flatten(1).sum(1)
    pyro.set_rng_seed(1)
    sampled = kl_monte_carlo(vae, x, num_particles=4000)
    se = 4 * closed.abs().max().item() / math.sqrt(4000) + 1e-3
    torch.testing.assert_close(sampled, closed, atol=se, rtol=0.0)

    combined = vae.with_prior(token_prior(3))
    result = evaluate_vae(combined, x, num_particles=50, elbo_particles=200)
    assert result.kl_per_unit is None and result.kl > 0
    # ELBO = reconstruction - KL, each estimated from its own draws
    assert result.kl == pytest.approx(-result.reconstruction_nll - result.elbo, abs=0.3)
    assert result.log_likelihood >= result.elbo - 3 * result.elbo_se
    with pytest.raises(UsageError, match="no KL per unit"):
        kl_per_unit(combined, x)
