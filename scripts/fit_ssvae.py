#!/usr/bin/env python
"""Fit the M2 semi-supervised VAE on MNIST with a few labels and report its test accuracy.

python scripts/fit_ssvae.py --labels-per-class 10 --epochs 40 --out runs/ssvae

With ``--base`` a VAE fitted by scripts/fit.py (M1) encodes the images, and M2 is
trained on its codes (Kingma et al.'s M1 + M2):

python scripts/fit_ssvae.py --base runs/quickstart/checkpoint.pt --aux-weight 1.0 --out runs/m1m2
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import pyro
import torch
from _cli import (
    add_engine_args,
    engine_kwargs,
    epoch_printer,
    is_first_process,
    require_positive,
    run_checkpoint,
    run_main,
    write_run_config,
)

from pyro_vae import load_checkpoint, load_vae
from pyro_vae.config import LIKELIHOODS, VAEConfig
from pyro_vae.data import load_mnist
from pyro_vae.engine import resolve_device
from pyro_vae.errors import UsageError
from pyro_vae.ssvae import SSVAE, SSVAEEpoch, active_code_dims, balanced_labels, fit_ssvae


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fit_ssvae.py", description=__doc__.splitlines()[0])
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
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/ssvae"), help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    add_engine_args(p)
    return p


def main(args: argparse.Namespace) -> None:
    require_positive(args, "labels_per_class", "epochs", "batch_size", "limit", "test_limit")
    checkpoint = run_checkpoint(args.out, args.resume)
    if args.all_codes and args.base is None:
        raise UsageError("--all-codes chooses the codes of a --base VAE; pass --base too")
    base = None
    if args.base is not None:
        if args.likelihood not in (None, "gaussian"):
            raise UsageError("with --base, M2 models continuous codes: --likelihood gaussian")
        base = load_vae(args.base)
    train = load_mnist(args.data_dir, "train").head(args.limit)
    test = load_mnist(args.data_dir, "test").head(args.test_limit)
    chosen = balanced_labels(train.labels, args.labels_per_class, args.seed)
    unlabelled = torch.ones(len(train), dtype=torch.bool)
    unlabelled[chosen] = False
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
            code_dims = active_code_dims(base, train.images)
    pyro.set_rng_seed(args.seed)  # before the model: its initial weights are random too
    ssvae = SSVAE(config, base=base, code_dims=code_dims)
    if base is not None:
        size = base.config.latent_dim
        print(f"M2 models {len(ssvae.code_dims)} of the base's {size} code dimensions")
    write_run_config(args.out, config, args)
    first = is_first_process()  # the other processes of a data-parallel run write nothing

    start = time.perf_counter()
    interrupted = False
    try:
        history = fit_ssvae(
            ssvae,
            train.images[chosen],
            train.labels[chosen],
            train.images[unlabelled],
            (test.images, test.labels),
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            aux_weight=args.aux_weight,
            seed=args.seed,
            checkpoint=checkpoint,
            resume=args.resume,
            progress=not args.no_progress,
            on_epoch=epoch_printer(args),
            **engine_kwargs(args, args.out),
        )
    except KeyboardInterrupt:
        # the finished epochs are in the checkpoint; report them rather than nothing
        interrupted = True
        saved = load_checkpoint(checkpoint) if checkpoint.exists() else {}
        history = [SSVAEEpoch(**row) for row in saved.get("history", [])]
        print(
            f"\ninterrupted after {len(history)} epochs: progress saved in {checkpoint}; "
            "continue with --resume",
            file=sys.stderr,
        )
    if not first:
        return
    rows = [asdict(record) for record in history]
    with open(args.out / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(SSVAEEpoch)])
        writer.writeheader()
        writer.writerows(rows)
    metrics = {
        "test_accuracy": rows[-1]["test_accuracy"] if rows else None,
        "labelled_images": int(chosen.numel()),
        "unlabelled_images": int(unlabelled.sum()),
        "test_images": len(test),
        "base": None if args.base is None else str(args.base),
        "code_dims": ssvae.code_dims,
        "epochs": len(rows),
        "interrupted": interrupted,
        "wall_seconds": time.perf_counter() - start,
        "accelerator": resolve_device(args.device).type
        if args.accelerator == "auto"
        else args.accelerator,
        "processes": args.devices,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"test accuracy {metrics['test_accuracy']}; wrote {args.out}/")
    if interrupted:
        raise SystemExit(130)


if __name__ == "__main__":
    sys.exit(run_main(main, parser()))
