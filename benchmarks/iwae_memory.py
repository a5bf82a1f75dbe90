#!/usr/bin/env python
"""Peak memory of an importance-weighted training step against the particles k.

Each k runs in a fresh process (peak resident memory only grows): two training steps of
the MLP 784-500-500-50 Bernoulli VAE at batch 100 with ``IWAE_ELBO(k, estimator)``
through fit's loss module. The table gives the peak, the growth over the smallest k, and
the bytes per (image x particle), from which the largest k for a given memory follows.

    python benchmarks/iwae_memory.py --particles 50 200 1000 2000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def one(k: int, estimator: str, batch: int) -> int:
    """Peak resident memory (bytes) of two training steps with k particles."""
    import torch

    from pyro_vae import VAE
    from pyro_vae.objectives import IWAE_ELBO
    from pyro_vae.train import ELBOLoss

    torch.manual_seed(0)
    vae = VAE(latent_dim=50, hidden=500, depth=2)
    module = ELBOLoss(vae, IWAE_ELBO(k, estimator), num_data=60_000)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x = (torch.rand(batch, 1, 28, 28) < 0.3).float()
    for _ in range(2):
        module(x).backward()
        optimizer.step()
        optimizer.zero_grad()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--particles", type=int, nargs="+", default=[50, 200, 1000])
    p.add_argument("--estimator", default="dreg")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--memory-gb", type=float, default=24.0, help="for the largest k")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.estimator, args.batch_size)))
        return
    peaks = {}
    for k in args.particles:
        command = [sys.executable, __file__, "--one", str(k), "--estimator", args.estimator,
                   "--batch-size", str(args.batch_size)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        peaks[k] = int(done.stdout.strip().splitlines()[-1])
    k0 = min(peaks)
    print(f"batch {args.batch_size}, estimator {args.estimator}")
    print(f"| k | peak RSS (MB) | over k={k0} (MB) | bytes per image x particle |")
    print("| --- | --- | --- | --- |")
    slope = None
    for k, peak in sorted(peaks.items()):
        extra = peak - peaks[k0]
        per = extra / (args.batch_size * (k - k0)) if k > k0 else float("nan")
        slope = per if k > k0 else slope
        print(f"| {k} | {peak / 2**20:.0f} | {extra / 2**20:.0f} | {per:.0f} |")
    if slope:
        budget = args.memory_gb * 2**30 - peaks[k0]
        largest = int(k0 + budget / (slope * args.batch_size))
        print(f"largest k that fits {args.memory_gb:g} GB at batch {args.batch_size}: ~{largest}")


if __name__ == "__main__":
    main()
