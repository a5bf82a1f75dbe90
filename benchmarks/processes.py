#!/usr/bin/env python
"""Training throughput of pyro_vae.fit in one process against several (DDP), in one run.

Each contender fits the same VAE (MLP 784-400-50, Bernoulli, batch 256 per process, Adam
1e-3) on MNIST for ``--epochs`` epochs; the figure is images per second over the epochs
after the first (``EpochRecord.seconds`` counts training steps only: no start-up, no
held-out evaluation). Contenders alternate within each round, the first of each round
rotating, so that load on a shared machine hits them alike; medians and ratios are
printed side by side.

    python benchmarks/processes.py --data-dir ../shared/data --rounds 3
    python benchmarks/processes.py --accelerator cuda --processes 1 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pyro
import torch

from pyro_vae import VAE, Run, fit
from pyro_vae.data import load_mnist


def throughput(images: torch.Tensor, processes: int, args: argparse.Namespace) -> float:
    """Images per second of one fit with ``processes`` processes."""
    pyro.set_rng_seed(0)
    vae = VAE()
    run = Run(
        epochs=args.epochs,
        accelerator=args.accelerator,
        devices=processes,
        strategy="ddp_spawn" if processes > 1 else "auto",
        progress=False,
    )
    history = fit(vae, images, batch_size=args.batch_size, run=run)
    seconds = sum(record.seconds for record in history.epochs[1:])
    return len(images) * (args.epochs - 1) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="train on the first N images")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first epoch is warm-up)")
    images = load_mnist(args.data_dir, "train").images[: args.limit]
    rates: dict[int, list[float]] = {n: [] for n in args.processes}
    for round_ in range(args.rounds):
        order = args.processes[round_ % len(args.processes) :]
        order += args.processes[: round_ % len(args.processes)]
        for n in order:
            rates[n].append(throughput(images, n, args))
            print(f"round {round_ + 1}: {n} process(es): {rates[n][-1]:,.0f} images/s", flush=True)
    base = statistics.median(rates[args.processes[0]])
    print(f"\n| processes | images/s (median of {args.rounds}) | ratio to {args.processes[0]} |")
    print("| --- | --- | --- |")
    for n in args.processes:
        median = statistics.median(rates[n])
        print(f"| {n} | {median:,.0f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
