"""Posterior predictive checks of a fitted VAE: p-values, an ArviZ netcdf file and figures.

pyro-vae ppc --checkpoint runs/bernoulli-mlp/checkpoint.pt --images 100 --draws 100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pyro_vae import plots, ppc
from pyro_vae.devices import resolve_device

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

#: the command's name, in ``pyro-vae ppc``.
COMMAND = "ppc"
SUMMARY = __doc__.splitlines()[0]

#: how many held-out images the image grids show, and how many replicate rows.
GRID_IMAGES, GRID_DRAWS = 12, 5


def parser(prog: str = f"pyro-vae {COMMAND}") -> argparse.ArgumentParser:
    """The options of ``pyro-vae ppc`` (and of ``scripts/ppc.py``)."""
    p = argparse.ArgumentParser(prog=prog, description=SUMMARY)
    add_checkpoint_args(p)
    p.add_argument("--images", type=int, default=100, help="held-out images to check")
    p.add_argument("--draws", type=int, default=100, help="replicates (draws of z) per image")
    p.add_argument("--batch-size", type=int, default=100, help="images per vectorized pass")
    p.add_argument("--seed", type=int, default=0)
    add_device_arg(p)
    add_data_args(p)
    p.add_argument(
        "--out", type=Path, help="folder for the results (default: ppc/ beside the checkpoint)"
    )
    return p


def main(args: argparse.Namespace) -> None:
    """Replicate held-out images from the fitted VAE, check them, write the results."""
    require_positive(args, "images", "draws", "batch_size")
    vae = load_model(args, resolve_device(args.device))
    _, test = load_data(args)
    images = test.head(args.images).images
    out = make_out_dir(args.out or default_out(args) / "ppc")

    # everything is computed before the first file is written: a failure leaves no half set
    draws = ppc.replicate(vae, images, args.draws, batch_size=args.batch_size, seed=args.seed)
    checks = ppc.check(draws)
    idata = ppc.to_inference_data(draws, vae)
    summary = {
        "checkpoint": str(args.checkpoint),
        "prior": None if args.prior is None else str(args.prior),
        "images": draws.observed.shape[0],
        "draws": draws.num_draws,
        "seed": args.seed,
        "likelihood": vae.config.likelihood,
        "statistics": {name: c.summary() for name, c in checks.items()},
    }
    n, s = min(GRID_IMAGES, draws.observed.shape[0]), min(GRID_DRAWS, draws.num_draws)
    loglik = checks["log_likelihood"]
    figures = {
        "ppc_statistics.png": ppc.plot_statistics(idata, "posterior"),
        "prior_predictive_statistics.png": ppc.plot_statistics(idata, "prior"),
        "replicates.png": plots.replicate_grid(draws.observed[:n], draws.replicated[:s, :n]),
        "prior_predictive.png": plots.image_grid(
            draws.prior_replicated[0, :64], "prior predictive draws (z ~ p(z), x ~ p(x | z))"
        ),
        "loglik_discrepancy.png": plots.discrepancy_scatter(
            loglik.observed, loglik.replicated, loglik.p_value
        ),
        "pixel_p_values.png": plots.p_value_map(checks["pixel_mean"].p_values),
    }

    idata.to_netcdf(str(out / "ppc.nc"))
    (out / "ppc.json").write_text(json.dumps(summary, indent=2))
    for name, figure in figures.items():
        plots.save(figure, out / name)

    width = max(map(len, checks))
    print(f"{'statistic':<{width}}  p-value  median p  extreme share  (observed vs replicated)")
    for name, c in checks.items():
        row = c.summary()
        print(
            f"{name:<{width}}  {row['p_value']:7.3f}  {row['median_p_value']:8.3f}  "
            f"{row['extreme_fraction']:13.3f}  ({row['observed_mean']:.4g} vs "
            f"{row['replicated_mean']:.4g})"
        )
    print(f"wrote {out}/: ppc.nc ppc.json {' '.join(figures)}")


def run(argv: list[str] | None = None, prog: str = f"pyro-vae {COMMAND}") -> int:
    """``pyro-vae ppc`` with ``argv`` (default: the command line); the exit status."""
    return run_main(main, parser(prog), argv)
