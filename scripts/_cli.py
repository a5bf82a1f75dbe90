"""What the command-line scripts share: data options, device choice, one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pyro_vae.data import ImageFolder, load_mnist, split_folder, stack_dataset
from pyro_vae.errors import CheckpointError, DataError, TrainingDivergedError, UsageError

#: mistakes a user can make; the scripts report them in one line, without a traceback.
#: Only pyro_vae's own types: a plain ValueError or OSError is a bug to be seen whole.
USER_ERRORS = (DataError, CheckpointError, TrainingDivergedError, UsageError)


def run_main(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> int:
    """Parse arguments and run ``main``; user mistakes become one ``error:`` line and exit 2."""
    args = parser.parse_args()
    try:
        main(args)
    except USER_ERRORS as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """Raise :class:`UsageError` naming the first of the integer options ``names`` (as
    attribute names, e.g. ``"batch_size"``) that was given a value below 1. Options left
    at None (not given, no default) pass."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")


def check_figure_path(path: Path, what: str) -> None:
    """Refuse, before any work, an ``--out`` for one figure that is a folder or whose suffix
    matplotlib cannot write, naming a fix; then make its folder (:func:`make_out_dir`).

    :param what: what the script writes there, for the message (e.g. "one figure").
    """
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; this writes {what}: name the file, "
                         f"e.g. --out {path / 'figure.png'}")  # fmt: skip
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix and suffix not in formats:  # no suffix: matplotlib writes a .png
        raise UsageError(
            f"--out {path}: this writes {what}; end the name with one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    make_out_dir(path.parent)


def run_checkpoint(out: Path, resume: bool) -> Path:
    """The checkpoint of run folder ``out``, after refusing a folder that holds a run
    without ``--resume`` (it would be overwritten) and a ``--resume`` with nothing to
    resume."""
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and not resume:
        raise CheckpointError(
            f"{out} already holds a run; pass --resume to continue it, or choose another --out"
        )
    if resume and not checkpoint.exists():
        raise CheckpointError(f"--resume: there is no checkpoint at {checkpoint}")
    return checkpoint


def write_run_config(out: Path, config, args: argparse.Namespace) -> None:
    """Make the run folder and, from the first process only, write ``config.json``: the
    model's config and every option of the command."""
    make_out_dir(out)
    if is_first_process():  # the other processes of a data-parallel run write nothing
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        text = json.dumps({"model": config.to_dict(), "args": options}, indent=2)
        (out / "config.json").write_text(text)


def epoch_printer(args: argparse.Namespace) -> Callable | None:
    """The training functions' ``on_epoch`` for ``--no-progress``: without bars, a line per
    epoch still shows that a long run is alive."""
    if not args.no_progress:
        return None
    return lambda record: print(record.summary(args.epochs), flush=True)


def make_out_dir(path: Path, option: str = "--out") -> Path:
    """Create the output folder ``path`` (and its parents) if needed, and return it.

    Call it before writing anything: a folder that cannot be made or written to (a file
    in the way, no permission, a read-only disk) raises :class:`UsageError` naming the
    path and what to do, which :func:`run_main` prints as one line, instead of an
    ``OSError`` traceback halfway through a run.

    :param option: the command-line option that chose ``path``, named in the message.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise UsageError(
            f"{option} {path}: cannot create the folder, {blocker} is a file; "
            f"choose another {option} or move that file away"
        ) from None
    except OSError as error:
        raise UsageError(
            f"{option} {path}: cannot create the folder ({error.strerror or error}); "
            f"choose another {option} where you can write"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(
            f"{option} {path}: the folder is not writable (permission denied); "
            f"choose another {option} where you can write"
        )
    return path


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=["mnist", "folder"], default="mnist")
    group.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="MNIST: the folder holding MNIST/raw/ (default $PYRO_VAE_DATA or ./data; "
        "downloaded there when missing). folder: the folder of PNG/JPEG images.",
    )
    group.add_argument("--rgb", action="store_true", help="folder: keep colour (default greyscale)")
    group.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        metavar="N",
        help="folder: resize to N x N (or H W); needed when image sizes differ",
    )
    group.add_argument("--num-workers", type=int, default=2, help="folder: DataLoader workers")


def load_data(args: argparse.Namespace):
    """(train, test) for the chosen data set: uint8 ImageSets for MNIST; for a folder, a
    streamed training Dataset and an in-memory held-out ImageSet (10% of the images)."""
    if args.num_workers < 0:
        raise UsageError(
            f"--num-workers must be 0 (no worker processes) or more, got {args.num_workers}"
        )
    if args.dataset == "mnist":
        return load_mnist(args.data_dir, "train"), load_mnist(args.data_dir, "test")
    if args.data_dir is None:
        raise DataError("--dataset folder needs --data-dir PATH, the folder of images")
    size = None
    if args.image_size:
        if len(args.image_size) not in (1, 2) or min(args.image_size) < 1:
            given = " ".join(map(str, args.image_size))
            raise UsageError(f"--image-size takes N or H W, each at least 1; got {given}")
        size = (args.image_size[0], args.image_size[-1])
    folder = ImageFolder(args.data_dir, grayscale=not args.rgb, size=size)
    if len(folder) < 2:
        raise DataError(
            f"{args.data_dir} holds one image; a folder needs at least 2, since one in ten "
            "(at least one) is held out to test the model"
        )
    train, test = split_folder(folder)
    return train, stack_dataset(test)


def add_device_arg(parser, prefix: str = "") -> None:
    """``--device``: auto (CUDA when a GPU is there, else the CPU), cpu, cuda or cuda:N;
    :func:`pyro_vae.engine.resolve_device` reads it and names a bad value."""
    parser.add_argument("--device", default="auto", help=f"{prefix}auto, cpu, cuda or cuda:N")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Where and how training runs (Lightning Fabric's options) and what it logs."""
    from pyro_vae.engine import PRECISIONS

    group = parser.add_argument_group("devices and logging")
    add_device_arg(group, "shorthand for --accelerator: ")
    group.add_argument("--accelerator", default="auto", help="auto, cpu, cuda, ...")
    group.add_argument(
        "--devices", default="1", help="processes (devices) per node, e.g. 2, or -1 for all"
    )
    group.add_argument("--num-nodes", type=int, default=1, help="machines in the run")
    group.add_argument(
        "--strategy", default="auto", help="auto, ddp, ddp_spawn, ... (Lightning Fabric's)"
    )
    group.add_argument("--precision", choices=PRECISIONS, default="32-true")
    group.add_argument(
        "--logger",
        action="append",
        choices=["csv", "tensorboard"],
        default=[],
        help="also log to logs/ in the run folder; csv is always written, tensorboard on "
        "request (repeat the option for both)",
    )


def engine_kwargs(args: argparse.Namespace, out: Path) -> dict:
    """The training functions' device and logging arguments from :func:`add_engine_args`."""
    devices: int | str = args.devices
    try:
        devices = int(devices)
    except ValueError:
        pass  # "auto", or a list such as "0,1" that Fabric parses
    return {
        "device": None if args.device == "auto" else args.device,
        "accelerator": args.accelerator,
        "devices": devices,
        "num_nodes": args.num_nodes,
        "strategy": args.strategy,
        "precision": args.precision,
        "loggers": ["csv", *args.logger],
        "log_dir": out / "logs",
    }


def is_first_process() -> bool:
    """False in the processes that a launcher (torchrun, Lightning Fabric, SLURM) started
    besides the first: before training, only the first should write the run folder."""
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
