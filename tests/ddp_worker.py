"""One process of a two-process CPU (gloo) run for tests/test_engine.py, started with
``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py MODE OUT MNIST``.

Each process writes what it ended with to ``OUT/rank<r>.pt``, so the test can compare the
processes with each other and with a single-process reference.

- ``fit``: the VAE trained by ``pyro_vae.fit`` (2 epochs, a checkpoint), then resumed
  for a third epoch; writes the weights.
- ``ssvae``: the M2 model trained by ``fit_ssvae``; writes the weights and accuracy.
- ``diverge``: process 1's loss becomes NaN at step 3; writes the error each process got.
- ``bad-data``: a streamed floating-point Dataset whose images in process 1's third batch
  hold a NaN; writes the error each process got.
- ``lost``: process 1 is killed (SIGKILL) in its second epoch; process 0 writes the error
  it got.
- ``prior``: a token prior trained by ``fit_prior`` on posterior draws (``TokenDraws``);
  writes the weights and history.
- ``gradient``: one backward pass of the ELBO module under DDP on each process's half of
  a batch, each with its own seed; writes the averaged gradients. ``gradient-dreg``: the
  same with the importance-weighted bound, ``IWAE_ELBO(5, "dreg")``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pyro
import torch
from torch.utils.data import Dataset

from pyro_vae import VAE, Run, fit
from pyro_vae.data import epoch_permutation, fixed_preprocess, load_mnist
from pyro_vae.devices import make_fabric
from pyro_vae.errors import DataError, ProcessLostError, TrainingDivergedError
from pyro_vae.objectives import IWAE_ELBO
from pyro_vae.prior import TokenDraws, TokenPrior, fit_prior
from pyro_vae.ssvae import SSVAE, balanced_labels, fit_ssvae
from pyro_vae.train import ELBOLoss

#: what both test and worker build: a small VAE from a fixed seed
VAE_OPTIONS = {"latent_dim": 4, "hidden": 32}
GRADIENT_SEED, NUM_DATA, HALF = 100, 1000, 16
DDP = Run(accelerator="cpu", devices=2, strategy="ddp", progress=False)


class StreamedImages(Dataset):
    """Images served one by one, as from files: fit streams such a data set and checks
    each batch as it arrives."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


PRIOR_BATCH = 32  # the batch of both processes together


def small_prior() -> TokenPrior:
    pyro.set_rng_seed(0)
    return TokenPrior(vocab_size=5, length=6, num_classes=3, n_layer=1, n_head=2, n_embd=16)


def prior_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Three draws of 96 sequences with their captions: a caption-dependent pattern with
    noise, so that the three epochs see different tokens."""
    generator = torch.Generator().manual_seed(5)
    captions = torch.randint(0, 3, (96,), generator=generator)
    pattern = (captions.unsqueeze(1) + torch.arange(6)) % 5
    noise = torch.randint(0, 5, (3, 96, 6), generator=generator)
    keep = torch.rand(3, 96, 6, generator=generator) < 0.7
    return torch.where(keep, pattern, noise), captions


def small_vae() -> VAE:
    pyro.set_rng_seed(0)
    return VAE(**VAE_OPTIONS)


def gradient_batch(mnist: Path) -> torch.Tensor:
    return fixed_preprocess(load_mnist(mnist, "test").images[: 2 * HALF], "binarize")


def gradient_elbo(mode: str):
    """The objective of a ``gradient`` mode, as the test builds it too."""
    return IWAE_ELBO(5, "dreg", max_plate_nesting=1) if mode == "gradient-dreg" else "trace"


def main(mode: str, out: Path, mnist: Path) -> None:
    if mode == "fit":
        train = load_mnist(mnist, "train").images[:1000]
        vae = small_vae()
        checkpoint = out / "checkpoint.pt"
        fit(
            vae,
            train,
            train[:200],
            batch_size=100,
            run=DDP.replace(epochs=2, checkpoint=checkpoint),
        )
        history = fit(
            vae,
            train,
            train[:200],
            batch_size=100,
            run=DDP.replace(epochs=3, checkpoint=checkpoint, resume=True),
        )
        result = {"weights": vae.state_dict(), "history": history.to_rows(), "rank": history.rank}
    elif mode == "ssvae":
        pool = load_mnist(mnist, "train").head(1000)
        labelled = balanced_labels(pool.labels, 5)
        pyro.set_rng_seed(0)
        ssvae = SSVAE(latent_dim=4, hidden=32)
        test = load_mnist(mnist, "test").head(200)
        history = fit_ssvae(
            ssvae,
            pool.images[labelled],
            pool.labels[labelled],
            pool.images,
            (test.images, test.labels),
            batch_size=100,
            aux_weight=5.0,
            run=DDP.replace(epochs=2),
        )
        result = {"weights": ssvae.state_dict(), "accuracy": history.epochs[-1].test_accuracy}
    elif mode == "diverge":
        # process 1's third step gets a NaN code: every process must stop at that step
        train = load_mnist(mnist, "train").images[:1000]
        vae = small_vae()
        calls = {"n": 0}

        def poison(module, inputs):
            calls["n"] += 1
            if torch.distributed.get_rank() == 1 and calls["n"] == 3:
                return (inputs[0] * float("nan"),)
            return None

        vae.decoder.register_forward_pre_hook(poison)
        try:
            fit(
                vae,
                train,
                batch_size=50,
                run=DDP.replace(epochs=1, checkpoint=out / "checkpoint.pt"),
            )
            result = {"error": None}
        except TrainingDivergedError as error:
            result = {"error": str(error), "step": error.step}
    elif mode == "bad-data":
        images = fixed_preprocess(load_mnist(mnist, "train").images[:400], "binarize")
        # process 1 takes every other index of epoch 0's order: its third batch of 50
        shard = epoch_permutation(len(images), 0, 0)[1::2]
        images[shard[100:150]] = float("nan")
        try:
            fit(
                small_vae(),
                StreamedImages(images),
                batch_size=50,
                num_workers=0,
                run=DDP.replace(epochs=1, checkpoint=out / "checkpoint.pt"),
            )
            result = {"error": None}
        except DataError as error:
            result = {"error": str(error)}
    elif mode == "prior":
        prior = small_prior()
        draws, captions = prior_data()
        history = fit_prior(
            prior, TokenDraws(draws), captions, test=(draws[0, :40], captions[:40]),
            batch_size=PRIOR_BATCH // 2, run=DDP.replace(epochs=3, lr=1e-2),
        )  # fmt: skip
        result = {"weights": prior.state_dict(), "history": history.to_rows()}
    elif mode == "lost":
        # process 1 is killed (as by kill -9) at its third step: process 0 must stop with
        # one line that says so and names the checkpoint to resume from
        train = load_mnist(mnist, "train").images[:1000]
        vae = small_vae()
        calls = {"n": 0}

        def die(module, inputs):
            calls["n"] += 1
            if torch.distributed.get_rank() == 1 and calls["n"] == 7:
                os.kill(os.getpid(), signal.SIGKILL)

        vae.decoder.register_forward_pre_hook(die)
        try:
            fit(vae, train, batch_size=100, run=DDP.replace(epochs=2, checkpoint=out / "c.pt"))
            result = {"error": None}
        except ProcessLostError as error:
            result = {"error": str(error)}
        torch.save(result, out / "rank0.pt")  # process 1 is gone; the group is broken
        return
    else:
        fabric = make_fabric(DDP)
        fabric.launch()
        vae = small_vae()
        module = fabric.setup_module(ELBOLoss(vae, gradient_elbo(mode), NUM_DATA))
        x = gradient_batch(mnist)[fabric.global_rank * HALF : (fabric.global_rank + 1) * HALF]
        pyro.set_rng_seed(GRADIENT_SEED + fabric.global_rank)
        fabric.backward(module(x))
        result = {name: p.grad for name, p in vae.named_parameters()}
    rank = torch.distributed.get_rank()
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
