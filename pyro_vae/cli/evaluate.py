"""Held-out evaluation of a fitted VAE: IWAE log-likelihood, ELBO, KL, active units, pictures.

pyro-vae evaluate --checkpoint runs/bernoulli-mlp/checkpoint.pt --particles 5000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pyro_vae import plots
from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.devices import resolve_device
from pyro_vae.evaluate import evaluate_vae, kl_per_unit, prepare_held_out
from pyro_vae.history import History

from .common import (
    add_checkpoint_args,
    add_data_args,
    add_device_arg,
    default_out,
    load_data,
    load_model,
    make_out_dir,
    require_positive,
    run_main,
)

#: the command's name, in ``pyro-vae evaluate``.
COMMAND = "evaluate"
SUMMARY = __doc__.splitlines()[0]


def parser(prog: str = f"pyro-vae {COMMAND}") -> argparse.ArgumentParser:
    """The options of ``pyro-vae evaluate`` (and of ``scripts/evaluate.py``)."""
    p = argparse.ArgumentParser(prog=prog, description=SUMMARY)
    add_checkpoint_args(p)
    p.add_argument(
        "--particles", type=int, default=5000, help="K of the IWAE bound (5000: the literature)"
    )
    p.add_argument("--limit", type=int, help="evaluate the first N test images only")
    p.add_argument("--batch-size", type=int, default=100, help="images per batch")
    p.add_argument(
        "--particle-chunk",
        type=int,
        default=500,
        help="particles per pass; memory holds batch-size x particle-chunk decoded images",
    )
    p.add_argument("--elbo-particles", type=int, default=10, help="draws per image for the ELBO")
    p.add_argument("--seed", type=int, default=0)
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="numbers only, no pictures")
    add_data_args(p)
    p.add_argument(
        "--out",
        type=Path,
        help="folder for evaluation.json and pictures (default: beside the checkpoint)",
    )
    return p


def main(args: argparse.Namespace) -> None:
    """Evaluate the checkpoint on the held-out split; write evaluation.json and pictures."""
    require_positive(args, "particles", "limit", "batch_size", "particle_chunk", "elbo_particles")
    device = resolve_device(args.device)
    vae = load_model(args, device)
    _, test = load_data(args)
    test = test.head(args.limit)
    out = args.out or default_out(args)
    make_out_dir(out)
    result = evaluate_vae(
        vae,
        test.images,
        num_particles=args.particles,
        batch_size=args.batch_size,
        particle_chunk=args.particle_chunk,
        elbo_particles=args.elbo_particles,
        seed=args.seed,
        progress=not args.no_progress,
    )
    record = {
        **result.to_dict(),
        "checkpoint": str(args.checkpoint),
        "prior": None if args.prior is None else str(args.prior),
        "device": str(device),
        "config": vae.config.to_dict(),
    }
    (out / "evaluation.json").write_text(json.dumps(record, indent=2))
    print(result.table())
    written = ["evaluation.json"]
    if not args.no_plots:
        written += write_pictures(out, vae, test)
        history = History.from_rows(load_checkpoint(args.checkpoint).get("history", []))
        if args.prior is not None:  # the prior's run has its own curves, in its folder
            history = History.from_rows([])
        if history.epochs:
            plots.save(plots.loss_curves(history), out / "loss.png")
            written.append("loss.png")
    print(f"wrote {out}/: {' '.join(written)}")


def write_pictures(out: Path, vae, test) -> list[str]:
    """The latent-space pictures of the issue: traversals, an interpolation, the 2-D
    manifold (2-D latents only) and a scatter of codes coloured by label."""
    x, _ = prepare_held_out(vae, test.images[:2000].to(next(vae.parameters()).device))
    labels = None if test.labels is None else test.labels[:2000]
    written = []
    with torch.no_grad():
        codes = vae.encode(x)
        plots.save(plots.latent_scatter(codes, labels), out / "latent_scatter.png")
        written.append("latent_scatter.png")
        if x.shape[0] >= 2:  # an interpolation needs two images (--limit 1 gives one)
            plots.save(
                plots.interpolation(vae.decode, codes[0], codes[1], x[0], x[1]),
                out / "interpolation.png",
            )
            written.append("interpolation.png")
        if codes.dim() == 2:  # one vector per image: coordinates can be varied one at a time
            order = kl_per_unit(vae, x).mean(0).argsort(descending=True)
            plots.save(
                plots.latent_traversals(vae.decode, codes[0], order[:10].tolist()),
                out / "traversals.png",
            )
            written.append("traversals.png")
        if codes.dim() == 2 and codes.shape[1] == 2:
            plots.save(plots.latent_manifold(vae.decode, device=codes.device), out / "manifold.png")
            written.append("manifold.png")
    return written


def run(argv: list[str] | None = None, prog: str = f"pyro-vae {COMMAND}") -> int:
    """``pyro-vae evaluate`` with ``argv`` (default: the command line); the exit status."""
    return run_main(main, parser(prog), argv)
