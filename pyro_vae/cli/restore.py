"""Restore held-out images with a fitted VAE's decoder as the prior: inpaint, denoise, upscale.

pyro-vae restore --checkpoint runs/quickstart/checkpoint.pt --task inpaint --mask left-half
pyro-vae restore --checkpoint runs/quickstart/checkpoint.pt --task denoise --noise 0.3
pyro-vae restore --checkpoint runs/quickstart/checkpoint.pt --task super-resolution \\
    --factor 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

from pyro_vae import load_vae, plots
from pyro_vae.data import fixed_preprocess
from pyro_vae.errors import DataError, UsageError
from pyro_vae.inverse import MASKS, Restoration, downsample, infer_nuts, infer_svi, make_mask

from .common import add_data_args, check_figure_path, load_data, require_positive, run_main

#: the command's name, in ``pyro-vae restore``.
COMMAND = "restore"
SUMMARY = __doc__.splitlines()[0]

TASKS = ("inpaint", "denoise", "super-resolution")
#: what each task does unless told otherwise: (mask, noise std, downsampling factor).
DEFAULTS = {
    "inpaint": ("left-half", 0.0, 1),
    "denoise": ("none", 0.3, 1),
    "super-resolution": ("none", 0.05, 4),
}
FIGURES = {"inpaint": "inpainting.png", "denoise": "denoising.png"}


def parser(prog: str = f"pyro-vae {COMMAND}", choose_task: bool = True) -> argparse.ArgumentParser:
    """The options; ``choose_task=False`` leaves out ``--task`` and ``--factor`` (inpaint.py)."""
    p = argparse.ArgumentParser(prog=prog, description=SUMMARY)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt of a fitted VAE")
    if choose_task:
        p.add_argument("--task", choices=TASKS, default="inpaint", help="what to restore")
        p.add_argument(
            "--factor",
            type=int,
            metavar="N",
            help="super-resolution: the observed image is averaged over N x N blocks "
            "(N divides height and width; default 4)",
        )
    masks = f"known pixels: {', '.join(MASKS)} or none (default: left-half"
    p.add_argument(
        "--mask",
        help=masks + " for inpaint, none otherwise; for super-resolution, pixels of the "
        "low-resolution image)"
        if choose_task
        else masks + "; none denoises)",
    )
    p.add_argument(
        "--noise",
        type=float,
        help="std of the Gaussian noise added to the observed pixels (default: 0 for inpaint, "
        "0.3 for denoise, 0.05 for super-resolution, where it must be positive)"
        if choose_task
        else "std of the Gaussian noise added to the observed pixels (default: 0)",
    )
    p.add_argument("--method", choices=["svi", "nuts"], default="svi")
    p.add_argument("--num-images", type=int, default=6, help="held-out images to restore")
    p.add_argument("--draws", type=int, default=4, help="posterior draws shown per image")
    p.add_argument("--samples", type=int, default=100, help="posterior draws for mean and std")
    p.add_argument("--steps", type=int, default=500, help="svi: optimization steps")
    p.add_argument("--warmup", type=int, default=200, help="nuts: warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    add_data_args(p)
    figures = (
        "inpainting.png, denoising.png or super-resolution.png" if choose_task else "inpainting.png"
    )
    p.add_argument(
        "--out", type=Path, help=f"the figure (default: {figures} in the current folder)"
    )
    return p


def check_options(args: argparse.Namespace) -> None:
    """Fill in the task's defaults and raise :class:`UsageError` for options that cannot
    work, before anything slow (reading the checkpoint and the data) happens."""
    require_positive(args, "num_images", "draws", "samples", "steps", "warmup")
    if args.draws > args.samples:
        raise UsageError(f"--draws ({args.draws}) cannot exceed --samples ({args.samples})")
    mask, noise, factor = DEFAULTS[args.task]
    if args.factor is not None and args.task != "super-resolution":
        raise UsageError(f"--factor is for --task super-resolution, not --task {args.task}")
    args.mask = mask if args.mask is None else args.mask
    args.noise = noise if args.noise is None else args.noise
    args.factor = factor if args.factor is None else args.factor
    if args.mask != "none":
        make_mask(args.mask, (1, 2, 2))  # an unknown kind fails now, not after the loading
    if args.noise < 0:
        raise UsageError(f"--noise must be a standard deviation >= 0, got {args.noise}")
    if args.task == "super-resolution":
        if args.noise == 0:
            raise UsageError(
                "--task super-resolution needs --noise > 0, the std of the noise on the "
                "low-resolution pixels (0.05 by default)"
            )
        if args.factor < 2:
            raise UsageError(f"--factor must be an integer of at least 2, got {args.factor}")
    elif args.mask == "none" and args.noise == 0:
        raise UsageError(
            "nothing to restore: give a --mask (inpainting) or a --noise > 0 (denoising)"
        )
    args.out = args.out or Path(FIGURES.get(args.task, f"{args.task}.png"))


def main(args: argparse.Namespace) -> None:
    """Damage held-out images, restore them with the VAE as the prior, save the figure."""
    check_options(args)
    check_figure_path(args.out, "one figure")  # a bad --out fails now, not after the work
    pyro.set_rng_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    vae = load_vae(args.checkpoint)
    _, test = load_data(args)
    images = test.head(args.num_images).images
    if tuple(images.shape[1:]) != vae.config.image_shape:
        raise DataError(
            f"the held-out images are {tuple(images.shape[1:])} but {args.checkpoint} was "
            f"fitted on {vae.config.image_shape}; give the data options it was fitted with "
            "(--dataset, --data-dir, --rgb, --image-size)"
        )
    if args.task == "super-resolution":
        lines, figure = super_resolve(args, vae, images, generator)
    else:
        lines, figure = inpaint_or_denoise(args, vae, images, generator)
    plots.save(figure, args.out)
    print("\n".join([*lines, f"wrote {args.out}"]))


def infer(args: argparse.Namespace, vae, observed, mask, noise, factor: int = 1) -> Restoration:
    """The posterior by the chosen method, with the options' numbers of steps and draws."""
    if args.method == "svi":
        return infer_svi(
            vae, observed, mask, noise, factor=factor, num_steps=args.steps,
            num_samples=args.samples,
        )  # fmt: skip
    return infer_nuts(
        vae, observed, mask, noise, factor=factor, num_samples=args.samples,
        warmup_steps=args.warmup,
    )  # fmt: skip


def inpaint_or_denoise(args: argparse.Namespace, vae, images, generator):
    """Hide pixels and/or add noise to the data as the VAE sees it (binarized for a
    Bernoulli VAE), restore, and compare with the undamaged data."""
    shape = vae.config.image_shape
    mask = None if args.mask == "none" else make_mask(args.mask, shape, generator)
    clean = fixed_preprocess(images, vae.likelihood.preprocessing)
    noise = args.noise or None
    observed = (
        clean if noise is None else clean + noise * torch.randn(clean.shape, generator=generator)
    )
    posterior = infer(args, vae, observed, mask, noise)

    known = torch.ones_like(clean, dtype=torch.bool) if mask is None else mask.expand_as(clean)
    with torch.no_grad():
        average_image = vae.sample(1000).mean(0).expand_as(clean)
    lines = []
    if mask is not None:

        def hidden_error(restored: torch.Tensor) -> float:
            return ((restored - clean)[~known] ** 2).mean().item()

        lines.append(
            f"mean squared error on hidden pixels: completion {hidden_error(posterior.mean):.4f}, "
            f"average image {hidden_error(average_image):.4f}"
        )
    if noise is not None:
        lines.append(
            f"mean squared error on known pixels against the clean image: restoration "
            f"{((posterior.mean - clean)[known] ** 2).mean().item():.4f}, "
            f"noisy input {((observed - clean)[known] ** 2).mean().item():.4f}"
        )
    figure = plots.inpainting(clean, observed, known, posterior.images[: args.draws], posterior.std)
    return lines, figure


def super_resolve(args: argparse.Namespace, vae, images, generator):
    """Average the grey images over blocks, add noise, infer the full-resolution images,
    and compare the posterior mean and bilinear upsampling with the originals.

    The original is the grey image in [0, 1], whatever the likelihood: the decoder's mean
    image (for a Bernoulli VAE, the probability of ink) is what the model predicts for it.
    """
    original = images.float() / 255.0
    low = downsample(original, args.factor)
    observed = low + args.noise * torch.randn(low.shape, generator=generator)
    mask = None if args.mask == "none" else make_mask(args.mask, observed.shape[1:], generator)
    posterior = infer(args, vae, observed, mask, args.noise, args.factor)

    def error(restored: torch.Tensor) -> str:
        return f"{((restored - original) ** 2).mean().item():.4f}"

    (h, w), (height, width) = observed.shape[-2:], original.shape[-2:]
    line = (
        f"super-resolution x{args.factor} ({h}x{w} -> {height}x{width}, noise std {args.noise})"
        f" of {len(images)} held-out images, mean squared error against the originals: "
        f"posterior mean {error(posterior.mean)}"
    )
    bilinear = None
    if mask is None:  # with hidden pixels, interpolation has nothing fair to start from
        bilinear = F.interpolate(
            observed, scale_factor=args.factor, mode="bilinear", align_corners=False
        )
        line += f", bilinear upsampling of the input {error(bilinear)}"
    lines = [line]
    figure = plots.super_resolution(
        observed, posterior.images[: args.draws], posterior.mean, posterior.std, original,
        bilinear=bilinear, mask=mask, noise=args.noise,
    )  # fmt: skip
    return lines, figure


def run(argv: list[str] | None = None, prog: str = f"pyro-vae {COMMAND}") -> int:
    """``pyro-vae restore`` with ``argv`` (default: the command line); the exit status."""
    return run_main(main, parser(prog), argv)


# ---------------------------------------------------------------- inpaint.py, the old name
#: what ``scripts/inpaint.py`` says it does.
INPAINT_SUMMARY = "Complete and denoise held-out images with a fitted VAE's decoder as the prior."


def inpaint_parser(prog: str = "inpaint.py") -> argparse.ArgumentParser:
    """The options of ``scripts/inpaint.py``: restore's, without ``--task`` and
    ``--factor``, and with its own defaults (``--mask left-half``, no noise,
    ``inpainting.png``)."""
    p = parser(prog, choose_task=False)
    p.description = INPAINT_SUMMARY
    p.set_defaults(mask="left-half", noise=0.0, out=Path("inpainting.png"))
    return p


def inpaint_main(args: argparse.Namespace) -> None:
    """Inpainting when a mask is given, else denoising with ``--noise``."""
    args.task = "inpaint" if args.mask != "none" else "denoise"
    args.factor = None
    main(args)


def run_inpaint(argv: list[str] | None = None, prog: str = "inpaint.py") -> int:
    """``scripts/inpaint.py`` with ``argv`` (default: the command line); the exit status."""
    return run_main(inpaint_main, inpaint_parser(prog), argv)
