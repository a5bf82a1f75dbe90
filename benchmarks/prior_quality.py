#!/usr/bin/env python
"""What a learned token prior buys (issue 17): samples of three generators for the
judges, and the held-out bound of a discrete VAE with its uniform and its learned prior.

Writes, under ``--out``:

- ``gaussian.pt``: decoder means of prior draws of a Gaussian-latent VAE (``--gaussian``);
- ``uniform.pt``: a discrete VAE's images decoded from uniformly drawn codes (``--dvae``);
- ``learned.pt``: the same VAE's images from codes drawn by its learned prior
  (``--prior``), with the captions they were drawn for (a conditional prior); with
  ``--temperatures``, one file ``learned-T<t>.pt`` per sampling temperature instead;
- ``bound.json``: the importance-weighted bound (K = ``--particles``) of the first
  ``--test-images`` test images under the discrete VAE with each prior;

then judge the three files with ``benchmarks/judges.py``::

    python benchmarks/prior_quality.py --gaussian G.pt --dvae D.pt --prior P.pt --out OUT
    python benchmarks/judges.py --images OUT/gaussian.pt OUT/uniform.pt OUT/learned.pt \\
        --out OUT/judges --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyro
import torch

from pyro_vae import load_vae
from pyro_vae.data import fixed_preprocess, load_mnist
from pyro_vae.evaluate import iwae_log_likelihood
from pyro_vae.prior import load_prior


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@torch.no_grad()
def samples(args: argparse.Namespace) -> None:
    """The three generators' images, ``--per-class`` per digit (or as many in all)."""
    n = 10 * args.per_class
    pyro.set_rng_seed(args.seed)
    if args.gaussian is not None:
        gaussian = load_vae(args.gaussian).sample(n)
        torch.save({"images": to_uint8(gaussian)}, args.out / "gaussian.pt")
    dvae = load_vae(args.dvae)
    torch.save({"images": to_uint8(dvae.sample(n))}, args.out / "uniform.pt")
    prior = load_prior(args.prior)
    captions = torch.arange(10).repeat_interleave(args.per_class)
    if not prior.config.num_classes:
        captions = None
    for t in args.temperatures or [1.0]:
        pyro.set_rng_seed(args.seed)
        tokens = prior.sample(None if captions is not None else n, captions, temperature=t)
        grid = tokens.reshape(-1, *dvae.latent.code_shape)
        saved = {"images": to_uint8(dvae.detokenize(grid)), "temperature": t}
        if captions is not None:
            saved["captions"] = captions
        name = "learned.pt" if args.temperatures is None else f"learned-T{t:g}.pt"
        torch.save(saved, args.out / name)


@torch.no_grad()
def bounds(args: argparse.Namespace) -> dict:
    """The held-out bound of the discrete VAE with its uniform and its learned prior, on
    the same images with the same seed (nats per image)."""
    dvae, prior = load_vae(args.dvae), load_prior(args.prior)
    images = load_mnist(args.data_dir, "test").images[: args.test_images]
    x = fixed_preprocess(images, dvae.likelihood.preprocessing)
    result = {"test_images": len(x), "particles": args.particles}
    for name, model in (("uniform", dvae), ("learned", dvae.with_prior(prior))):
        pyro.set_rng_seed(args.seed)
        per_image = iwae_log_likelihood(model, x, num_particles=args.particles, batch_size=50)
        result[name] = {"mean": per_image.mean().item(),
                        "se": (per_image.std() / len(per_image) ** 0.5).item()}  # fmt: skip
        result.setdefault("per_image", {})[name] = per_image
    difference = result.pop("per_image")
    gain = difference["learned"] - difference["uniform"]
    result["gain"] = {"mean": gain.mean().item(), "se": (gain.std() / len(gain) ** 0.5).item()}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gaussian", type=Path, help="a Gaussian-latent VAE (none: no gaussian.pt)")
    p.add_argument("--dvae", type=Path, required=True, help="a relaxed-categorical VAE")
    p.add_argument("--prior", type=Path, required=True, help="its token prior")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--test-images", type=int, default=500)
    p.add_argument("--particles", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--temperatures", type=float, nargs="+", help="sampling temperatures of the prior"
    )
    p.add_argument("--no-bound", action="store_true", help="samples only, no bound.json")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("runs/prior_quality"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    samples(args)
    if args.no_bound:
        return
    result = bounds(args)
    (args.out / "bound.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
