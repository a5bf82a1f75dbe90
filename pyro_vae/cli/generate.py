"""Draw images from a discrete VAE with a fitted token prior, or complete held-out images.

pyro-vae generate --checkpoint runs/grid/checkpoint.pt --prior runs/prior/checkpoint.pt \\
    --caption 7 --n 64 --out sevens.png
pyro-vae generate --checkpoint runs/grid/checkpoint.pt --prior runs/prior/checkpoint.pt \\
    --complete --data-dir ../shared/data --out completions.png

The prior draws token sequences (a class's, with ``--caption``) and the VAE's decoder
turns them into images. Beside the picture goes a ``.pt`` file of the same name with the
images as uint8 (decoder means x 255, rounded) and their captions.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import pyro
import torch

from pyro_vae import VAE, plots
from pyro_vae.devices import resolve_device
from pyro_vae.errors import UsageError
from pyro_vae.prior import COMMAND_TEMPERATURE, TokenPrior, load_prior, sampling_logits
from pyro_vae.tokenizer import tokenize_images

from .common import (
    add_data_args,
    add_device_arg,
    check_figure_path,
    require_finite_positive,
    require_positive,
    run_main,
)
from .fit_prior import check_codes, decode_tokens, labelled_images, load_discrete_vae

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: the command's name, in ``pyro-vae generate``.
COMMAND = "generate"
SUMMARY = __doc__.splitlines()[0]


#: images per class that ``--caption all`` shows in its picture (its .pt file keeps all).
SHOWN_PER_CLASS = 16


def parser(prog: str = f"pyro-vae {COMMAND}") -> argparse.ArgumentParser:
    """The options of ``pyro-vae generate`` (and of ``scripts/generate.py``)."""
    p = argparse.ArgumentParser(prog=prog, description=SUMMARY)
    p.add_argument("--checkpoint", type=Path, required=True, help="the relaxed-categorical VAE")
    p.add_argument("--prior", type=Path, required=True, help="a fit-prior run's checkpoint.pt")
    p.add_argument(
        "--caption",
        help="a class index, or 'all' for a row per class (n images each); a conditional "
        "prior's default is all, an unconditional prior takes none. With --complete: the "
        "class to complete every image as (default: each image's own label)",
    )
    p.add_argument("--n", type=int, default=64, help="images (per class with --caption all)")
    p.add_argument(
        "--temperature",
        type=float,
        default=COMMAND_TEMPERATURE,
        help="divides the prior's logits; 1 draws from the fitted prior as it is, lower "
        f"draws closer to its most likely codes (default {COMMAND_TEMPERATURE}: the "
        "clearest images, see docs/discrete.md)",
    )
    p.add_argument("--top-k", type=int, help="draw each token from its K most likely values")
    p.add_argument("--seed", type=int, default=0)
    add_device_arg(p)
    p.add_argument(
        "--out", type=Path, required=True, help="the picture; the .pt of images goes beside it"
    )
    complete = p.add_argument_group("completion")
    complete.add_argument(
        "--complete",
        action="store_true",
        help="keep the top half of held-out images' token grids (an MLP's first half of "
        "its codes) and let the prior draw the rest",
    )
    complete.add_argument("--num-images", type=int, default=8, help="held-out images")
    complete.add_argument("--completions", type=int, default=4, help="completions per image")
    add_data_args(p)
    return p


def main(args: argparse.Namespace) -> None:
    """Write the picture of samples (or completions) and the ``.pt`` file beside it."""
    require_positive(args, "n", "top_k", "num_images", "completions")
    require_finite_positive(args, "temperature")
    check_figure_path(args.out, "one picture (and a .pt file of its images beside it)")
    device = resolve_device(args.device)
    vae = load_discrete_vae(args.checkpoint, device)
    prior = load_prior(args.prior, device)
    check_codes(vae, prior.config, f"the prior in {args.prior}")
    if args.top_k is not None and args.top_k > prior.config.vocab_size:
        raise UsageError(f"--top-k {args.top_k} exceeds the codebook of {prior.config.vocab_size}")
    caption = parse_caption(args.caption, prior, args.prior)
    pyro.set_rng_seed(args.seed)
    if args.complete:
        if caption == "all":
            raise UsageError("--complete takes one --caption (a class index), not 'all'")
        picture, record = completions(vae, prior, args, caption)
    else:
        picture, record = samples(vae, prior, args, caption)
    plots.save(picture, args.out)
    data = args.out.with_suffix(".pt")
    torch.save(record, data)
    print(f"wrote {args.out} and {data}: {record['images'].shape[0]} images")


def parse_caption(value: str | None, prior: TokenPrior, path: Path) -> int | str | None:
    """``--caption`` checked against the prior: None (unconditional, or with --complete
    the images' labels), "all" or a class index."""
    classes = prior.config.num_classes
    if not classes:
        if value is not None:
            raise UsageError(
                f"--caption: the prior in {path} is unconditional (fitted without captions); "
                "leave --caption out"
            )
        return None
    if value is None or value == "all":
        return value
    try:
        index = int(value)
    except ValueError:
        raise UsageError(f"--caption takes a class index or 'all', got {value!r}") from None
    if not 0 <= index < classes:
        raise UsageError(f"--caption {index}: the prior knows classes 0..{classes - 1}")
    return index


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoder means in [0, 1] as 8-bit images: ``round(255 * mean)``, on the CPU."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


# ---------------------------------------------------------------- samples
def samples(
    vae: VAE, prior: TokenPrior, args: argparse.Namespace, caption: int | str | None
) -> tuple[Figure, dict]:
    """``(figure, record)`` of ``--n`` images drawn from the prior (per class for "all";
    all of one class for an index; unconditional without captions)."""
    device = next(vae.parameters()).device
    captions, ncol = None, None
    if caption == "all" or (caption is None and prior.config.conditional):
        classes = prior.config.num_classes
        captions = torch.arange(classes, device=device).repeat_interleave(args.n)
        ncol, title = args.n, f"decoded prior samples, a row per class (0..{classes - 1})"
    elif caption is not None:
        captions = torch.full((args.n,), caption, dtype=torch.long, device=device)
        title = f"decoded prior samples of class {caption}"
    else:
        title = "decoded samples of the token prior"
    tokens = prior.sample(
        None if captions is not None else args.n,
        captions,
        temperature=args.temperature,
        top_k=args.top_k,
    )
    images = decode_tokens(vae, tokens)
    record = {
        "images": as_uint8(images),
        "captions": None if captions is None else captions.long().cpu(),
        "temperature": args.temperature,
        "top_k": args.top_k,
    }
    shown = images
    if ncol is not None and ncol > SHOWN_PER_CLASS:  # a picture stays readable; the file has all
        shown = images.unflatten(0, (-1, ncol))[:, :SHOWN_PER_CLASS].flatten(0, 1)
        ncol, title = SHOWN_PER_CLASS, f"{title}, the first {SHOWN_PER_CLASS} of {args.n}"
    title += f" (temperature {args.temperature:g}" + (
        f", top-{args.top_k})" if args.top_k is not None else ")"
    )
    return plots.image_grid(shown, title, ncol=ncol), record


# ---------------------------------------------------------------- completion
@torch.no_grad()
def complete(
    prior: TokenPrior,
    prefix: torch.Tensor,
    captions: torch.Tensor | None,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Sequences ``(N, L)`` that begin with ``prefix`` ``(N, P)``, the rest drawn from the
    prior given it (and the captions): one pass of the network over the prefix fills its
    key/value cache, then one position at a time, as :meth:`TokenPrior.sample` draws.

    Built on the prior's public pieces (:meth:`TokenPrior.distribution`, its network's
    ``new_cache`` and forward, :func:`sampling_logits`); a ``prefix`` argument of
    ``TokenPrior.sample`` would make it the library's.
    """
    n, kept = prefix.shape
    fn = prior.distribution(
        captions, batch_size=n, temperature=temperature, top_k=top_k
    )  # checks the captions; its starts are the captions' (or zeros)
    net, length = fn.net, fn.net.length
    if kept >= length:
        raise UsageError(f"a prefix of {kept} tokens leaves nothing to complete of {length}")
    tokens = prefix.new_zeros(n, length, dtype=torch.long)
    tokens[:, :kept] = prefix
    cache = net.new_cache()
    for i in range(kept, length):
        logits = net(fn.starts, tokens[:, :i], cache)[:, -1]
        probs = sampling_logits(logits, fn.temperature, fn.top_k).softmax(-1)
        tokens[:, i] = torch.multinomial(probs, 1).squeeze(-1)
    return tokens


def kept_tokens(code_shape: tuple[int, ...]) -> int:
    """How many tokens (raster order) make the top half of a code grid: its first
    ``rows // 2`` rows; for an MLP's codes (no layout), the first half of them."""
    if len(code_shape) == 2:
        return (code_shape[0] // 2) * code_shape[1]
    return code_shape[0] // 2


def completions(
    vae: VAE, prior: TokenPrior, args: argparse.Namespace, caption: int | None
) -> tuple[Figure, dict]:
    """``(figure, record)`` of ``--num-images`` held-out images, a row each: the image, its
    own tokens decoded, then ``--completions`` completions of the lower half."""
    device = next(vae.parameters()).device
    _, _, test, _ = labelled_images(args)
    test = test.head(args.num_images)
    count, repeats = len(test), args.completions
    tokens = tokenize_images(vae, test.images).reshape(count, -1).to(device)
    captions = None
    if prior.config.conditional:
        if caption is None and test.labels is None:
            raise UsageError(
                "the prior is conditional and these images have no labels: name the class "
                "to complete them as with --caption N"
            )
        own = test.labels if caption is None else torch.full((count,), caption)
        captions = own.long().to(device).repeat_interleave(repeats)
    kept = kept_tokens(vae.latent.code_shape)
    drawn = complete(
        prior, tokens[:, :kept].repeat_interleave(repeats, 0), captions,
        args.temperature, args.top_k,
    )  # fmt: skip
    filled = decode_tokens(vae, drawn)
    originals = test.images.to(device=device, dtype=filled.dtype) / 255
    columns = [originals.unsqueeze(1), decode_tokens(vae, tokens).unsqueeze(1)]
    columns.append(filled.reshape(count, repeats, *filled.shape[1:]))
    title = (
        f"each row: a held-out image, its tokens decoded, {repeats} completions of "
        f"the tokens after the first {kept} of {tokens.shape[1]}"
    )
    figure = plots.image_grid(torch.cat(columns, 1).flatten(0, 1), title, ncol=2 + repeats)
    record = {
        "images": as_uint8(filled),
        "captions": None if captions is None else captions.cpu(),
        "originals": test.images.cpu(),
        "kept_tokens": kept,
        "temperature": args.temperature,
        "top_k": args.top_k,
    }
    return figure, record


def run(argv: list[str] | None = None, prog: str = f"pyro-vae {COMMAND}") -> int:
    """``pyro-vae generate`` with ``argv`` (default: the command line); the exit status."""
    return run_main(main, parser(prog), argv)
