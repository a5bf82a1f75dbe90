#!/usr/bin/env python
"""The small measurements behind issue 12's CPU savings, each printed with what it compares.

1. An optimizer step with and without ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (which importing
   Lightning sets): torch's Adam asks ``torch.cuda.is_available()`` every step, and with
   the variable a CUDA build of torch loads NVML to answer.
2. A Bernoulli image's log-density summed per image, then over the batch
   (``reduction="none"`` and two sums) against one reduction (``reduction="sum"``):
   milliseconds and page faults per forward and backward, at batch 256.
3. The autograd graph of one training loss: nodes of the hand-written loss of ``speed.py``
   and of ``vae.elbo_loss``.
4. The forward pass of both losses at batch 2, where the arithmetic is nil and what
   remains is each one's fixed Python cost.

Each timing is the median of interleaved rounds.

    python benchmarks/step_parts.py [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import pyro
import torch
import torch.nn.functional as F
from speed import plain_loss

from pyro_vae import VAE

ROUNDS = 7


def minor_faults() -> int:
    """Page faults of this process so far (Linux), or 0 where /proc is not there."""
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().split()[9])
    except OSError:
        return 0


def interleaved(contenders: dict[str, Callable[[], object]], calls: int) -> None:
    """Median microseconds and page faults per call of each contender, in rounds."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    faults: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up
        for _ in range(calls // 10 + 1):
            fn()
    for _ in range(ROUNDS):
        for name, fn in contenders.items():
            f0, t0 = minor_faults(), time.perf_counter()
            for _ in range(calls):
                fn()
            seconds[name].append((time.perf_counter() - t0) / calls)
            faults[name].append((minor_faults() - f0) / calls)
    for name in contenders:
        print(
            f"  {name:<34} {statistics.median(seconds[name]) * 1e6:8.1f} us"
            f"   {statistics.median(faults[name]):6.1f} page faults a call"
        )


def nvml_probe() -> None:
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.ones(2, 3)

    def step() -> None:
        model(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    def with_variable() -> None:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
        step()

    def without() -> None:
        os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
        step()

    print("1. one Adam step of a 3-parameter model (torch built for CUDA, no GPU in use):")
    interleaved({"PYTORCH_NVML_BASED_CUDA_CHECK=1": with_variable, "unset": without}, 500)
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)


def bernoulli_sums() -> None:
    logits0 = torch.randn(256, 1, 28, 28)
    x = (torch.rand(256, 1, 28, 28) > 0.5).float()

    def per_image() -> None:
        logits = logits0.clone().requires_grad_()
        pixels = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        (-pixels.sum((1, 2, 3))).sum().backward()

    def one_reduction() -> None:
        logits = logits0.clone().requires_grad_()
        (-F.binary_cross_entropy_with_logits(logits, x, reduction="sum")).backward()

    print("2. Bernoulli log-density of 256 MNIST-sized images, forward and backward:")
    interleaved({"per image, then the batch": per_image, "one reduction": one_reduction}, 200)


def graph_nodes(loss: torch.Tensor) -> int:
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}")
    nvml_probe()
    bernoulli_sums()
    torch.manual_seed(0)
    vae = VAE()
    x = (torch.rand(2, 1, 28, 28) > 0.5).float()
    with pyro.validation_enabled(False):
        plain = graph_nodes(plain_loss(vae, x, 60_000))
        fused = graph_nodes(vae.elbo_loss(x, num_data=60_000))
        print(f"3. autograd graph nodes of one loss: hand-written {plain}, elbo_loss {fused}")
        print("4. forward pass of the loss at batch 2 (fixed cost per step):")
        interleaved(
            {
                "hand-written (speed.plain_loss)": lambda: plain_loss(vae, x, 60_000),
                "vae.elbo_loss": lambda: vae.elbo_loss(x, num_data=60_000),
            },
            500,
        )


if __name__ == "__main__":
    main()
