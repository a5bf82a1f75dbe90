"""Discrete latents: the relaxed-categorical VAE, its hard-code evaluation, and tokens."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_vae import VAE, Run, Temperature, fit, load_vae, save_checkpoint
from pyro_vae.errors import DataError
from pyro_vae.evaluate import elbo, iwae_log_likelihood
from pyro_vae.latents import (
    RelaxedCategorical,
    RelaxedCategoricalStraightThrough,
    relaxed_sample,
)
from pyro_vae.tokenizer import codebook_usage
from pyro_vae.train import temperature_at

REPO = Path(__file__).resolve().parents[1]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]  # conftest skips cuda without a GPU


def tiny_vae(**kwargs) -> VAE:
    settings = dict(latent="relaxed-categorical", groups=3, classes=4, hidden=16, channels=4)
    return VAE(**{**settings, **kwargs})


# ---------------------------------------------------------------- relaxed densities
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", [RelaxedCategorical, RelaxedCategoricalStraightThrough])
def test_relaxed_log_prob_finite_where_samples_underflow(device, family):
    torch.manual_seed(0)
    # a confident posterior: at temperature 0.1 the losing classes underflow to exactly 0
    logits = torch.randn(2000, 10, device=device) * 10
    for temperature in (1.0, 0.5, 0.1, 0.05):
        q = family(torch.tensor(temperature, device=device), logits=logits)
        z = q.rsample()
        soft = relaxed_sample(z)
        prior = family(torch.tensor(temperature, device=device), logits=torch.zeros_like(logits))
        for log_density in (q.log_prob(z), prior.log_prob(z), q.log_prob(soft.clone())):
            assert torch.isfinite(log_density).all(), temperature
        if temperature <= 0.1:
            assert (soft == 0).any(), "the test must reach the underflowing regime"
        if family is RelaxedCategoricalStraightThrough:
            assert ((z == 0) | (z == 1)).all() and (z.sum(-1) == 1).all()


def test_relaxed_log_prob_agrees_with_torch_where_torch_is_finite():
    torch.manual_seed(1)
    logits = torch.randn(500, 5, dtype=torch.float64)
    temperature = torch.tensor(0.7, dtype=torch.float64)
    ours = RelaxedCategorical(temperature, logits=logits)
    reference = torch.distributions.RelaxedOneHotCategorical(temperature, logits=logits)
    z = ours.rsample()
    torch.testing.assert_close(ours.log_prob(z), reference.log_prob(z))
    torch.testing.assert_close(ours.log_prob(z.clone()), reference.log_prob(z))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("straight_through", [False, True])
def test_training_loss_and_gradients_finite_at_low_temperature(device, arch, straight_through):
    pyro.set_rng_seed(0)
    vae = tiny_vae(arch=arch, straight_through=straight_through, classes=8).to(device)
    with torch.no_grad():  # sharpen the posterior, the regime where float32 underflows
        for p in vae.encoder.parameters():
            p.mul_(30)
    x = (torch.rand(16, 1, 28, 28, device=device) < 0.3).float()
    for temperature in (1.0, 0.3, 0.1):
        vae.latent.temperature = temperature
        vae.zero_grad()
        loss = Trace_ELBO(num_particles=4, vectorize_particles=True).differentiable_loss(
            vae.model, vae.guide, x
        )
        loss.backward()
        assert torch.isfinite(loss), temperature
        assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)


@pytest.mark.parametrize("straight_through", [False, True])
def test_mean_field_elbo_uses_the_exact_categorical_kl(straight_through):
    # TraceMeanField_ELBO = relaxed reconstruction + exact KL of the categorical codes
    # (Jang et al.'s objective), with the KL weight applied to the KL alone
    vae = tiny_vae(straight_through=straight_through)
    x = (torch.rand(5, 1, 28, 28) < 0.3).float()
    pyro.set_rng_seed(3)
    with vae.kl_weight(0.5):
        mean_field = TraceMeanField_ELBO().differentiable_loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(3)  # the same relaxed draws, scored without the KL
    with vae.kl_weight(1e-12):
        reconstruction = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    log_q = torch.log_softmax(vae.encoder(x), -1)
    kl = (log_q.exp() * (log_q + math.log(4))).sum()
    torch.testing.assert_close(mean_field, reconstruction + 0.5 * kl, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------- hard-code evaluation
def test_hard_code_bounds_equal_brute_force_enumeration():
    pyro.set_rng_seed(0)
    groups, classes = 2, 3
    vae = VAE(
        latent="relaxed-categorical",
        image_shape=(1, 2, 2),
        groups=groups,
        classes=classes,
        hidden=8,
    ).eval()
    x = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]], [[[0.0, 0.0], [0.0, 1.0]]]])
    with torch.no_grad():
        log_q = torch.log_softmax(vae.encoder(x), -1)  # (batch, groups, classes)
        codes = torch.tensor(list(itertools.product(range(classes), repeat=groups)))
        one_hot = torch.nn.functional.one_hot(codes, classes).float()  # (codes, groups, K)
        log_lik = vae.likelihood.distribution(vae.decoder(one_hot)[:, None]).log_prob(x)
        log_q_codes = log_q[:, torch.arange(groups), codes].sum(-1).T  # (codes, batch)
    log_prior = -groups * math.log(classes)
    q = log_q_codes.exp()
    exact_elbo = (q * (log_lik + log_prior - log_q_codes)).sum(0)
    exact_log_px = torch.logsumexp(log_lik + log_prior, 0)
    reconstruction_sd = ((q * log_lik**2).sum(0) - (q * log_lik).sum(0) ** 2).sqrt()

    n = 20000
    tolerance = 5 * reconstruction_sd / math.sqrt(n) + 1e-4
    assert ((elbo(vae, x, num_particles=n, analytic_kl=True) - exact_elbo).abs() < tolerance).all()
    # the same ELBO with a Monte Carlo KL: noisier, same value
    assert ((elbo(vae, x, num_particles=n) - exact_elbo).abs() < 3 * tolerance + 0.02).all()
    iwae = iwae_log_likelihood(vae, x, num_particles=n)
    assert ((iwae - exact_log_px).abs() < 0.01).all()
    assert (exact_log_px > exact_elbo + 1e-3).all(), "the test needs a gap to be meaningful"


def test_eval_mode_codes_are_one_hot_and_prior_is_uniform():
    vae = tiny_vae().eval()
    x = (torch.rand(7, 1, 28, 28) < 0.3).float()
    z = vae.guide(x)
    assert ((z == 0) | (z == 1)).all() and (z.sum(-1) == 1).all()
    draws = vae.latent.prior((20000,), x).sample().argmax(-1)
    freq = torch.bincount(draws.reshape(-1), minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, torch.full((4,), 0.25), atol=0.01, rtol=0)


# ---------------------------------------------------------------- tokens
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_tokenize_detokenize(arch):
    torch.manual_seed(0)
    vae = tiny_vae(arch=arch, classes=5).eval()
    x = (torch.rand(6, 1, 28, 28) < 0.3).float()
    tokens = vae.tokenize(x)
    assert tokens.dtype == torch.long
    assert tokens.shape == ((6, 3) if arch == "mlp" else (6, 7, 7))
    assert tokens.min() >= 0 and tokens.max() < 5
    # the most likely code of the categorical posterior
    assert torch.equal(tokens, vae.posterior(x).base_dist.logits.argmax(-1))
    images = vae.detokenize(tokens)
    assert images.shape == x.shape and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, vae.reconstruct(x))
    with pytest.raises(ValueError, match="0..4"):
        vae.detokenize(torch.full_like(tokens, 5))
    with pytest.raises(ValueError, match="integer tensor"):
        vae.detokenize(tokens.float())
    with pytest.raises(ValueError, match="discrete codes"):
        VAE(hidden=8).tokenize(x)


def test_codebook_usage():
    assert codebook_usage(torch.arange(8).repeat(3), 8)["perplexity"] == pytest.approx(8)
    usage = codebook_usage(torch.tensor([[0, 0], [1, 1]]), 4)
    assert usage["perplexity"] == pytest.approx(2) and usage["unused"] == 2


def test_temperature_schedules():
    assert temperature_at(0, 1.0, 0.25, "exponential", 100) == pytest.approx(1.0)
    assert temperature_at(50, 1.0, 0.25, "exponential", 100) == pytest.approx(0.5)
    assert temperature_at(50, 1.0, 0.25, "cosine", 100) == pytest.approx(0.625)
    for shape in ("exponential", "cosine"):
        values = [temperature_at(s, 1.0, 0.25, shape, 100) for s in range(0, 200, 10)]
        assert all(a >= b for a, b in itertools.pairwise(values)) and values[-1] == 0.25
    assert temperature_at(70, 1.0, 0.25, "constant", 100) == 1.0
    with pytest.raises(ValueError, match="temperature schedule"):
        temperature_at(0, 1.0, 0.5, "linear", 10)


def test_straight_through_trains_and_loss_falls(mnist_train):
    images = mnist_train.images
    vae = VAE(latent="relaxed-categorical", groups=10, classes=10, hidden=64, straight_through=True)
    history = fit(
        vae,
        images[:1000],
        images[1000:1200],
        batch_size=50,
        temperature=Temperature(start=1.0, floor=0.5),
        run=Run(epochs=4, lr=3e-3, accelerator="cpu", progress=False),
    )
    losses, test = history.column("train_loss"), history.column("test_elbo")
    assert losses[-1] < losses[0] - 30, losses
    assert test[-1] > test[0] + 10, test
    temperatures = history.column("temperature")
    assert temperatures[0] < 1.0 and temperatures[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in itertools.pairwise(temperatures))


def test_checkpoint_round_trip(tmp_path):
    vae = tiny_vae(arch="conv", straight_through=True, classes=6).eval()
    x = (torch.rand(4, 1, 28, 28) < 0.3).float()
    path = save_checkpoint(tmp_path / "discrete.pt", vae)
    loaded = load_vae(path)
    assert loaded.config == vae.config and loaded.latent.code_shape == (7, 7)
    assert torch.equal(loaded.tokenize(x), vae.tokenize(x))
    torch.testing.assert_close(loaded.detokenize(vae.tokenize(x)), vae.detokenize(vae.tokenize(x)))


def test_scripts_end_to_end(tmp_path, mnist_dir, monkeypatch):
    # fit and tokenize run in this process (a fresh interpreter costs seconds); the decoding
    # runs tokenize.py as a script, which also checks that the file does not hide the
    # standard library's tokenize from the scripts beside it
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import fit as fit_script

    from pyro_vae.cli import tokens as tokenize_cli

    data = ["--data-dir", str(mnist_dir)]
    run_dir = tmp_path / "run"
    fit_script.main(
        fit_script.parser().parse_args(
            [
                "--latent",
                "relaxed-categorical",
                "--arch",
                "conv",
                "--classes",
                "8",
                "--channels",
                "4",
            ]
            + ["--epochs", "1", "--limit", "200", "--test-limit", "50", "--iwae-particles", "4"]
            + ["--temperature-schedule", "cosine", "--no-progress", "--out", str(run_dir), *data]
        )
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["hard_iwae"] >= metrics["hard_elbo"] - 5
    assert 1 <= metrics["codebook"]["perplexity"] <= 8
    assert (run_dir / "tokens.png").stat().st_size > 0

    tokens_file = tmp_path / "tokens.pt"
    checkpoint = str(run_dir / "checkpoint.pt")
    tokenize = tokenize_cli.parser().parse_args
    tokenize_cli.main(
        tokenize(["--checkpoint", checkpoint, "--limit", "30", "--out", str(tokens_file), *data])
    )
    record = torch.load(tokens_file, weights_only=True)
    assert record["tokens"].shape == (30, 7, 7) and record["shape"] == [7, 7]
    assert record["codebook_size"] == 8 and record["labels"].shape == (30,)
    with pytest.raises(DataError, match="not a token file"):
        tokenize_cli.main(
            tokenize(["--checkpoint", checkpoint, "--decode", checkpoint, "--out", "x.png"])
        )

    picture = tmp_path / "decoded.png"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "tokenize.py"), "--checkpoint", checkpoint]
        + ["--decode", str(tokens_file), "--count", "9", "--out", str(picture)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert picture.stat().st_size > 0 and "9 images decoded" in done.stdout
