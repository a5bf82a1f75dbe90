#!/usr/bin/env python
"""Complete and denoise held-out digits with a fitted VAE's decoder as the prior.

python scripts/inpaint.py --checkpoint runs/bernoulli-mlp/checkpoint.pt --mask left-half
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyro
import torch
from _cli import run_main

from pyro_vae import load_vae, plots
from pyro_vae.data import fixed_preprocess, load_mnist
from pyro_vae.inverse import MASKS, infer_nuts, infer_svi, make_mask


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inpaint.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a fitted MNIST VAE")
    p.add_argument("--data-dir", type=Path, help="folder holding MNIST/raw/")
    p.add_argument("--mask", default="left-half", help=f"known pixels: {', '.join(MASKS)} or none")
    p.add_argument(
        "--noise", type=float, default=0.0, help="std of Gaussian noise added to the known pixels"
    )
    p.add_argument("--method", choices=["svi", "nuts"], default="svi")
    p.add_argument("--num-images", type=int, default=6, help="test digits to restore")
    p.add_argument("--draws", type=int, default=4, help="posterior draws shown per digit")
    p.add_argument("--samples", type=int, default=100, help="posterior draws for mean and std")
    p.add_argument("--steps", type=int, default=500, help="svi: optimization steps")
    p.add_argument("--warmup", type=int, default=200, help="nuts: warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("inpainting.png"), help="the figure")
    return p


def main(args: argparse.Namespace) -> None:
    for name in ("num_images", "draws", "samples", "steps", "warmup"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.noise < 0:
        raise ValueError(f"--noise must be >= 0, got {args.noise}")
    if args.draws > args.samples:
        raise ValueError("--draws cannot exceed --samples")
    pyro.set_rng_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    mask = None if args.mask == "none" else make_mask(args.mask, (1, 28, 28), generator)
    vae = load_vae(args.checkpoint)
    if vae.config.image_shape != (1, 28, 28):
        raise ValueError(
            f"{args.checkpoint} is not an MNIST model: images {vae.config.image_shape}"
        )
    clean = fixed_preprocess(
        load_mnist(args.data_dir, "test").images[: args.num_images], vae.likelihood.preprocessing
    )
    noise = args.noise or None
    observed = (
        clean if noise is None else clean + noise * torch.randn(clean.shape, generator=generator)
    )
    if args.method == "svi":
        posterior = infer_svi(
            vae, observed, mask, noise, num_steps=args.steps, num_samples=args.samples
        )
    else:
        posterior = infer_nuts(
            vae, observed, mask, noise, num_samples=args.samples, warmup_steps=args.warmup
        )

    known = torch.ones_like(clean, dtype=torch.bool) if mask is None else mask.expand_as(clean)
    with torch.no_grad():
        average_digit = vae.sample(1000).mean(0).expand_as(clean)
    lines = []
    if mask is not None:

        def hidden_error(images: torch.Tensor) -> float:
            return ((images - clean)[~known] ** 2).mean().item()

        lines.append(
            f"mean squared error on hidden pixels: completion {hidden_error(posterior.mean):.4f}, "
            f"average digit {hidden_error(average_digit):.4f}"
        )
    if noise is not None:
        lines.append(
            f"mean squared error on known pixels against the clean image: restoration "
            f"{((posterior.mean - clean)[known] ** 2).mean().item():.4f}, "
            f"noisy input {((observed - clean)[known] ** 2).mean().item():.4f}"
        )
    figure = plots.inpainting(clean, observed, known, posterior.images[: args.draws], posterior.std)
    plots.save(figure, args.out)
    print("\n".join([*lines, f"wrote {args.out}"]))


if __name__ == "__main__":
    sys.exit(run_main(main, parser()))
