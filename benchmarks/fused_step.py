#!/usr/bin/env python
"""Time of a training step: plain PyTorch, Pyro's Trace_ELBO, the fused ELBO, compiled.

One training step (loss, backward, Adam) of the MLP 784-400-50 with a Bernoulli
likelihood on MNIST batches of 256 (binarized once, held in memory, gathered by shuffled
index as ``fit`` does), scaled to the 60,000 training images. The contenders:

- plain: the negative ELBO written by hand (``plain_loss`` of ``speed.py``);
- pyro: ``Trace_ELBO().differentiable_loss`` of the model and guide bodies, the route
  ``fit`` takes (no param-store registration per step);
- fused: ``vae.elbo_loss``, the same estimator without tracing (:mod:`pyro_vae.fused`);
- fused-elbo: ``FusedTrace_ELBO().differentiable_loss(vae.model, vae.guide, ...)``;
- fused-compiled: ``torch.compile`` of a function calling ``vae.elbo_loss`` with the KL
  weight as a tensor (backward through the compiled graph; Adam eager).

All share one VAE and one optimizer, so they do the same arithmetic. Each round runs
``--steps`` steps of every contender in turn, the first of each round rotating, so that
load on a shared machine and warm-up hit them alike; the table gives the median
milliseconds per step over rounds, and each contender's ratio to plain.

    python benchmarks/fused_step.py --data-dir ../shared/data --rounds 5 --steps 200
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import lightning_fabric  # noqa: F401  (first: it sets the variable popped below)
import pyro
import torch
from pyro.infer import Trace_ELBO
from speed import plain_loss

from pyro_vae import VAE
from pyro_vae.data import load_mnist
from pyro_vae.devices import resolve_device
from pyro_vae.fused import FusedTrace_ELBO

# Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, with which every step of a
# torch optimizer on the CPU (torch built for CUDA) loads NVML to ask whether CUDA is
# there: about 0.3 ms. fit's optimizer skips that question on the CPU; a plain PyTorch
# loop outside this process never pays it, so it must not pay it here either.
os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)

BATCH = 256


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=200, help="steps per contender per round")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-compile", action="store_true", help="leave out fused-compiled")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    images = load_mnist(args.data_dir, "train").images.to(device)
    num_data = images.shape[0]
    data = (images.float() / 255 > torch.rand(images.shape, device=device)).float()
    vae = VAE().to(device).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    # fit's route through Pyro: the bodies of model and guide, without registration
    model = functools.partial(VAE._model_body, vae)
    guide = functools.partial(VAE.guide.__wrapped__, vae)
    trace_elbo, fused_elbo = Trace_ELBO(), FusedTrace_ELBO()
    kl_weight = torch.tensor(1.0, device=device)
    compiled = torch.compile(
        lambda x, weight: vae.elbo_loss(x, num_data=num_data, kl_weight=weight), dynamic=False
    )

    losses: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "plain": lambda x: plain_loss(vae, x, num_data),
        "pyro": lambda x: trace_elbo.differentiable_loss(model, guide, x, num_data=num_data),
        "fused": lambda x: vae.elbo_loss(x, num_data=num_data),
        "fused-elbo": lambda x: fused_elbo.differentiable_loss(
            vae.model, vae.guide, x, num_data=num_data
        ),
        "fused-compiled": lambda x: compiled(x, kl_weight),
    }
    if args.no_compile:
        del losses["fused-compiled"]
    names = list(losses)
    order = torch.randperm(num_data, device=device)
    full_batches = num_data // BATCH  # whole batches only: one compiled shape
    cursor = 0

    def run(name: str, steps: int) -> float:
        """Seconds for ``steps`` steps of contender ``name``."""
        nonlocal cursor
        loss_fn = losses[name]
        start = time.perf_counter()
        for _ in range(steps):
            index = order[cursor * BATCH : (cursor + 1) * BATCH]
            cursor = (cursor + 1) % full_batches
            loss = loss_fn(data[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    per_step: dict[str, list[float]] = {name: [] for name in names}
    # Pyro's per-step support checks are off, as in fit (the data are checked once)
    with pyro.validation_enabled(False), pyro.get_param_store().scope():
        for name in names:  # warm-up, and compilation
            run(name, 20)
        for r in range(args.rounds):
            rotated = names[r % len(names) :] + names[: r % len(names)]
            for name in rotated:
                per_step[name].append(run(name, args.steps) / args.steps * 1e3)
            print(
                f"round {r + 1}: " + "  ".join(f"{n} {per_step[n][-1]:.2f}" for n in names),
                flush=True,
            )

    medians = {name: statistics.median(times) for name, times in per_step.items()}
    print(
        f"\ndevice {device}, torch threads {torch.get_num_threads()}, batch {BATCH}, "
        f"{args.rounds} rounds of {args.steps} steps per contender; ms per step\n"
    )
    print(
        "| contender | "
        + " | ".join(f"round {r + 1}" for r in range(args.rounds))
        + " | median | / plain |"
    )
    print("| --- " * (args.rounds + 3) + "|")
    for name in names:
        rounds = " | ".join(f"{t:.2f}" for t in per_step[name])
        ratio = medians[name] / medians["plain"]
        print(f"| {name} | {rounds} | {medians[name]:.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
