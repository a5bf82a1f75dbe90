#!/usr/bin/env python
"""Epoch time of pyro_vae.fit against a plain PyTorch loop training the same network.

Both train the MLP 784-400-50 with a Bernoulli likelihood on dynamically binarized
MNIST (all 60,000 training images, held on the device, batches of 256 by shuffled
index), Adam at 1e-3, with the same single-sample ELBO estimate as the loss. A third
contender follows Pyro's VAE example: ``SVI`` with ``pyro.optim.Adam`` and a
``DataLoader`` per batch. Epochs of the contenders are interleaved, the first of each
round rotating, so that load on a shared machine and warm-up hit them alike; the table
gives every epoch and the ratios of medians.

    python benchmarks/speed.py --data-dir ../shared/data --epochs 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from torch.utils.data import DataLoader, TensorDataset

from pyro_vae import VAE, fit
from pyro_vae.data import TensorBatches, load_mnist, preprocess
from pyro_vae.latents import MIN_SCALE
from pyro_vae.train import resolve_device

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def plain_loss(vae: VAE, x: torch.Tensor, num_data: int) -> torch.Tensor:
    """The negative single-sample ELBO of a batch, written by hand as a PyTorch user would:
    the same nets and formulas as the package's model and guide, scaled to the data set."""
    loc, raw_scale = vae.encoder(x).split(vae.config.latent_dim, dim=-1)
    scale = F.softplus(raw_scale) + MIN_SCALE
    eps = torch.randn_like(loc)
    z = loc + scale * eps
    log_lik = -F.binary_cross_entropy_with_logits(vae.decoder(z), x, reduction="sum")
    log_prior = (-0.5 * z**2 - HALF_LOG_2PI).sum()
    log_q = (-0.5 * eps**2 - scale.log() - HALF_LOG_2PI).sum()
    return -(log_lik + log_prior - log_q) * (num_data / x.shape[0])


def plain_epoch(vae: VAE, optimizer, batches: TensorBatches, epoch: int) -> float:
    """One epoch of the plain loop: :func:`plain_loss`, backward, Adam."""
    start = time.perf_counter()
    for images in batches.epoch(epoch):
        loss = plain_loss(vae, preprocess(images, "binarize"), batches.num_data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(loss)
    return time.perf_counter() - start


def example_epoch(svi: SVI, loader: DataLoader, device: torch.device, n: int) -> float:
    """One epoch the way Pyro's VAE example runs: a DataLoader per batch, SVI.step."""
    start = time.perf_counter()
    for (images,) in loader:
        x = preprocess(images.to(device), "binarize")
        svi.step(x, num_data=n)
    return time.perf_counter() - start


def _sync(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--elbo", default="trace", help="fit's ELBO: trace (the default), jit, meanfield"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    images = load_mnist(args.data_dir, "train").images
    n = images.shape[0]

    torch.manual_seed(0)
    package = VAE()
    torch.manual_seed(0)
    plain = VAE()
    plain.to(device)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    plain_batches = TensorBatches(images, 256, device)
    torch.manual_seed(0)
    example = VAE(name="example").to(device)
    loader = DataLoader(TensorDataset(images), batch_size=256, shuffle=True)
    svi = SVI(example.model, example.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "bench.pt"
        for epoch in range(args.epochs):

            def package_epoch(epoch: int = epoch) -> float:
                history = fit(
                    package,
                    images,
                    epochs=epoch + 1,
                    batch_size=256,
                    lr=1e-3,
                    device=device,
                    checkpoint=checkpoint,
                    resume=True,
                    progress=False,
                    elbo=args.elbo,
                )
                return history.epochs[-1].seconds

            def pyro_example_epoch() -> float:
                with pyro.get_param_store().scope():
                    return example_epoch(svi, loader, device, n)

            def plain_pytorch_epoch(epoch: int = epoch) -> float:
                return plain_epoch(plain, plain_opt, plain_batches, epoch)

            contenders = (package_epoch, plain_pytorch_epoch, pyro_example_epoch)
            # rotate who goes first, so that warm-up and drift favour none of them
            seconds = {i: contenders[i]() for i in ((epoch + k) % 3 for k in range(3))}
            package_s, plain_s, example_s = seconds[0], seconds[1], seconds[2]
            rows.append((package_s, plain_s, example_s))
            print(
                f"epoch {epoch + 1}: pyro_vae.fit {package_s:6.2f} s   plain {plain_s:6.2f} s   "
                f"pyro-example {example_s:6.2f} s   ratio fit/plain {package_s / plain_s:.3f}   "
                f"example/plain {example_s / plain_s:.3f}",
                flush=True,
            )

    fit_med, plain_med, example_med = (statistics.median(c) for c in zip(*rows, strict=True))
    print(
        f"\nfit with elbo={args.elbo}; device {device}, torch threads {torch.get_num_threads()}, "
        f"{args.epochs} epochs, {n} images, batch 256"
    )
    print(
        f"median epoch: pyro_vae.fit {fit_med:.2f} s, plain PyTorch {plain_med:.2f} s, "
        f"Pyro-example style {example_med:.2f} s"
    )
    print(
        f"ratio of medians: fit/plain = {fit_med / plain_med:.3f}, "
        f"example/plain = {example_med / plain_med:.3f}"
    )
    # the package's cost is a fixed amount per step (Pyro's tracing), so say it per step
    steps = len(plain_batches)
    per_step = {k: v / steps * 1e3 for k, v in (("fit", fit_med), ("plain", plain_med))}
    print(
        f"per step ({steps} steps an epoch): fit costs {per_step['fit'] - per_step['plain']:+.2f}"
        f" ms against the plain loop's {per_step['plain']:.2f} ms, the Pyro-example loop "
        f"{(example_med - plain_med) / steps * 1e3:+.2f} ms"
    )


if __name__ == "__main__":
    main()
