"""Images as tokens: batched tokenization, codebook usage, and the discrete model's metrics.

A VAE with a ``relaxed-categorical`` latent is a tokenizer: :meth:`~pyro_vae.VAE.tokenize`
maps an image to integer codes (the posterior's most likely class of each code) and
:meth:`~pyro_vae.VAE.detokenize` maps codes back to images. The helpers here run that
over whole data sets and say how well the codebook is used.
"""

from __future__ import annotations

import math

import torch

from . import evaluate
from .data import fixed_preprocess
from .errors import UsageError


@torch.no_grad()
def tokenize_images(
    vae, images: torch.Tensor, batch_size: int = 1000, draws: int | None = None, seed: int = 0
) -> torch.Tensor:
    """Tokens of many images, ``batch_size`` at a time, on the VAE's device, returned on
    the CPU.

    :param images: ``(N, C, H, W)``; uint8 images get the fixed, seeded preprocessing of a
        held-out split (binarization or dequantization), floating-point ones are used as
        they are.
    :param draws: None: the most likely code of every position, ``(N, *code_shape)``. An
        integer D: D independent draws of each image's codes from the posterior q(z | x),
        ``(D, N, *code_shape)``, each with its own preprocessing of uint8 images (as
        training binarizes afresh). The prior that maximizes the ELBO for a fixed encoder
        is the aggregate posterior, the mixture of q(z | x) over the data, so that is
        what a learned prior should be fitted to; the most likely codes of a broad
        posterior are a different, much narrower distribution.
    :param seed: of the draws and their preprocessing (separate streams derived from it).
    :returns: ``torch.long`` most likely codes, or ``torch.int32`` draws (compact: D copies
        of a data set's codes).
    """
    device = next(vae.parameters()).device
    how = vae.likelihood.preprocessing
    if draws is None:
        return _tokenize(vae, fixed_preprocess(images, how), batch_size, device, None)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise UsageError(f"draws must be a positive integer or None, got {draws!r}")
    # one seed for the Gumbel noise and one for each draw's preprocessing, all distinct
    seeds = torch.randint(2**62, (draws + 1,), generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator(device).manual_seed(int(seeds[0]))
    return torch.stack([
        _tokenize(vae, fixed_preprocess(images, how, seed=int(s)), batch_size, device, generator)
        for s in seeds[1:]
    ])  # fmt: skip


def _tokenize(vae, data, batch_size, device, generator) -> torch.Tensor:
    chunks = [
        vae.tokenize(
            data[start : start + batch_size].to(device),
            draw=generator is not None,
            generator=generator,
        )
        .to(torch.long if generator is None else torch.int32)
        .cpu()
        for start in range(0, data.shape[0], batch_size)
    ]
    return torch.cat(chunks)


def codebook_usage(tokens: torch.Tensor, codebook_size: int) -> dict:
    """How evenly ``tokens`` use a codebook of ``codebook_size`` codes.

    ``perplexity`` is ``exp`` of the entropy of the code frequencies over all positions:
    the number of equally used codes that would give the same entropy, at most the
    codebook size. ``unused`` counts codes that never occur.
    """
    counts = torch.bincount(tokens.reshape(-1).long(), minlength=codebook_size).double()
    freq = counts / counts.sum()
    entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum().item()
    return {
        "perplexity": math.exp(entropy),
        "unused": int((counts == 0).sum().item()),
        "codebook_size": codebook_size,
    }


def discrete_metrics(
    vae, test: torch.Tensor, iwae_particles: int = 100, train_loss: float | None = None
) -> dict:
    """The held-out figures of a discrete VAE, evaluated as the discrete model (hard codes).

    :param test: held-out images, uint8 (given the fixed preprocessing) or ready data.
    :param iwae_particles: particles of the importance-weighted bound (0 skips it).
    :param train_loss: the last epoch's relaxed training loss, reported beside them.
    :returns: ``hard_elbo``: the ELBO with exact one-hot codes drawn from the categorical
        posterior and the exact KL to the uniform prior; ``hard_iwae``: the
        importance-weighted bound with the categorical posterior as proposal; the
        codebook usage of the test tokens; all in nats per image.
    """
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()  # eval mode: exact categorical codes, not the relaxation
    x = fixed_preprocess(test.to(device), vae.likelihood.preprocessing)
    metrics = {
        "relaxed_train_loss": train_loss,
        "hard_elbo": evaluate.elbo(vae, x, batch_size=500, analytic_kl=True).mean().item(),
        "hard_elbo_note": "z = exact one-hot codes from the categorical posterior, "
        "KL to the uniform prior exact",
    }
    if iwae_particles > 0:
        bound = evaluate.iwae_log_likelihood(
            vae, x, num_particles=iwae_particles, batch_size=100, particle_chunk=100
        )
        metrics["hard_iwae"] = bound.mean().item()
        metrics["hard_iwae_particles"] = iwae_particles
    metrics["codebook"] = codebook_usage(tokenize_images(vae, x), vae.latent.codebook_size)
    vae.train(was_training)
    return metrics
