#!/usr/bin/env python
"""Fit a VAE and write a run folder: config, history, metrics, checkpoint and pictures.

python scripts/fit.py --likelihood gaussian --epochs 10 --out runs/gaussian
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import fields
from pathlib import Path

import pyro
import torch
from _cli import (
    add_data_args,
    add_engine_args,
    engine_kwargs,
    epoch_printer,
    load_data,
    require_positive,
    run_checkpoint,
    run_main,
    write_run_config,
)

from pyro_vae import VAE, VAEConfig, fit, plots
from pyro_vae.config import ARCHS, GAUSSIAN_SIGMAS, LATENTS, LIKELIHOODS
from pyro_vae.data import ImageSet, fixed_preprocess
from pyro_vae.errors import TrainingDivergedError, UsageError
from pyro_vae.evaluate import bits_per_dim
from pyro_vae.tokenizer import discrete_metrics
from pyro_vae.train import ELBOS, TEMPERATURE_SCHEDULES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fit.py", description=__doc__.splitlines()[0])
    model = p.add_argument_group("model")
    model.add_argument("--likelihood", choices=LIKELIHOODS, default="bernoulli")
    model.add_argument("--arch", choices=ARCHS, default="mlp")
    model.add_argument("--latent-dim", type=int, default=50)
    model.add_argument("--hidden", type=int, default=400, help="hidden units (MLP and conv head)")
    model.add_argument("--depth", type=int, default=1, help="MLP: hidden layers")
    model.add_argument("--channels", type=int, default=32, help="conv: first feature maps")
    model.add_argument("--gaussian-sigma", choices=GAUSSIAN_SIGMAS, default="shared")
    model.add_argument("--sigma-init", type=float, default=0.1)
    model.add_argument("--name", default="vae", help="prefix of Pyro site and parameter names")
    model.add_argument("--latent", choices=LATENTS, default="gaussian")
    model.add_argument("--groups", type=int, default=30, help="relaxed-categorical MLP: codes")
    model.add_argument("--classes", type=int, default=10, help="relaxed-categorical: codebook size")
    model.add_argument(
        "--straight-through", action="store_true", help="straight-through Gumbel-softmax"
    )
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=256)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--beta", type=float, default=1.0, help="KL weight (1 = the ELBO)")
    train.add_argument("--warmup", type=float, default=0.0, help="epochs of linear KL warm-up")
    train.add_argument(
        "--elbo",
        choices=list(ELBOS),
        help="default: trace; meanfield for relaxed-categorical (exact categorical KL); "
        "trace and meanfield are fused (no Pyro tracing, the same estimator), trace-pyro and "
        "meanfield-pyro run Pyro's own classes",
    )
    train.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        metavar="MODE",
        help="torch.compile the fused ELBO (optionally a mode, e.g. reduce-overhead for CUDA "
        "graphs); needs --elbo trace or meanfield",
    )
    train.add_argument("--temperature", type=float, default=1.0, help="Concrete: start")
    train.add_argument("--temperature-floor", type=float, default=0.5, help="Concrete: end")
    train.add_argument(
        "--temperature-schedule", choices=TEMPERATURE_SCHEDULES, default="exponential"
    )
    train.add_argument(
        "--temperature-anneal", type=float, help="epochs to reach the floor (default: all)"
    )
    train.add_argument(
        "--iwae-particles",
        type=int,
        default=100,
        help="relaxed-categorical: particles of the test IWAE bound (0: skip it)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--limit", type=int, help="train on the first N images only")
    train.add_argument("--test-limit", type=int, help="evaluate on the first N test images only")
    train.add_argument(
        "--no-progress", action="store_true", help="no progress bars (a line per epoch instead)"
    )
    add_data_args(p)
    add_engine_args(p)
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="run folder (default runs/<likelihood>-<arch>)")
    out.add_argument("--resume", action="store_true", help="continue the run in --out")
    return p


def main(args: argparse.Namespace) -> None:
    require_positive(args, "epochs", "batch_size", "limit", "test_limit", "latent_dim", "hidden")
    if args.iwae_particles < 0:
        raise UsageError(
            f"--iwae-particles must be 0 (no bound) or more, got {args.iwae_particles}"
        )
    out = args.out or Path("runs") / f"{args.likelihood}-{args.arch}"
    checkpoint = run_checkpoint(out, args.resume)
    train, test = load_data(args)
    if isinstance(train, ImageSet):
        train = train.head(args.limit).images
    elif args.limit is not None:
        train = torch.utils.data.Subset(train, range(min(args.limit, len(train))))
    test = test.head(args.test_limit).images
    # every model option is named after its VAEConfig field
    options = {f.name: getattr(args, f.name) for f in fields(VAEConfig) if f.name in vars(args)}
    config = VAEConfig(image_shape=tuple(test.shape[1:]), **options)
    write_run_config(out, config, args)

    pyro.set_rng_seed(args.seed)  # before the VAE: its initial weights are random too
    vae = VAE(config)
    try:
        history = fit(
            vae,
            train,
            test,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            beta=args.beta,
            warmup=args.warmup,
            elbo=args.elbo or ("meanfield" if args.latent == "relaxed-categorical" else "trace"),
            seed=args.seed,
            compile=args.compile,
            num_workers=args.num_workers,
            checkpoint=checkpoint,
            resume=args.resume,
            progress=not args.no_progress,
            temperature=args.temperature,
            temperature_floor=args.temperature_floor,
            temperature_schedule=args.temperature_schedule,
            temperature_anneal=args.temperature_anneal,
            **engine_kwargs(args, out),
            on_epoch=epoch_printer(args),
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: progress saved in {checkpoint}; continue with --resume",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    except TrainingDivergedError as error:
        kept = (
            f"the last good epoch is in {checkpoint}"
            if checkpoint.exists()
            else "no epoch finished"
        )
        error.args = (f"{error}; {kept}",)
        raise
    if history.rank != 0:
        return  # process 0 writes the run folder
    write_outputs(out, vae, history, test, args)
    tokens = " tokens.png" if config.latent == "relaxed-categorical" else ""
    print(
        f"wrote {out}/: config.json history.csv metrics.json checkpoint.pt loss.png "
        f"reconstructions.png samples.png{tokens} logs/"
    )


def write_outputs(out: Path, vae: VAE, history, test: torch.Tensor, args) -> None:
    rows = history.to_rows()
    with open(out / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["epoch"])
        writer.writeheader()
        writer.writerows(rows)
    final = rows[-1] if rows else {}
    metrics = {
        "test_elbo": final.get("test_elbo"),
        "unit": "nats per image",
        "test_images": int(test.shape[0]),
        "epochs": final.get("epoch", 0),
        "train_seconds": sum(r["seconds"] for r in rows),
        "likelihood": vae.config.likelihood,
        "data": "binarized with a fixed seed"
        if vae.likelihood.preprocessing == "binarize"
        else "uniformly dequantized with a fixed seed",
    }
    if vae.likelihood.preprocessing == "dequantize" and final.get("test_elbo") is not None:
        metrics["test_bits_per_dim_bound"] = bits_per_dim(
            -final["test_elbo"], vae.config.num_pixels
        )
    if vae.config.latent == "relaxed-categorical":
        metrics.update(discrete_metrics(vae, test, args.iwae_particles, final.get("train_loss")))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    weight = next(vae.parameters())
    plots.save(plots.loss_curves(history), out / "loss.png")
    with torch.no_grad():
        originals = fixed_preprocess(test[:32].to(weight.device), vae.likelihood.preprocessing)
        originals = originals.to(weight.dtype)  # float64 under --precision 64-true
        plots.save(
            plots.reconstructions(originals, vae.reconstruct(originals)),
            out / "reconstructions.png",
        )
        torch.manual_seed(args.seed)
        plots.save(
            plots.image_grid(vae.sample(64), "decoder means of prior samples"), out / "samples.png"
        )
        if vae.config.latent == "relaxed-categorical":
            tokens = vae.tokenize(originals)
            figure = plots.tokenizer(
                originals, tokens, vae.detokenize(tokens), vae.latent.codebook_size
            )
            plots.save(figure, out / "tokens.png")


if __name__ == "__main__":
    sys.exit(run_main(main, parser()))
