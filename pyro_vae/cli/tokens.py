"""Turn images into tokens with a discrete VAE, or tokens back into images.

pyro-vae tokenize --checkpoint runs/grid/checkpoint.pt --split test --out tokens.pt
pyro-vae tokenize --checkpoint runs/grid/checkpoint.pt --decode tokens.pt --out grid.png

(The module is ``tokens``, not ``tokenize``: a module of that name would stand for the
standard library's ``tokenize`` wherever its folder is first on ``sys.path``.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pyro_vae import load_vae, plots
from pyro_vae.data import ImageSet, stack_dataset
from pyro_vae.devices import resolve_device
from pyro_vae.errors import DataError, UsageError
from pyro_vae.tokenizer import codebook_usage, tokenize_images

from .common import (
    add_data_args,
    add_device_arg,
    check_figure_path,
    load_data,
    make_out_dir,
    require_positive,
    run_main,
)

#: the command's name, in ``pyro-vae tokenize``.
COMMAND = "tokenize"
SUMMARY = "Tokenize a data split with a discrete VAE, or decode a token file."

#: marks a token file as ours, like the checkpoint format tag.
TOKENS_FORMAT = "pyro_vae.tokens"


def parser(prog: str = f"pyro-vae {COMMAND}") -> argparse.ArgumentParser:
    """The options of ``pyro-vae tokenize`` (and of ``scripts/tokenize.py``)."""
    p = argparse.ArgumentParser(prog=prog, description=SUMMARY)
    p.add_argument("--checkpoint", type=Path, required=True, help="a relaxed-categorical VAE")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--limit", type=int, help="tokenize the first N images only")
    p.add_argument(
        "--decode", type=Path, metavar="TOKENS", help="decode this token file to an image grid"
    )
    p.add_argument("--count", type=int, default=64, help="--decode: images in the grid")
    p.add_argument(
        "--draws",
        type=int,
        help="also write D draws of each image's codes from the posterior q(z | x) (the "
        "file's 'draws', (D, N, ...)), which fit-prior --tokens fits a prior to",
    )
    p.add_argument("--seed", type=int, default=0, help="--draws: seed of the draws")
    p.add_argument("--batch-size", type=int, default=1000)
    add_device_arg(p)
    p.add_argument(
        "--out", type=Path, required=True, help="token file (.pt), or with --decode a picture"
    )
    add_data_args(p)
    return p


def main(args: argparse.Namespace) -> None:
    """Write a token file of a data split, or with ``--decode`` a picture of a token file."""
    require_positive(args, "limit", "count", "batch_size", "draws")
    if args.draws is not None and args.decode is not None:
        raise UsageError("--draws goes with tokenizing, not with --decode")
    if args.decode is not None:
        check_figure_path(args.out, "one picture")
    elif args.out.is_dir():
        raise UsageError(
            f"--out {args.out} is a folder; this writes one file: "
            f"name it, e.g. --out {args.out / 'tokens.pt'}"
        )
    else:
        make_out_dir(args.out.parent)  # before the work, so a bad --out fails at once
    vae = load_vae(args.checkpoint, resolve_device(args.device))
    if vae.config.latent != "relaxed-categorical":
        raise UsageError(
            f"{args.checkpoint} holds a VAE with latent {vae.config.latent!r}; "
            "tokens need latent 'relaxed-categorical'"
        )
    if args.decode is not None:
        decode(vae, args)
    else:
        encode(vae, args)


def encode(vae, args: argparse.Namespace) -> None:
    train, test = load_data(args)
    images = train if args.split == "train" else test
    if not isinstance(images, ImageSet):
        images = stack_dataset(images)
    images = images.head(args.limit)
    tokens = tokenize_images(vae, images.images, args.batch_size)
    usage = codebook_usage(tokens, vae.latent.codebook_size)
    record = {
        "format": TOKENS_FORMAT,
        "tokens": tokens,
        "shape": list(tokens.shape[1:]),
        "codebook_size": vae.latent.codebook_size,
        "split": args.split,
        "checkpoint": str(args.checkpoint),
        "usage": usage,
    }
    if images.labels is not None:
        record["labels"] = images.labels
    if args.draws is not None:
        record["draws"] = tokenize_images(
            vae, images.images, args.batch_size, args.draws, args.seed
        )
    torch.save(record, args.out)
    grid = " x ".join(map(str, tokens.shape[1:]))
    drawn = "" if args.draws is None else f" (and {args.draws} posterior draws of each)"
    print(
        f"wrote {args.out}: {tokens.shape[0]} images as {grid} tokens{drawn} from a codebook "
        f"of {usage['codebook_size']}; code-usage perplexity {usage['perplexity']:.1f}, "
        f"{usage['unused']} codes never used"
    )


def decode(vae, args: argparse.Namespace) -> None:
    record = load_tokens(args.decode)
    if record["codebook_size"] != vae.latent.codebook_size:
        raise DataError(
            f"{args.decode} has tokens from a codebook of {record['codebook_size']}, but the "
            f"model's codebook has {vae.latent.codebook_size}"
        )
    tokens = record["tokens"][: args.count]
    with torch.no_grad():
        images = vae.detokenize(tokens)
    title = f"decoded from {tokens.shape[0]} token {'grids' if tokens.dim() == 3 else 'rows'}"
    plots.save(plots.image_grid(images, title), args.out)
    print(f"wrote {args.out}: {tokens.shape[0]} images decoded from {args.decode}")


def load_tokens(path: Path) -> dict:
    """A token file written by this command, checked to be one."""
    if not path.is_file():
        raise DataError(f"token file {path} does not exist")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # zip, pickle and EOF errors all mean "not a token file"
        raise DataError(f"{path} is not a readable token file") from None
    if not isinstance(record, dict) or record.get("format") != TOKENS_FORMAT:
        raise DataError(f"{path} is a torch file but not a token file of pyro-vae tokenize")
    return record


def run(argv: list[str] | None = None, prog: str = f"pyro-vae {COMMAND}") -> int:
    """``pyro-vae tokenize`` with ``argv`` (default: the command line); the exit status."""
    return run_main(main, parser(prog), argv)
