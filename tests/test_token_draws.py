"""A prior fitted to draws from a discrete VAE's posterior (the aggregate posterior, the
prior that maximizes the ELBO) instead of the posterior's most likely codes: the draws
follow q(z | x), the batches go through the draws epoch by epoch, and on a broad
posterior only the draw-fitted prior beats the uniform one."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from pyro_vae import VAE, Run, UsageError
from pyro_vae.prior import TokenBatches, TokenDraws, TokenPrior, fit_prior
from pyro_vae.tokenizer import tokenize_images


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_drawn_tokens_follow_the_posterior_and_a_generator_repeats_them():
    vae = VAE(latent="relaxed-categorical", groups=3, classes=5, hidden=16).eval()
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0], [0.0] * 5, [5.0, 0.0, 0.0, 0.0, 0.0]])
    n = 40_000
    draws = vae.latent.draw_tokens(logits.expand(n, 3, 5), torch.Generator().manual_seed(1))
    assert draws.shape == (n, 3) and draws.dtype == torch.long
    for position in range(3):
        freq = torch.bincount(draws[:, position], minlength=5).double() / n
        p = logits[position].double().softmax(-1)
        se = (p * (1 - p) / n).sqrt()
        assert ((freq - p).abs() <= 5 * se + 1e-9).all(), (position, freq, p)
    again = vae.latent.draw_tokens(logits.expand(n, 3, 5), torch.Generator().manual_seed(1))
    assert torch.equal(draws, again)


def test_tokenize_images_draws_d_codes_per_image_from_q_and_keeps_the_argmax_path(mnist_test):
    pyro.set_rng_seed(0)
    vae = VAE(latent="relaxed-categorical", groups=6, classes=4, hidden=32).eval()
    with torch.no_grad():  # a sharper, image-dependent posterior than a fresh encoder's
        for p in vae.encoder.parameters():
            p.mul_(4)
    x = mnist_test.images[:20].float().div(255).round()  # ready data: no preprocessing
    assert torch.equal(tokenize_images(vae, x, batch_size=8), vae.tokenize(x))
    n = 2000
    draws = tokenize_images(vae, x, batch_size=8, draws=n, seed=3)
    assert draws.shape == (n, 20, 6)
    assert torch.equal(draws[:5], tokenize_images(vae, x, batch_size=8, draws=5, seed=3))
    assert not torch.equal(draws[:5], tokenize_images(vae, x, batch_size=8, draws=5, seed=4))
    with torch.no_grad():
        p = vae.encoder(x).double().softmax(-1)  # (20, 6, 4)
    assert draws.dtype == torch.int32  # compact: D copies of a data set
    freq = torch.nn.functional.one_hot(draws.long(), 4).double().mean(0)
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * se + 2e-3).all()
    assert (p.max(-1).values < 0.9).any()  # some codes are broad, so this says something
    with pytest.raises(UsageError, match="draws must be a positive integer"):
        tokenize_images(vae, x, draws=0)


def test_token_batches_train_epoch_k_on_draw_k_mod_d_and_resume_alike():
    draws = torch.arange(3).view(3, 1, 1).expand(3, 10, 4)  # draw d: every token is d
    source = TokenBatches(draws, batch_size=4, seed=0, captions=torch.arange(10), draws=True)
    for epoch in (0, 1, 2, 3, 7):  # the engine counts epochs from 0
        values = {
            t.item()
            for tokens, _ in source.prepare(0, 1, "cpu").epoch(epoch)
            for t in tokens.unique()
        }
        assert values == {epoch % 3}, epoch
    shard = source.prepare(1, 2, "cpu")
    assert sum(len(c) for _, c in shard.epoch(1)) == 5  # half of 10
    assert all((t == 1).all() for t, _ in shard.epoch(1))  # and its draw is epoch 1's
    whole = list(source.prepare(0, 1, "cpu").epoch(5))
    resumed = list(source.prepare(0, 1, "cpu").epoch(5, start=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole[1:], resumed, strict=True))
    # without draws=True a 3-d tensor is (N, h, w) grids, as before
    grids = TokenBatches(draws[0].reshape(10, 2, 2), batch_size=4, captions=torch.arange(10))
    assert grids.num_data == 10 and next(iter(grids.epoch(0)))[0].shape == (4, 4)
    with pytest.raises(UsageError, match="TokenDraws needs"):
        TokenDraws(torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(UsageError, match="at least one draw"):
        TokenDraws(torch.zeros(0, 5, 4, dtype=torch.long))


def test_fit_prior_trains_its_first_epoch_on_the_first_draw_and_checks_every_draw(tmp_path):
    """Draw 0 is all code 0 and draw 1 all code 1: after one epoch the prior puts most of
    its mass on code 0, after a second on code 1; a bad value in any draw is refused, and
    the checkpoint records the draws so that a resume cannot silently change them."""
    draws = torch.stack([torch.zeros(64, 3, dtype=torch.long), torch.ones(64, 3, dtype=torch.long)])
    shape = dict(vocab_size=3, length=3, n_layer=1, n_head=2, n_embd=16)
    path = tmp_path / "prior.pt"
    run = Run(epochs=1, lr=3e-2, accelerator="cpu", progress=False, checkpoint=str(path))
    pyro.set_rng_seed(0)
    prior = TokenPrior(**shape)
    fit_prior(prior, TokenDraws(draws), batch_size=16, run=run)
    zeros, ones = torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
    assert prior.log_prob(zeros) > prior.log_prob(ones) + 1.0
    assert torch.load(path, weights_only=True)["token_draws"] == 2
    fit_prior(prior, TokenDraws(draws), batch_size=16, run=run.replace(epochs=2, resume=True))
    assert prior.log_prob(ones) > prior.log_prob(zeros) + 1.0
    with pytest.raises(Exception, match="token_draws"):  # fixed tokens where draws were
        fit_prior(prior, draws[0], batch_size=16, run=run.replace(epochs=3, resume=True))
    bad = draws.clone()
    bad[1, 5, 2] = 3
    with pytest.raises(UsageError, match="tokens must lie in 0..2"):
        fit_prior(TokenPrior(**shape), TokenDraws(bad), batch_size=16)
    with pytest.raises(UsageError, match="one caption per sequence, 64"):
        fit_prior(
            TokenPrior(**shape, num_classes=2), TokenDraws(draws), torch.zeros(5, dtype=torch.long)
        )


def broad_posteriors(n: int, seed: int) -> torch.Tensor:
    """Per-image categorical posteriors over 4 positions of 4 codes: each image has a
    class c (of 4) and its code i has its mode at (c + i) mod 4 with 0.7 of the mass, 0.1
    on each other code. The argmax codes are just 4 sequences; draws from q are not."""
    classes = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed))
    modes = (classes.unsqueeze(1) + torch.arange(4)) % 4
    probs = torch.full((n, 4, 4), 0.1)
    probs.scatter_(-1, modes.unsqueeze(-1), 0.7)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.multinomial(probs.view(-1, 4), 1, generator=generator).view(-1, 4)


def cross_entropy(prior: TokenPrior, probs: torch.Tensor, draws: int = 20) -> float:
    """-E_x E_q(z|x) log p(z), nats per image, by Monte Carlo over fresh draws."""
    generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        return (
            sum(-prior.log_prob(draw(probs, generator)).mean().item() for _ in range(draws)) / draws
        )


def test_on_a_broad_posterior_only_a_prior_fitted_to_draws_beats_the_uniform_prior():
    """The bound's prior term is E_q log p(z). Fitted to the argmax codes, the prior is sure
    of 4 sequences that q draws only 0.7^4 = 24% of the time, and pays for the rest; fitted
    to draws, it learns the aggregate posterior (a mixture of 4 products), whose cross
    entropy is below the uniform prior's 4 log 4 = 5.55 nats (at most 3.76 + log 4 = 5.15)."""
    train = broad_posteriors(1024, 0)
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([draw(train, generator) for _ in range(10)])
    run = Run(epochs=10, lr=1e-2, accelerator="cpu", progress=False)
    shape = dict(vocab_size=4, length=4, n_layer=1, n_head=2, n_embd=16)
    uniform = 4 * math.log(4)

    pyro.set_rng_seed(0)
    on_argmax = TokenPrior(**shape)
    fit_prior(on_argmax, train.argmax(-1), batch_size=64, run=run)
    pyro.set_rng_seed(0)
    on_draws = TokenPrior(**shape)
    fit_prior(on_draws, TokenDraws(draws), batch_size=64, run=run)

    test = broad_posteriors(1024, 2)
    learned, argmax = cross_entropy(on_draws, test), cross_entropy(on_argmax, test)
    assert learned < 5.15 + 0.05 and learned < uniform - 0.3, learned
    assert argmax > uniform + 0.5, argmax  # the failure of fitting the argmax codes
