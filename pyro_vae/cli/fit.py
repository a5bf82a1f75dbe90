"""Fit a VAE and write a run folder: config, history, metrics, checkpoint and pictures.

pyro-vae fit --likelihood gaussian --epochs 10 --out runs/gaussian
pyro-vae fit --config runs/gaussian/config.json --lr-schedule cosine --out runs/cosine
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import pyro
import torch

from pyro_vae import plots
from pyro_vae.config import ARCHS, GAUSSIAN_SIGMAS, LATENTS, LIKELIHOODS, VAEConfig
from pyro_vae.data import ImageSet, fixed_preprocess
from pyro_vae.errors import UsageError
from pyro_vae.evaluate import bits_per_dim
from pyro_vae.history import History
from pyro_vae.objectives import ESTIMATORS, IWAE_ELBO
from pyro_vae.tokenizer import discrete_metrics
from pyro_vae.train import ELBOS, TEMPERATURE_SCHEDULES, Temperature
from pyro_vae.train import fit as fit_vae
from pyro_vae.vae import VAE

from .common import (
    add_config_arg,
    add_loop_args,
    add_run_folder_args,
    epoch_printer,
    load_data,
    report_interrupt,
    require_positive,
    run_checkpoint,
    run_from_args,
    run_main,
    train_or_interrupt,
    write_run_config,
)

#: the command's name, in ``pyro-vae fit`` and in the run folder's config.json.
COMMAND = "fit"
SUMMARY = __doc__.splitlines()[0]


def parser(prog: str = f"pyro-vae {COMMAND}") -> argparse.ArgumentParser:
    """The options of ``pyro-vae fit`` (and of ``scripts/fit.py``)."""
    p = argparse.ArgumentParser(prog=prog, description=SUMMARY)
    add_config_arg(p)
    add_model_args(p.add_argument_group("model"))
    train = p.add_argument_group("training")
    add_loop_args(train, epochs=10)
    add_objective_args(train)
    train.add_argument(
        "--iwae-particles",
        type=int,
        default=100,
        help="relaxed-categorical: particles of the test IWAE bound (0: skip it)",
    )
    add_run_folder_args(p, train, "runs/<likelihood>-<arch>")
    return p


def add_model_args(model) -> None:
    """The model's options, each named after its :class:`VAEConfig` field."""
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


def add_objective_args(train) -> None:
    """The VAE objective's options: batch, KL weight, estimator, compile, temperature."""
    train.add_argument("--batch-size", type=int, default=256)
    train.add_argument("--beta", type=float, default=1.0, help="KL weight (1 = the ELBO)")
    train.add_argument("--warmup", type=float, default=0.0, help="epochs of linear KL warm-up")
    train.add_argument(
        "--elbo",
        choices=list(ELBOS),
        help="default: trace; meanfield for relaxed-categorical (exact categorical KL); "
        "trace and meanfield are fused (no Pyro tracing, the same estimator), trace-pyro and "
        "meanfield-pyro run Pyro's own classes; iwae the importance-weighted bound",
    )
    train.add_argument(
        "--particles",
        type=int,
        metavar="K",
        help="--elbo iwae: importance samples per image (default 5); memory grows with "
        "batch size x K",
    )
    train.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        help="--elbo iwae: the gradient estimator: iwae (default), dreg (doubly "
        "reparameterized, Tucker et al. 2019) or stl (sticking the landing)",
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


def main(args: argparse.Namespace) -> None:
    """Fit the VAE the options describe and write its run folder (process 0 only).

    On Ctrl-C the checkpoint is saved, ``history.csv`` and ``metrics.json`` are written
    for the finished epochs, and the command exits with status 130 (no pictures).
    """
    require_positive(
        args, "epochs", "batch_size", "limit", "test_limit", "latent_dim", "hidden", "particles"
    )
    elbo = training_elbo(args)
    if args.iwae_particles < 0:
        raise UsageError(
            f"--iwae-particles must be 0 (no bound) or more, got {args.iwae_particles}"
        )
    args.out = out = args.out or Path("runs") / f"{args.likelihood}-{args.arch}"
    settings = run_from_args(args, out)
    run_checkpoint(out, args.resume, args.out_from_config)
    train, test = load_data(args)
    if isinstance(train, ImageSet):
        train = train.head(args.limit).images
    elif args.limit is not None:
        train = torch.utils.data.Subset(train, range(min(args.limit, len(train))))
    test = test.head(args.test_limit).images
    # every model option is named after its VAEConfig field
    options = {f.name: getattr(args, f.name) for f in fields(VAEConfig) if f.name in vars(args)}
    config = VAEConfig(image_shape=tuple(test.shape[1:]), **options)
    write_run_config(out, COMMAND, config.to_dict(), settings, args)

    temperature = None
    if config.latent == "relaxed-categorical":
        temperature = Temperature(
            start=args.temperature,
            floor=args.temperature_floor,
            schedule=args.temperature_schedule,
            anneal=args.temperature_anneal,
        )
    pyro.set_rng_seed(args.seed)  # before the VAE: its initial weights are random too
    vae = VAE(config)
    history, interrupted = train_or_interrupt(
        lambda: fit_vae(
            vae,
            train,
            test,
            batch_size=args.batch_size,
            beta=args.beta,
            warmup=args.warmup,
            elbo=elbo,
            temperature=temperature,
            num_workers=args.num_workers,
            on_epoch=epoch_printer(args),
            run=settings,
        ),
        settings,
    )
    if history.rank == 0:  # process 0 writes the run folder
        write_metrics(out, vae, history, test, args, interrupted)
    if interrupted:
        report_interrupt(settings, history)
    if history.rank != 0:
        return
    write_pictures(out, vae, history, test, args.seed)
    tokens = " tokens.png" if config.latent == "relaxed-categorical" else ""
    print(
        f"wrote {out}/: config.json history.csv metrics.json checkpoint.pt loss.png "
        f"reconstructions.png samples.png{tokens} logs/"
    )


def training_elbo(args: argparse.Namespace) -> str | IWAE_ELBO:
    """The ELBO the options name: ``--elbo`` (by default "trace", "meanfield" for a
    relaxed-categorical latent), or with ``--elbo iwae`` the importance-weighted bound
    with ``--particles`` and ``--estimator``."""
    name = args.elbo or ("meanfield" if args.latent == "relaxed-categorical" else "trace")
    if name == "iwae":
        return IWAE_ELBO(args.particles or 5, args.estimator or "iwae")
    if args.particles is not None or args.estimator is not None:
        raise UsageError(
            "--particles and --estimator set the importance-weighted bound's particles and "
            f"gradient estimator; they need --elbo iwae, not --elbo {name}"
        )
    return name


def write_metrics(
    out: Path, vae: VAE, history: History, test: torch.Tensor, args, interrupted: bool
) -> None:
    """``history.csv`` (one row per epoch) and ``metrics.json`` (the last epoch's held-out
    ELBO and the run's totals; for a discrete latent, its IWAE bound and code usage,
    which an interrupted run skips: they take a while)."""
    history.write_csv(out / "history.csv")
    rows = history.to_rows()
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
        "interrupted": interrupted,
    }
    if vae.likelihood.preprocessing == "dequantize" and final.get("test_elbo") is not None:
        metrics["test_bits_per_dim_bound"] = bits_per_dim(
            -final["test_elbo"], vae.config.num_pixels
        )
    if vae.config.latent == "relaxed-categorical" and not interrupted:
        metrics.update(discrete_metrics(vae, test, args.iwae_particles, final.get("train_loss")))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def write_pictures(out: Path, vae: VAE, history: History, test: torch.Tensor, seed: int) -> None:
    """The loss curves, reconstructions of held-out images, prior samples and, for a
    discrete latent, the tokens of a few images."""
    weight = next(vae.parameters())
    plots.save(plots.loss_curves(history), out / "loss.png")
    with torch.no_grad():
        originals = fixed_preprocess(test[:32].to(weight.device), vae.likelihood.preprocessing)
        originals = originals.to(weight.dtype)  # float64 under --precision 64-true
        plots.save(
            plots.reconstructions(originals, vae.reconstruct(originals)),
            out / "reconstructions.png",
        )
        torch.manual_seed(seed)
        plots.save(
            plots.image_grid(vae.sample(64), "decoder means of prior samples"), out / "samples.png"
        )
        if vae.config.latent == "relaxed-categorical":
            tokens = vae.tokenize(originals)
            figure = plots.tokenizer(
                originals, tokens, vae.detokenize(tokens), vae.latent.codebook_size
            )
            plots.save(figure, out / "tokens.png")


def run(argv: list[str] | None = None, prog: str = f"pyro-vae {COMMAND}") -> int:
    """``pyro-vae fit`` with ``argv`` (default: the command line); the exit status."""
    return run_main(main, parser(prog), argv, COMMAND)
