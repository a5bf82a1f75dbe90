#!/usr/bin/env python
"""Epoch time of pyro_vae.fit against a plain PyTorch loop training the same network.

Every contender trains the MLP 784-400-50 with a Bernoulli likelihood on dynamically
binarized MNIST (all 60,000 training images, held on the device, batches of 256 by
shuffled index) with Adam at 1e-3 (the fused implementation, which ``fit`` uses, in
every loop) and the same single-sample ELBO estimate as the loss:

- plain: the negative ELBO written by hand, as a PyTorch user would (:func:`plain_loss`);
- plain-compiled: the same step with the loss through ``torch.compile``;
- fit-pyro: ``pyro_vae.fit`` with Pyro's own ``Trace_ELBO`` (``elbo="trace-pyro"``);
- fit: ``pyro_vae.fit``'s default, the fused ``Trace_ELBO`` (no Pyro tracing);
- fit-compiled: the fused ELBO through ``torch.compile`` (``Run(compile=True)``);
- pyro-example (``--example``): Pyro's VAE example, ``SVI`` with ``pyro.optim.Adam`` and
  a ``DataLoader`` per batch;
- pyro-example-fused (``--example``): the same loop with ``FusedTrace_ELBO`` in place of
  ``Trace_ELBO``, as a user's own SVI loop would take it.

Epochs of the contenders are interleaved, the first of each round rotating, so that load
on a shared machine hits them alike. The first round is warm-up (compilation) and left
out; the table gives the other epochs, the medians, ratios to plain, and ms per step.

    python benchmarks/speed.py --data-dir ../shared/data --epochs 6
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning_fabric  # noqa: F401  (first: it sets the variable popped below)
import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from torch.utils.data import DataLoader, TensorDataset

from pyro_vae import VAE, Run, fit
from pyro_vae.data import TensorBatches, load_mnist, preprocess
from pyro_vae.devices import resolve_device
from pyro_vae.fused import FusedTrace_ELBO
from pyro_vae.latents import MIN_SCALE

# Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, with which every step of a
# torch optimizer on the CPU (torch built for CUDA) loads NVML to ask whether CUDA is
# there: about 0.3 ms. fit's optimizer skips that question on the CPU; a plain PyTorch
# loop outside this process never pays it, so it must not pay it here either.
os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)

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


def plain_epoch(vae: VAE, optimizer, batches: TensorBatches, epoch: int, loss_fn=None) -> float:
    """One epoch of the plain loop: :func:`plain_loss` (or ``loss_fn``), backward, Adam."""
    loss_fn = loss_fn or plain_loss
    start = time.perf_counter()
    for images in batches.epoch(epoch):
        loss = loss_fn(vae, preprocess(images, "binarize"), batches.num_data)
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
    p.add_argument("--epochs", type=int, default=6, help="rounds; the first is warm-up")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--example", action="store_true", help="also Pyro's VAE example loop")
    p.add_argument("--no-compile", action="store_true", help="leave out compiled contenders")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first round is warm-up")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    images = load_mnist(args.data_dir, "train").images
    n = images.shape[0]
    batches = TensorBatches(images, 256).prepare(0, 1, device)  # held on the device

    def plain_contender(compiled: bool):
        torch.manual_seed(0)
        vae = VAE().to(device)
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, fused=True)
        loss_fn = torch.compile(plain_loss) if compiled else plain_loss
        return lambda epoch: plain_epoch(vae, optimizer, batches, epoch, loss_fn)

    def fit_contender(name: str, elbo: str, compile: bool = False):
        torch.manual_seed(0)
        vae = VAE()
        run = Run(lr=1e-3, accelerator=str(device), checkpoint=Path(tmp) / f"{name}.pt",
                  resume=True, progress=False, compile=compile)  # fmt: skip

        def epoch_seconds(epoch: int) -> float:
            history = fit(vae, images, batch_size=256, elbo=elbo, run=run.replace(epochs=epoch + 1))
            return history.epochs[-1].seconds

        return epoch_seconds

    def example_contender(elbo_class: type, name: str):
        torch.manual_seed(0)
        example = VAE(name=name).to(device)
        loader = DataLoader(TensorDataset(images), batch_size=256, shuffle=True)
        svi = SVI(example.model, example.guide, pyro.optim.Adam({"lr": 1e-3}), elbo_class())

        def epoch_seconds(epoch: int) -> float:
            with pyro.get_param_store().scope():
                return example_epoch(svi, loader, device, n)

        return epoch_seconds

    with tempfile.TemporaryDirectory() as tmp:
        contenders = {
            "plain": plain_contender(False),
            "plain-compiled": plain_contender(True),
            "fit-pyro": fit_contender("fit-pyro", elbo="trace-pyro"),
            "fit": fit_contender("fit", elbo="trace"),
            "fit-compiled": fit_contender("fit-compiled", elbo="trace", compile=True),
        }
        if args.no_compile:
            del contenders["plain-compiled"], contenders["fit-compiled"]
        if args.example:
            contenders["pyro-example"] = example_contender(Trace_ELBO, "example")
            contenders["pyro-example-fused"] = example_contender(FusedTrace_ELBO, "fused")
        names = list(contenders)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for epoch in range(args.epochs):
            # rotate who goes first, so that warm-up and drift favour none of them
            for k in range(len(names)):
                name = names[(epoch + k) % len(names)]
                seconds[name].append(contenders[name](epoch))
            line = "   ".join(f"{name} {seconds[name][-1]:6.2f} s" for name in names)
            print(f"epoch {epoch + 1}{' (warm-up)' if epoch == 0 else ''}: {line}", flush=True)

    steps = len(batches)
    medians = {name: statistics.median(values[1:]) for name, values in seconds.items()}
    print(
        f"\ndevice {device}, torch threads {torch.get_num_threads()}, {args.epochs - 1} "
        f"epochs after warm-up, {n} images, batch 256, {steps} steps an epoch\n"
    )
    print("| contender | median epoch (s) | ms per step | ratio to plain |")
    print("| --- | --- | --- | --- |")
    for name in names:
        print(
            f"| {name} | {medians[name]:.2f} | {medians[name] / steps * 1e3:.2f} | "
            f"{medians[name] / medians['plain']:.3f} |"
        )


if __name__ == "__main__":
    main()
