"""Fit a learned prior over a discrete VAE's tokens and write a run folder.

pyro-vae fit-prior --checkpoint runs/grid/checkpoint.pt --data-dir ../shared/data --out runs/prior
pyro-vae fit-prior --tokens train.pt --test-tokens test.pt --no-captions --out runs/prior-u

The second stage of the DALL-E recipe: a small causal transformer
(:class:`pyro_vae.prior.TokenPrior`) fitted by maximum likelihood to the codes that a
relaxed-categorical VAE gives the training images, conditioned on their class (a
"caption") where the data has labels. The run folder is ``fit``'s: ``config.json``,
``history.csv``, ``metrics.json``, ``checkpoint.pt`` (which ``--resume`` continues and
``pyro-vae generate --prior`` reads) and ``samples.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pyro
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pyro_vae import VAE, load_vae, plots
from pyro_vae.data import TEST_SEED, ImageSet, fixed_preprocess, split_folder
from pyro_vae.devices import resolve_device
from pyro_vae.errors import DataError, UsageError
from pyro_vae.history import EpochRecord, History
from pyro_vae.prior import (
    COMMAND_TEMPERATURE,
    TokenDraws,
    TokenPrior,
    TokenPriorConfig,
    fit_prior,
)
from pyro_vae.tokenizer import tokenize_images

from .common import (
    add_config_arg,
    add_loop_args,
    add_run_folder_args,
    epoch_printer,
    is_first_process,
    load_data,
    report_interrupt,
    require_positive,
    run_checkpoint,
    run_from_args,
    run_main,
    train_or_interrupt,
    write_run_config,
)
from .tokens import load_tokens

#: the command's name, in ``pyro-vae fit-prior`` and in the run folder's config.json.
COMMAND = "fit-prior"
SUMMARY = __doc__.splitlines()[0]

#: samples.png: images per class row of a conditional prior, at most this many rows, and
#: the images of an unconditional prior.
PER_ROW, MAX_ROWS, UNCONDITIONAL_SAMPLES = 10, 20, 64

#: posterior draws of each training image under ``--codes posterior``, by default.
DRAWS = 10
#: the seed of the held-out images' one posterior draw (apart from any training seed).
HELD_OUT_DRAW_SEED = 2_147_483_647


@dataclass(frozen=True)
class Classes:
    """The captions a data set offers: a name per class index, and where they come from."""

    names: list[str]
    source: str


@dataclass(frozen=True)
class TokenData:
    """Training and held-out tokens (``(N, *grid)``, one code grid or row per image, or
    for the training set ``(D, N, *grid)``, D posterior draws of each), their labels
    where the data has them, and why there are none otherwise."""

    train: torch.Tensor
    test: torch.Tensor
    vocab_size: int
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    classes: Classes | None = None
    #: why the data has no captions (for the message of ``--captions``).
    unlabelled: str = "the data has no labels"
    #: D when ``train`` holds D posterior draws of each image's codes, else None.
    draws: int | None = None

    @property
    def grid(self) -> tuple[int, ...]:
        """The shape of one image's codes."""
        return tuple(self.test.shape[1:])

    @property
    def length(self) -> int:
        """Tokens per image."""
        return math.prod(self.grid)

    @property
    def train_images(self) -> int:
        """Training images (each drawn ``draws`` times, if drawn)."""
        return int(self.train.shape[0 if self.draws is None else 1])

    @property
    def codes(self) -> str:
        """Which codes of each training image the prior is fitted to, in words."""
        if self.draws is None:
            return "the most likely codes"
        return f"{self.draws} draws from the posterior q(z | x)"

    def training_tokens(self) -> torch.Tensor | TokenDraws:
        """What :func:`fit_prior` takes."""
        return self.train if self.draws is None else TokenDraws(self.train)


def parser(prog: str = f"pyro-vae {COMMAND}") -> argparse.ArgumentParser:
    """The options of ``pyro-vae fit-prior`` (and of ``scripts/fit_prior.py``)."""
    p = argparse.ArgumentParser(prog=prog, description=SUMMARY)
    add_config_arg(p)
    source = p.add_argument_group("tokens")
    source.add_argument(
        "--checkpoint",
        type=Path,
        help="a relaxed-categorical VAE: it tokenizes the training and test images (with "
        "--tokens: it only decodes samples.png; default the token file's own checkpoint)",
    )
    source.add_argument("--tokens", type=Path, help="a token file of pyro-vae tokenize")
    source.add_argument(
        "--test-tokens",
        type=Path,
        help="--tokens: held-out tokens (default: a seeded tenth of --tokens is held out)",
    )
    source.add_argument(
        "--captions",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="condition on the class labels (MNIST digits, a folder's class subfolders, a "
        "token file's labels); default: when the data has labels",
    )
    source.add_argument(
        "--codes",
        choices=("posterior", "argmax"),
        default=None,
        help="fit the prior to draws of each image's codes from the VAE's posterior "
        "(the default: what improves the VAE's bound; with --tokens, the file's draws of "
        "pyro-vae tokenize --draws) or to the most likely codes (with --tokens, the "
        "default when the file holds no draws)",
    )
    source.add_argument(
        "--draws",
        type=int,
        default=None,
        help=f"--codes posterior: draws per training image (default {DRAWS}); the first "
        "epoch trains on the first draw, the second on the second, round the D",
    )
    source.add_argument(
        "--tokenize-batch-size", type=int, default=1000, help="images tokenized at once"
    )
    add_prior_args(p.add_argument_group("prior"))
    train = p.add_argument_group("training")
    add_loop_args(train, epochs=10)
    train.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    add_run_folder_args(p, train, "runs/prior")
    return p


def add_prior_args(group) -> None:
    """The transformer's size, each option a :class:`TokenPriorConfig` field."""
    group.add_argument("--layers", type=int, default=4, help="transformer blocks (n_layer)")
    group.add_argument("--heads", type=int, default=4, help="attention heads (n_head)")
    group.add_argument("--embd", type=int, default=128, help="residual width (n_embd)")
    group.add_argument("--dropout", type=float, default=0.0, help="dropout in training")


def main(args: argparse.Namespace) -> None:
    """Tokenize the data (or read token files), fit the prior the options describe and
    write its run folder (process 0 only).

    On Ctrl-C the checkpoint is saved, ``history.csv`` and ``metrics.json`` are written
    for the finished epochs (``samples.png`` is the last finished epoch's), and the
    command exits with status 130.
    """
    require_positive(
        args, "epochs", "batch_size", "limit", "test_limit", "tokenize_batch_size", "draws"
    )
    require_positive(args, "layers", "heads", "embd")
    if args.checkpoint is None and args.tokens is None:
        raise UsageError(
            "give --checkpoint (a relaxed-categorical VAE, which tokenizes the images) or "
            "--tokens (a token file of pyro-vae tokenize)"
        )
    if args.test_tokens is not None and args.tokens is None:
        raise UsageError("--test-tokens goes with --tokens (the training token file)")
    if args.draws is not None and (args.tokens is not None or args.codes == "argmax"):
        raise UsageError(
            "--draws goes with --codes posterior when fit-prior tokenizes (--checkpoint); a "
            "token file's draws are the ones pyro-vae tokenize --draws wrote"
        )
    args.out = out = args.out or Path("runs") / "prior"
    settings = run_from_args(args, out)
    run_checkpoint(out, args.resume, args.out_from_config)
    data, vae = load_token_data(args, training_device(args))
    config = prior_config(args, data)
    if vae is not None and args.tokens is not None:
        check_codes(vae, config, f"a prior of the tokens in {args.tokens}")
    write_run_config(out, COMMAND, config.to_dict(), settings, args)
    pyro.set_rng_seed(args.seed)  # before the prior: its initial weights are random
    prior = TokenPrior(config)
    test = data.test if data.test_labels is None else (data.test, data.test_labels)
    history, interrupted = train_or_interrupt(
        lambda: fit_prior(
            prior,
            data.training_tokens(),
            data.train_labels,
            test,
            batch_size=args.batch_size,
            on_epoch=epoch_reporter(args, out / "samples.png", prior, vae, data.classes),
            run=settings,
        ),
        settings,
    )
    if history.rank == 0:
        write_metrics(out, history, data, args, interrupted)
    if interrupted:
        report_interrupt(settings, history)
    if history.rank != 0:
        return
    picture = " samples.png" if vae is not None else ""
    print(f"wrote {out}/: config.json history.csv metrics.json checkpoint.pt{picture} logs/")
    if vae is None:
        print("no samples.png: give --checkpoint, the VAE of the tokens, to decode samples")


def epoch_reporter(
    args: argparse.Namespace,
    path: Path,
    prior: TokenPrior,
    vae: VAE | None,
    classes: Classes | None,
) -> Callable[[EpochRecord], None] | None:
    """``fit_prior``'s ``on_epoch``: the epoch's line under ``--no-progress``, and with a
    VAE to decode them, ``samples.png`` redrawn after every epoch (seeded, the same
    captions each time, so the pictures of successive epochs compare)."""
    printer = epoch_printer(args)

    def report(record: EpochRecord) -> None:
        if printer is not None:
            printer(record)
        if vae is not None:
            write_samples(path, prior, vae, classes, args.seed)

    return report if printer is not None or vae is not None else None


def prior_config(args: argparse.Namespace, data: TokenData) -> TokenPriorConfig:
    """The prior's config: the data's codebook and length, its classes when captioned,
    and the size options."""
    return TokenPriorConfig(
        vocab_size=data.vocab_size,
        length=data.length,
        num_classes=0 if data.classes is None else len(data.classes.names),
        n_layer=args.layers,
        n_head=args.heads,
        n_embd=args.embd,
        dropout=args.dropout,
    )


# ---------------------------------------------------------------- the discrete VAE
def training_device(args: argparse.Namespace) -> torch.device:
    """Where this process trains, so the VAE tokenizes there: ``--device``, else the
    accelerator's device (auto: a GPU when there is one); under a launcher, the GPU of
    this process (``LOCAL_RANK``)."""
    name = args.device if args.device != "auto" else args.accelerator
    if name == "cpu" or name.startswith("cuda:"):
        return resolve_device(name)
    device = resolve_device("cuda" if name in ("cuda", "gpu") else "auto")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def load_discrete_vae(path: Path, device: torch.device) -> VAE:
    """The relaxed-categorical VAE of checkpoint ``path`` on ``device``, in eval mode;
    a VAE of another latent is refused in one line (it has no tokens)."""
    vae = load_vae(path, device)
    if vae.config.latent != "relaxed-categorical":
        raise UsageError(
            f"{path} holds a VAE with latent {vae.config.latent!r}; a token prior needs the "
            "tokens of a VAE with latent 'relaxed-categorical' (pyro-vae fit --latent "
            "relaxed-categorical)"
        )
    return vae


def check_codes(vae: VAE, config: TokenPriorConfig, what: str) -> None:
    """Refuse a prior (``config``) and a VAE whose codes differ in number or codebook."""
    length, vocab = math.prod(vae.latent.code_shape), vae.latent.codebook_size
    if (config.length, config.vocab_size) != (length, vocab):
        raise UsageError(
            f"{what} models {config.length} tokens of {config.vocab_size} values, but the "
            f"VAE's codes are {length} of {vocab}; use the VAE whose tokens it was fitted on"
        )


def decode_tokens(vae: VAE, tokens: torch.Tensor) -> torch.Tensor:
    """The decoder's mean images of ``(N, L)`` token sequences (raster order for a grid)."""
    with torch.no_grad():
        return vae.detokenize(tokens.reshape(-1, *vae.latent.code_shape))


# ---------------------------------------------------------------- the tokens
def load_token_data(args: argparse.Namespace, device: torch.device) -> tuple[TokenData, VAE | None]:
    """The training and held-out tokens (with captions as ``--captions`` says) and the VAE
    that decodes them (None with ``--tokens`` and no readable checkpoint)."""
    if args.tokens is None:
        vae = load_discrete_vae(args.checkpoint, device)
        data = tokens_of_images(vae, args)
    else:
        data, recorded = tokens_of_files(args)
        path = args.checkpoint or recorded
        vae = None
        if path is not None and (args.checkpoint is not None or Path(path).is_file()):
            vae = load_discrete_vae(Path(path), device)
    if args.captions and data.classes is None:
        raise UsageError(f"--captions: {data.unlabelled}; fit an unconditional prior without it")
    if args.captions is False:
        data = replace(data, train_labels=None, test_labels=None, classes=None)
    if is_first_process():
        grid = " x ".join(map(str, data.grid))
        captions = "no captions" if data.classes is None else data.classes.source
        print(
            f"tokens: {data.train_images} training and {data.test.shape[0]} held-out images "
            f"as {grid} codes of {data.vocab_size} ({data.codes}); captions: {captions}",
            flush=True,
        )
    return data, vae


def tokens_of_images(vae: VAE, args: argparse.Namespace) -> TokenData:
    """Tokenize the training and held-out images of ``--dataset``, batched on the VAE's
    device, with their labels where the data has them."""
    train, train_labels, test, classes = labelled_images(args)
    batch = args.tokenize_batch_size
    draws = None if args.codes == "argmax" else args.draws or DRAWS
    if draws is None:
        held_out = tokenize_images(vae, test.images, batch)
    else:  # one draw of each held-out image, from the distribution the prior is fitted to
        held_out = tokenize_images(vae, test.images, batch, 1, HELD_OUT_DRAW_SEED)[0]
    return TokenData(
        train=tokenize_dataset(vae, train, batch, args.num_workers, draws, args.seed),
        test=held_out,
        draws=draws,
        vocab_size=vae.latent.codebook_size,
        train_labels=train_labels,
        test_labels=test.labels,
        classes=classes,
        unlabelled=f"the images of --data-dir {args.data_dir} are not sorted into class "
        "subfolders (one folder of images per class), so they have no labels",
    )


def labelled_images(
    args: argparse.Namespace,
) -> tuple[ImageSet | Dataset, torch.Tensor | None, ImageSet, Classes | None]:
    """``(train, train_labels, test, classes)``: the training images (an ImageSet, or a
    streamed Dataset for a folder) and their labels, the held-out ImageSet with its
    labels, and the :class:`Classes` (None without labels), cut to ``--limit`` and
    ``--test-limit`` where the command has them. MNIST's labels are its digits, a
    folder's the index of each image's class subfolder."""
    train, test = load_data(args)
    limit, test_limit = getattr(args, "limit", None), getattr(args, "test_limit", None)
    if isinstance(train, ImageSet):
        train = train.head(limit)
        classes = Classes([str(d) for d in range(10)], "MNIST digit labels")
        return train, train.labels, test.head(test_limit), classes
    found = folder_labels(train, Path(args.data_dir))
    if limit is not None:
        train = Subset(train, range(min(limit, len(train))))
    if found is None:
        return train, None, test.head(test_limit), None
    train_labels, test_labels, classes = found
    test = ImageSet(test.images, test_labels).head(test_limit)
    return train, train_labels[: len(train)], test, classes


def folder_labels(train: Subset, root: Path) -> tuple[torch.Tensor, torch.Tensor, Classes] | None:
    """The labels of a folder's training and held-out images (in :func:`split_folder`'s
    order) and its :class:`Classes`, when every image sits in a subfolder of ``root`` and
    there are two or more: the sorted subfolder names are the classes. None otherwise."""
    folder = train.dataset
    parts = [path.relative_to(root).parts for path in folder.files]
    if any(len(part) < 2 for part in parts):
        return None
    names = sorted({part[0] for part in parts})
    if len(names) < 2:
        return None
    index = {name: i for i, name in enumerate(names)}
    labels = torch.tensor([index[part[0]] for part in parts], dtype=torch.long)
    _, test = split_folder(folder)  # seeded: the split load_data made
    classes = Classes(names, f"the class subfolders of {root}")
    return labels[train.indices], labels[test.indices], classes


def tokenize_dataset(
    vae: VAE,
    images: ImageSet | Dataset,
    batch_size: int,
    num_workers: int,
    draws: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Tokens of an ImageSet, or of a streamed Dataset read ``batch_size`` images at a
    time: the most likely codes ``(N, *grid)`` (each streamed batch preprocessed with its
    own fixed seed, as held-out data is), or ``draws`` posterior draws ``(D, N, *grid)``
    (:func:`~pyro_vae.tokenizer.tokenize_images`)."""
    if isinstance(images, ImageSet):
        return tokenize_images(vae, images.images, batch_size, draws, seed)
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers)
    how = vae.likelihood.preprocessing
    if draws is None:
        return torch.cat([
            tokenize_images(vae, fixed_preprocess(batch, how, seed=TEST_SEED + i), batch_size)
            for i, batch in enumerate(loader)
        ])  # fmt: skip
    # a streamed batch is uint8 or ready data; tokenize_images preprocesses each draw
    return torch.cat([
        tokenize_images(vae, batch, batch_size, draws, seed + i * draws)
        for i, batch in enumerate(loader)
    ], dim=1)  # fmt: skip


def tokens_of_files(args: argparse.Namespace) -> tuple[TokenData, str | None]:
    """The tokens of ``--tokens`` (and ``--test-tokens``, else a seeded tenth held out),
    with their labels when both parts have them, cut to the limits; and the checkpoint
    that the token file says made them."""
    record = load_tokens(args.tokens)
    drawn = (args.codes or ("posterior" if "draws" in record else "argmax")) == "posterior"
    if drawn and "draws" not in record:
        raise UsageError(
            f"--codes posterior: {args.tokens} holds no posterior draws; write it with "
            "pyro-vae tokenize --draws D"
        )
    tokens, labels = record["draws" if drawn else "tokens"], record.get("labels")
    if args.test_tokens is not None:
        held = load_tokens(args.test_tokens)
        if (held["codebook_size"], list(held["shape"])) != (
            record["codebook_size"],
            list(record["shape"]),
        ):
            raise DataError(
                f"{args.test_tokens} holds {held['shape']} codes of {held['codebook_size']}, "
                f"but {args.tokens} holds {record['shape']} codes of {record['codebook_size']}"
            )
        if drawn and "draws" not in held:
            raise UsageError(
                f"{args.tokens} holds posterior draws but {args.test_tokens} does not; write "
                "both with pyro-vae tokenize --draws D, or fit --codes argmax"
            )
        test, test_labels = held["draws"][0] if drawn else held["tokens"], held.get("labels")
    else:
        tokens, labels, test, test_labels = hold_out(tokens, labels, args.tokens, drawn)
    if labels is None or test_labels is None:
        labels = test_labels = None
    tokens = tokens[:, : args.limit] if drawn else tokens[: args.limit]
    test = test[: args.test_limit]
    classes = None
    if labels is not None:
        labels, test_labels = labels[: args.limit].long(), test_labels[: args.test_limit].long()
        count = int(max(labels.max(), test_labels.max())) + 1
        classes = Classes([str(c) for c in range(count)], f"the labels of {args.tokens}")
    data = TokenData(
        tokens, test, int(record["codebook_size"]), labels, test_labels, classes,
        unlabelled=f"token file {args.tokens} (or its held-out part) has no labels",
        draws=tokens.shape[0] if drawn else None,
    )  # fmt: skip
    return data, record.get("checkpoint")


def hold_out(
    tokens: torch.Tensor, labels: torch.Tensor | None, path: Path, drawn: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``(tokens, labels, test, test_labels)``: a seeded tenth (at least one) of one token
    file's images held out, as a folder of images is split. With ``drawn``, ``tokens`` are
    ``(D, N, ...)`` posterior draws: the training part keeps every draw of its images, the
    held-out part the first draw of its own."""
    n = tokens.shape[1 if drawn else 0]
    if n < 2:
        raise DataError(f"{path} holds {n} token grid(s); holding a tenth out needs at least 2")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(TEST_SEED))
    test, train = order[: max(1, round(n / 10))], order[max(1, round(n / 10)) :]
    train_tokens, test_tokens = (
        (tokens[:, train], tokens[0, test]) if drawn else (tokens[train], tokens[test])
    )
    if labels is None:
        return train_tokens, None, test_tokens, None
    return train_tokens, labels[train], test_tokens, labels[test]


# ---------------------------------------------------------------- the run folder
def write_metrics(
    out: Path, history: History, data: TokenData, args: argparse.Namespace, interrupted: bool
) -> None:
    """``history.csv`` (one row per epoch: the training loss in nats per image, and bits
    per token of the training and held-out sets) and ``metrics.json`` (the last epoch's
    figures, the data's and the run's)."""
    per_token = data.length * math.log(2)
    rows = [
        {**row, "train_bits_per_token": row["train_loss"] / per_token} for row in history.to_rows()
    ]
    History.from_rows(rows).write_csv(out / "history.csv")
    final = rows[-1] if rows else {}
    metrics = {
        "test_nats": final.get("test_nats"),
        "test_bits_per_token": final.get("test_bits_per_token"),
        "train_nats": final.get("train_loss"),
        "train_bits_per_token": final.get("train_bits_per_token"),
        "unit": "nats per image (all its tokens), bits per token",
        "uniform_bits_per_token": math.log2(data.vocab_size),
        "tokens": {
            "grid": list(data.grid),
            "vocab_size": data.vocab_size,
            "train_images": data.train_images,
            "test_images": int(data.test.shape[0]),
            "source": str(args.tokens or args.checkpoint),
            "codes": data.codes,
        },
        "captions": None
        if data.classes is None
        else {"classes": data.classes.names, "source": data.classes.source},
        "epochs": final.get("epoch", 0),
        "train_seconds": sum(r["seconds"] for r in rows),
        "interrupted": interrupted,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def write_samples(
    path: Path, prior: TokenPrior, vae: VAE, classes: Classes | None, seed: int
) -> None:
    """A grid of images decoded from prior samples: a row per class of a conditional prior
    (the first :data:`MAX_ROWS`), or :data:`UNCONDITIONAL_SAMPLES` images."""
    # the prior may be on its training device, the VAE on another (or back on the CPU)
    device = next(prior.parameters()).device
    cuda = {d for d in (device, next(vae.parameters()).device) if d.type == "cuda"}
    training = prior.training
    # drawn with their own seed, leaving the training's random state as it was
    with torch.random.fork_rng(devices=sorted(d.index or 0 for d in cuda)):
        torch.manual_seed(seed)
        prior.eval()
        with torch.no_grad():
            if prior.config.conditional:
                rows = min(prior.config.num_classes, MAX_ROWS)
                captions = torch.arange(rows, device=device).repeat_interleave(PER_ROW)
                tokens = prior.sample(captions=captions, temperature=COMMAND_TEMPERATURE)
                images = decode_tokens(vae, tokens)
                names = ", ".join(classes.names[:rows]) if classes is not None else ""
                title = (
                    f"decoded prior samples (temperature {COMMAND_TEMPERATURE}), "
                    f"a row per class: {names}"
                )
                figure = plots.image_grid(images, title, ncol=PER_ROW)
            else:
                tokens = prior.sample(UNCONDITIONAL_SAMPLES, temperature=COMMAND_TEMPERATURE)
                title = f"decoded samples of the token prior (temperature {COMMAND_TEMPERATURE})"
                figure = plots.image_grid(decode_tokens(vae, tokens), title)
        prior.train(training)
    plots.save(figure, path)


def run(argv: list[str] | None = None, prog: str = f"pyro-vae {COMMAND}") -> int:
    """``pyro-vae fit-prior`` with ``argv`` (default: the command line); the exit status."""
    return run_main(main, parser(prog), argv, COMMAND)
