"""Fit the M2 semi-supervised VAE on MNIST with a few labels and report its test accuracy.

pyro-vae fit-ssvae --labels-per-class 10 --epochs 40 --out runs/ssvae

With ``--base`` a VAE fitted by ``pyro-vae fit`` (M1) encodes the images, and M2 is
trained on its codes (Kingma et al.'s M1 + M2):

pyro-vae fit-ssvae --base runs/quickstart/checkpoint.pt --aux-weight 1.0 --out runs/m1m2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import pyro
import torch

from pyro_vae.checkpoint import load_vae
from pyro_vae.config import LIKELIHOODS, VAEConfig
from pyro_vae.data import load_mnist
from pyro_vae.errors import UsageError
from pyro_vae.ssvae import SSVAE, active_code_dims, balanced_labels, fit_ssvae

from .common import (
    add_config_arg,
    add_engine_args,
    add_loop_args,
    epoch_printer,
    report_interrupt,
    require_positive,
    run_checkpoint,
    run_from_args,
    run_main,
    train_or_interrupt,
    write_run_config,
)

#: the command's name, in ``pyro-vae fit-ssvae`` and in the run folder's config.json.
COMMAND = "fit-ssvae"
SUMMARY = __doc__.splitlines()[0]


def parser(prog: str = f"pyro-vae {COMMAND}") -> argparse.ArgumentParser:
    """The options of ``pyro-vae fit-ssvae`` (and of ``scripts/fit_ssvae.py``)."""
    p = argparse.ArgumentParser(prog=prog, description=SUMMARY)
    add_config_arg(p)
    p.add_argument("--data-dir", type=Path, help="folder holding MNIST/raw/")
    p.add_argument("--labels-per-class", type=int, default=10, help="labelled images per digit")
    p.add_argument(
        "--base",
        type=Path,
        help="checkpoint of a fitted VAE with a Gaussian latent; M2 is stacked on its codes",
    )
    p.add_argument(
        "--all-codes",
        action="store_true",
        help="with --base, model every code dimension, not only the active ones",
    )
    p.add_argument(
        "--likelihood",
        choices=LIKELIHOODS,
        help="p(x | y, z); bernoulli by default. With --base M2 models the base's codes, "
        "and only gaussian applies (one learned sigma per code dimension)",
    )
    p.add_argument("--latent-dim", type=int, default=50)
    p.add_argument("--hidden", type=int, default=500)
    p.add_argument("--depth", type=int, default=1)
    add_loop_args(p, epochs=40)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument(
        "--aux-weight",
        type=float,
        default=0.1,
        help="weight of the classification loss, as a fraction of the data set size "
        "(Kingma et al.: 0.1)",
    )
    p.add_argument("--limit", type=int, help="use the first N training images only")
    p.add_argument("--test-limit", type=int, help="evaluate on the first N test images only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, default=Path("runs/ssvae"), help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    add_engine_args(p)
    return p


def main(args: argparse.Namespace) -> None:
    """Fit M2 (on the images, or on the codes of ``--base``) and write its run folder.

    On Ctrl-C the checkpoint is saved, ``history.csv`` and ``metrics.json`` are written
    for the finished epochs, and the command exits with status 130.
    """
    require_positive(args, "labels_per_class", "epochs", "batch_size", "limit", "test_limit")
    settings = run_from_args(args, args.out)
    run_checkpoint(args.out, args.resume, args.out_from_config)
    train = load_mnist(args.data_dir, "train").head(args.limit)
    test = load_mnist(args.data_dir, "test").head(args.test_limit)
    chosen = balanced_labels(train.labels, args.labels_per_class, args.seed)
    unlabelled = torch.ones(len(train), dtype=torch.bool)
    unlabelled[chosen] = False
    ssvae = build_ssvae(args, train.images)
    write_run_config(args.out, COMMAND, model_config(ssvae), settings, args)

    start = time.perf_counter()
    history, interrupted = train_or_interrupt(
        lambda: fit_ssvae(
            ssvae,
            train.images[chosen],
            train.labels[chosen],
            train.images[unlabelled],
            (test.images, test.labels),
            batch_size=args.batch_size,
            aux_weight=args.aux_weight,
            on_epoch=epoch_printer(args),
            run=settings,
        ),
        settings,
    )
    if history.rank == 0:  # the other processes of a data-parallel run write nothing
        history.write_csv(args.out / "history.csv")
        metrics = run_metrics(args, ssvae, history, interrupted)
        metrics.update(
            labelled_images=int(chosen.numel()),
            unlabelled_images=int(unlabelled.sum()),
            test_images=len(test),
            wall_seconds=time.perf_counter() - start,
        )
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if interrupted:
        report_interrupt(settings, history)
    if history.rank == 0:
        print(f"test accuracy {metrics['test_accuracy']}; wrote {args.out}/")


def build_ssvae(args: argparse.Namespace, images: torch.Tensor) -> SSVAE:
    """The M2 model the options describe: on the images, or stacked on ``--base``'s codes
    (its active code dimensions, found on ``images``, unless ``--all-codes``)."""
    if args.all_codes and args.base is None:
        raise UsageError("--all-codes chooses the codes of a --base VAE; pass --base too")
    base = None
    if args.base is not None:
        if args.likelihood not in (None, "gaussian"):
            raise UsageError("with --base, M2 models continuous codes: --likelihood gaussian")
        base = load_vae(args.base)
    config = VAEConfig(
        likelihood=args.likelihood or "bernoulli",
        latent_dim=args.latent_dim,
        hidden=args.hidden,
        depth=args.depth,
        name="ssvae",
    )
    code_dims = None
    if base is not None:  # codes of about unit scale, with a sigma learned per dimension
        config = replace(config, likelihood="gaussian", gaussian_sigma="pixel", sigma_init=0.5)
        if not args.all_codes:
            code_dims = active_code_dims(base, images)
    pyro.set_rng_seed(args.seed)  # before the model: its initial weights are random too
    ssvae = SSVAE(config, base=base, code_dims=code_dims)
    if base is not None:
        size = base.config.latent_dim
        print(f"M2 models {len(ssvae.code_dims)} of the base's {size} code dimensions")
    return ssvae


def run_metrics(args: argparse.Namespace, ssvae: SSVAE, history, interrupted: bool) -> dict:
    """``metrics.json``'s figures of the run: the last accuracy and how the run went."""
    accuracies = history.column("test_accuracy") if history.epochs else []
    return {
        "test_accuracy": accuracies[-1] if accuracies else None,
        "base": None if args.base is None else str(args.base),
        "code_dims": ssvae.code_dims,
        "epochs": len(history.epochs),
        "interrupted": interrupted,
        "accelerator": history.device.split(":")[0],  # what it ran on, never "auto"
        "processes": args.devices,
    }


def model_config(ssvae: SSVAE) -> dict:
    """The SSVAE's config for ``config.json``: its :class:`VAEConfig` and what its
    checkpoint stores beside it (the number of classes, the base VAE's config and the
    code dimensions M2 models, None without ``--base``)."""
    return {
        **ssvae.config.to_dict(),
        "num_classes": ssvae.num_classes,
        "base_config": None if ssvae.base is None else ssvae.base.config.to_dict(),
        "code_dims": ssvae.code_dims,
    }


def run(argv: list[str] | None = None, prog: str = f"pyro-vae {COMMAND}") -> int:
    """``pyro-vae fit-ssvae`` with ``argv`` (default: the command line); the exit status."""
    return run_main(main, parser(prog), argv, COMMAND)
