#!/usr/bin/env python
"""Stand-in inputs for benchmarks/judges.py until the project generates captioned images.

Writes, in the format the judges read (``{"images": uint8 (N, 1, 28, 28), "captions":
int64 (N,)}``, captions left out for an unconditional model):

* ``test-real.pt``: 100 random test images of each digit with their labels: part of the
  reference set judged against the whole (caption accuracy = the classifier's own);
* ``train-real.pt``: 100 random training images of each digit with their labels: what a
  perfect captioned generator of 1000 images would score (its FD is the floor that 1000
  samples allow);
* ``vae-bernoulli.pt`` and ``vae-gaussian.pt``: 1000 decoder means of two small
  unconditional VAEs (MLP 784-400-20, Bernoulli and learned-sigma Gaussian likelihoods)
  trained for ``--epochs`` epochs with :func:`pyro_vae.fit`, no captions::

    python benchmarks/judge_standins.py --data-dir ../shared/data --out runs/judges/standins
    python benchmarks/judges.py --data-dir ../shared/data --out runs/judges \\
        --images runs/judges/standins/*.pt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyro
import torch

from pyro_vae import VAE, Run, fit
from pyro_vae.data import load_mnist


def per_digit(
    images: torch.Tensor, labels: torch.Tensor, n: int = 100, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``n`` images of each digit drawn at random (seeded), digit by digit, with their labels
    as captions. Random, not the first ``n``: MNIST's files are not shuffled (the test
    set's first 5000 images come from other writers than its last 5000), and the first
    images of each digit lie about twice as far from the test set as a random draw."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for digit in range(10):
        where = torch.nonzero(labels == digit).flatten()
        picks.append(where[torch.randperm(len(where), generator=generator)[:n]])
    picks = torch.cat(picks)
    return {"images": images[picks].clone(), "captions": labels[picks].clone()}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoder means (floats, in [0, 1] for a Bernoulli decoder, unbounded for a Gaussian
    one) as 8-bit images, the form a generator's file holds."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def vae_samples(train: torch.Tensor, likelihood: str, epochs: int, n: int) -> torch.Tensor:
    """``n`` prior samples (decoder means) of a small VAE trained on ``train``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE(likelihood=likelihood, latent_dim=20, hidden=400)
    start = time.perf_counter()
    fit(vae, train, run=Run(epochs=epochs, accelerator="cpu", seed=0, progress=False))
    print(f"{likelihood} VAE: {epochs} epochs in {time.perf_counter() - start:.0f} s", flush=True)
    vae.eval()
    with torch.no_grad():
        return to_uint8(vae.sample(n))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="folder above MNIST/")
    parser.add_argument("--out", type=Path, default=Path("runs/judges/standins"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    test = load_mnist(args.data_dir, "test")
    train = load_mnist(args.data_dir, "train")
    torch.save(per_digit(test.images, test.labels), args.out / "test-real.pt")
    torch.save(per_digit(train.images, train.labels), args.out / "train-real.pt")
    for likelihood in ("bernoulli", "gaussian"):
        images = vae_samples(train.images, likelihood, args.epochs, 1000)
        torch.save({"images": images}, args.out / f"vae-{likelihood}.pt")
    print(f"stand-ins written to {args.out}")


if __name__ == "__main__":
    main()
