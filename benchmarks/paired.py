#!/usr/bin/env python
"""Paired per-image comparison of fitted VAEs on the same held-out images.

The test NLLs of two models trained differently differ by far less than each one's
standard error over images (about 0.2 nats on MNIST's 10,000 test images), because most of
that spread is between images (some digits are simply harder). Scoring every model on the
same images (the fixed binarization of :func:`pyro_vae.evaluate.prepare_held_out`) and
taking the per-image difference removes it: the standard error of the mean difference is
what tells two objectives apart. This script computes the IWAE bound of each image under
each checkpoint (``--particles`` K, seeded), keeps them in ``--out`` (one tensor per
checkpoint, so a later call with the same settings reuses them), and prints each model's
NLL and its paired difference from the first checkpoint:

    python benchmarks/paired.py --particles 1000 --out runs/paired \
        elbo=runs/objectives/elbo/checkpoint.pt dreg=runs/objectives/dreg/checkpoint.pt
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from pyro_vae import load_vae
from pyro_vae.data import load_mnist
from pyro_vae.evaluate import iwae_log_likelihood, prepare_held_out


def per_image_bounds(name: str, checkpoint: Path, images, args) -> torch.Tensor:
    """``(N,)`` IWAE bounds of the first ``len(images)`` test images under ``checkpoint``."""
    cached = args.out / f"{name}.K{args.particles}.N{len(images)}.seed{args.seed}.pt"
    if cached.exists():
        return torch.load(cached, weights_only=True)
    vae = load_vae(checkpoint)
    vae.eval()
    x, _ = prepare_held_out(vae, images)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        bounds = iwae_log_likelihood(vae, x, args.particles, progress=args.progress)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(bounds, cached)
    return bounds


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    images = load_mnist(args.data_dir, "test").images[: args.test_images]
    models = [item.split("=", 1) for item in args.checkpoints]
    if any(len(pair) != 2 for pair in models):
        raise SystemExit("give each checkpoint as NAME=PATH")
    bounds = {name: per_image_bounds(name, Path(path), images, args) for name, path in models}
    reference = models[0][0]
    n = len(images)
    print(f"{n} test images, IWAE K = {args.particles}, seed {args.seed}; "
          f"differences are paired, per image, against {reference}")  # fmt: skip
    print(f"| model | test NLL | NLL - {reference}'s (paired) | images where it is better |")
    print("| --- | --- | --- | --- |")
    for name, values in bounds.items():
        nll = -values.mean().item()
        se = values.std().item() / math.sqrt(n)
        if name == reference:
            print(f"| {name} | {nll:.2f} ± {se:.2f} | | |")
            continue
        diff = bounds[reference] - values  # NLL difference per image
        diff_se = diff.std().item() / math.sqrt(n)
        better = (values > bounds[reference]).float().mean().item()
        print(f"| {name} | {nll:.2f} ± {se:.2f} | {diff.mean().item():+.3f} ± {diff_se:.3f} "
              f"| {100 * better:.1f}% |")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="NAME=PATH, the first is the reference")
    p.add_argument("--particles", type=int, default=1000, help="K of the IWAE bound")
    p.add_argument("--test-images", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("runs/paired"))
    p.add_argument("--progress", action="store_true")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
