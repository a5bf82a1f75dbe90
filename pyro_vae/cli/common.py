"""What the commands share: one-line errors, option groups, the run folder and its
``config.json``, the :class:`~pyro_vae.run.Run` built from options, and the one policy
for Ctrl-C.

Everything that turns command-line options into the library's objects lives here, so
that the commands agree: ``fit`` and ``fit-ssvae`` build their ``Run`` with
:func:`run_from_args`, guard their run folder with :func:`run_checkpoint`, write
``config.json`` with :func:`write_run_config` (and read it back for ``--config`` with
:func:`parse_args`), and train inside :func:`train_or_interrupt`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from pyro_vae.checkpoint import load_checkpoint, load_vae
from pyro_vae.data import ImageFolder, load_mnist, split_folder, stack_dataset
from pyro_vae.devices import resolve_device
from pyro_vae.errors import (
    CheckpointError,
    DataError,
    ProcessLostError,
    TrainingDivergedError,
    UsageError,
)
from pyro_vae.history import History
from pyro_vae.prior import load_prior
from pyro_vae.run import LR_SCHEDULES, PRECISIONS, Run

#: mistakes a user can make; the commands report them in one line, without a traceback.
#: Only pyro_vae's own types: a plain ValueError or OSError is a bug to be seen whole.
USER_ERRORS = (DataError, CheckpointError, TrainingDivergedError, UsageError)

#: the exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


# ---------------------------------------------------------------- parsing and errors
def run_main(
    main: Callable[[argparse.Namespace], None],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    command: str | None = None,
) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run ``main``; return the exit status.

    User mistakes (:data:`USER_ERRORS`), in the options or found during the work, become
    one ``<prog>: error: ...`` line on stderr and status 2, like argparse's own errors; a
    process of a multi-process run that was lost (:class:`ProcessLostError`) one line and
    status 1.

    :param command: the command's name in ``config.json`` (``"fit"``, ``"fit-ssvae"``)
        for the commands that take ``--config`` (see :func:`parse_args`).
    """
    try:
        args = parse_args(parser, argv, command)
        main(args)
    except USER_ERRORS as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except ProcessLostError as error:  # not the user's mistake, but no traceback helps
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    return 0


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, command: str | None = None
) -> argparse.Namespace:
    """Parse ``argv``; with ``--config PATH``, a run folder's ``config.json`` supplies the
    defaults and the options on the command line override them.

    The config's ``args`` (every option of the run it describes) become the parser's
    defaults and ``argv`` is parsed again, so ``--config runs/x/config.json --epochs 20``
    is run x's command with 20 epochs. Two options are never taken from a config:
    ``--resume`` (a replay starts a new run unless the command line says ``--resume``)
    and ``--config`` itself. ``--out`` is the one on the command line if given, else the
    config's; the latter holds run x already, so it takes ``--resume`` to continue it
    (:func:`run_checkpoint` says so), and ``args.out_from_config`` records the case.
    """
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    saved = read_run_config(args.config, command)
    skipped = ("config", "resume", "out", "out_from_config")
    options = {k: v for k, v in saved["args"].items() if k not in skipped}
    known = set(vars(args))  # every option's destination, given or not
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(
            f"--config {args.config}: options this version of {command} does not know: "
            f'{", ".join(unknown)}; remove them from the file\'s "args"'
        )
    not_given = object()  # tells an --out on the command line from none
    parser.set_defaults(**options, out=not_given)
    args = parser.parse_args(argv)
    args.out_from_config = args.out is not_given
    if args.out_from_config:
        out = saved["args"].get("out")
        args.out = None if out is None else Path(out)
    return args


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    """``--config PATH``: replay a run from its folder's ``config.json`` (:func:`parse_args`)."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="replay a run: take every option from this run folder's config.json; options "
        "given here override it. The run goes to --out if given, else to the config's "
        "folder (which then needs --resume)",
    )
    parser.set_defaults(out_from_config=False)  # set by parse_args for a replay


def read_run_config(path: Path, command: str | None = None) -> dict:
    """The ``config.json`` of a run folder, checked to be one (of ``command``, if given).

    It is a JSON object with ``"model"`` (the model's config), ``"run"``
    (:meth:`Run.to_dict`), ``"args"`` (every option of the command) and ``"command"``;
    folders written before ``"run"`` and ``"command"`` existed are read too.
    """
    what = f"--config {path}"
    if not path.is_file():
        raise UsageError(f"{what}: no such file (give a run folder's config.json)")
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"{what} is not JSON, so not a run folder's config.json") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("args"), dict):
        raise UsageError(
            f'{what} is not the config.json of a pyro-vae run (it has no "args" object)'
        )
    if "model" not in saved:
        raise UsageError(f'{what} is not the config.json of a pyro-vae run (it has no "model")')
    saved_command = saved.get("command")
    if command is not None and saved_command not in (None, command):
        raise UsageError(
            f"{what} is the config of a '{saved_command}' run; replay it with "
            f"pyro-vae {saved_command} --config {path}"
        )
    return saved


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """Raise :class:`UsageError` naming the first of the integer options ``names`` (as
    attribute names, e.g. ``"batch_size"``) that was given a value below 1. Options left
    at None (not given, no default) pass."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"{option(name)} must be positive, got {value}")


def require_finite_positive(args: argparse.Namespace, *names: str) -> None:
    """Raise :class:`UsageError` naming the first of the float options ``names`` that is
    not a finite number above 0: argparse's ``float`` reads "nan" and "inf" too, and
    they would otherwise fail deep inside the library (a learning rate, a scale)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{option(name)} must be a finite number > 0, got {value}")


def option(name: str) -> str:
    """The option of attribute ``name``: ``"batch_size"`` is ``--batch-size``."""
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------- output paths
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


def check_figure_path(path: Path, what: str) -> None:
    """Refuse, before any work, an ``--out`` for one figure that is a folder or whose suffix
    matplotlib cannot write, naming a fix; then make its folder (:func:`make_out_dir`).

    :param what: what the command writes there, for the message (e.g. "one figure").
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


# ---------------------------------------------------------------- run folders
def run_checkpoint(out: Path, resume: bool, out_from_config: bool = False) -> Path:
    """The checkpoint of run folder ``out``, after refusing a folder that holds a run
    without ``--resume`` (it would be overwritten) and a ``--resume`` with nothing to
    resume.

    :param out_from_config: ``out`` came from ``--config`` (:func:`parse_args`); the
        message then says how a replay picks its folder.
    """
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and not resume:
        hint = (
            " (a replay with --config writes to the config's run folder unless you give --out)"
            if out_from_config
            else ""
        )
        raise CheckpointError(
            f"{out} already holds a run; pass --resume to continue it, or choose another "
            f"--out{hint}"
        )
    if resume and not checkpoint.exists():
        raise CheckpointError(f"--resume: there is no checkpoint at {checkpoint}")
    return checkpoint


def write_run_config(
    out: Path, command: str, model: dict, run: Run, args: argparse.Namespace
) -> None:
    """Make the run folder and, from the first process only, write ``config.json``.

    It holds ``command`` (the command that made the run, e.g. "fit"), ``model`` (the
    model's config as a dict), ``run`` (:meth:`Run.to_dict`) and ``args`` (every option,
    ``--out`` as resolved), and, for a replay, ``replayed_from`` (the ``--config`` file).
    ``args`` is what ``--config`` reads back, so the file replays the run.
    """
    make_out_dir(out)
    if not is_first_process():  # the other processes of a data-parallel run write nothing
        return
    options = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in vars(args).items()
        if key != "config" and not key.startswith("_")
    }
    record = {"command": command, "model": model, "run": run.to_dict(), "args": options}
    if getattr(args, "config", None) is not None:
        record["replayed_from"] = str(args.config)
    (out / "config.json").write_text(json.dumps(record, indent=2))


def is_first_process() -> bool:
    """False in the processes that a launcher (torchrun, Lightning Fabric, SLURM) started
    besides the first: before training, only the first should write the run folder."""
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


# ---------------------------------------------------------------- data options
def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--dataset mnist|folder``, ``--data-dir`` and the image folder's options."""
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


# ---------------------------------------------------------------- devices and the Run
def add_device_arg(parser, prefix: str = "") -> None:
    """``--device``: auto (CUDA when a GPU is there, else the CPU), cpu, cuda or cuda:N;
    :func:`pyro_vae.devices.resolve_device` reads it and names a bad value."""
    parser.add_argument("--device", default="auto", help=f"{prefix}auto, cpu, cuda or cuda:N")


def add_checkpoint_args(parser) -> None:
    """``--checkpoint`` (a fitted VAE) and ``--prior`` (a fit-prior run's checkpoint, for a
    discrete VAE): what the commands that read a fitted model take."""
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint.pt of a fitted VAE"
    )
    parser.add_argument(
        "--prior",
        type=Path,
        help="a discrete VAE's learned token prior (a fit-prior run's checkpoint.pt): the "
        "model becomes the VAE with that prior in place of the uniform one; the outputs go "
        "beside the prior by default",
    )


def load_model(args: argparse.Namespace, device):
    """The VAE of ``--checkpoint`` on ``device``, with the token prior of ``--prior`` at its
    latent site when one is given (:meth:`pyro_vae.VAE.with_prior`)."""
    vae = load_vae(args.checkpoint, map_location=device)
    if getattr(args, "prior", None) is None:
        return vae
    return vae.with_prior(load_prior(args.prior, map_location=device))


def default_out(args: argparse.Namespace) -> Path:
    """Where a reading command writes by default: beside ``--prior`` if given (so the
    VAE's own results are not overwritten), else beside ``--checkpoint``."""
    return (args.prior or args.checkpoint).parent


def add_loop_args(group, epochs: int, lr: float = 1e-3) -> None:
    """The training loop's options that a :class:`Run` holds: ``--epochs``, ``--lr``,
    ``--lr-schedule`` and ``--seed`` (the defaults of ``epochs`` differ per command)."""
    group.add_argument("--epochs", type=int, default=epochs)
    group.add_argument("--lr", type=float, default=lr, help="Adam's learning rate")
    group.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default="constant",
        help="constant, or cosine: half a cosine from --lr to 0 over the run's steps",
    )
    group.add_argument("--seed", type=int, default=0)


def add_run_folder_args(parser: argparse.ArgumentParser, train, default_out: str) -> None:
    """What a training command that writes a run folder ends with: ``--limit``,
    ``--test-limit`` and ``--no-progress`` in its ``train`` group, the data options, the
    devices and logging options, and the output folder (``--out``, ``--resume``)."""
    train.add_argument("--limit", type=int, help="train on the first N images only")
    train.add_argument("--test-limit", type=int, help="evaluate on the first N test images only")
    train.add_argument(
        "--no-progress", action="store_true", help="no progress bars (a line per epoch instead)"
    )
    add_data_args(parser)
    add_engine_args(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, help=f"run folder (default {default_out})")
    out.add_argument("--resume", action="store_true", help="continue the run in --out")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Where and how training runs (Lightning Fabric's options) and what it logs."""
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


def run_from_args(args: argparse.Namespace, out: Path) -> Run:
    """The :class:`Run` of the options of :func:`add_loop_args` and :func:`add_engine_args`
    (with ``--no-progress``, ``--resume`` and, where the command has it, ``--compile``),
    writing its checkpoint and logs in run folder ``out``.

    ``--device`` is shorthand for ``--accelerator`` (``cuda:1`` names the device too); the
    two may not disagree. The CSV logger is always on, TensorBoard on request.
    """
    require_finite_positive(args, "lr")
    accelerator = args.accelerator
    if args.device != "auto":
        device = resolve_device(args.device)  # names an unknown or absent device
        if args.accelerator not in ("auto", device.type):
            raise UsageError(
                f"--device {args.device} and --accelerator {args.accelerator} disagree; "
                "--device is shorthand for --accelerator, give one of them"
            )
        accelerator = args.device
    devices: int | str = args.devices
    try:
        devices = int(devices)
    except ValueError:
        pass  # "auto", or a list such as "0,1" that Fabric parses
    return Run(
        epochs=args.epochs,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        seed=args.seed,
        accelerator=accelerator,
        devices=devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=args.precision,
        checkpoint=str(out / "checkpoint.pt"),
        resume=args.resume,
        loggers=("csv", *args.logger),
        log_dir=str(out / "logs"),
        progress=not args.no_progress,
        compile=getattr(args, "compile", False),
    )


def epoch_printer(args: argparse.Namespace) -> Callable | None:
    """The training functions' ``on_epoch`` for ``--no-progress``: without bars, a line per
    epoch still shows that a long run is alive."""
    if not args.no_progress:
        return None
    return lambda record: print(record.summary(args.epochs), flush=True)


# ---------------------------------------------------------------- Ctrl-C and divergence
def train_or_interrupt(train: Callable[[], History], run: Run) -> tuple[History, bool]:
    """Call ``train()`` and return its history and False; on Ctrl-C, the history of the
    epochs that finished (read back from the run's checkpoint) and True.

    This is the one policy of every training command: the library saves the checkpoint
    when Ctrl-C is pressed and raises ``KeyboardInterrupt``; the command then writes its
    ``history.csv`` and ``metrics.json`` for the finished epochs and ends with
    :func:`report_interrupt`. A run that diverged gets where its last good epoch is
    added to the message.
    """
    checkpoint = Path(run.checkpoint) if run.checkpoint is not None else None
    try:
        return train(), False
    except KeyboardInterrupt:
        saved = load_checkpoint(checkpoint) if checkpoint and checkpoint.exists() else {}
        device = str(resolve_device()) if run.accelerator == "auto" else run.accelerator
        rank = 0 if is_first_process() else 1  # only "the first or not" matters here
        return History.from_rows(saved.get("history", []), device=device, rank=rank), True
    except TrainingDivergedError as error:
        kept = (
            f"the last good epoch is in {checkpoint}"
            if checkpoint is not None and checkpoint.exists()
            else "no epoch finished"
        )
        error.args = (f"{error}; {kept}",)
        raise


def report_interrupt(run: Run, history: History) -> NoReturn:
    """Say, in one line on stderr, where an interrupted run was saved and how to go on,
    and exit with status 130 (the first process speaks; the others exit quietly)."""
    if history.rank == 0:
        checkpoint = Path(run.checkpoint) if run.checkpoint is not None else None
        if checkpoint is not None and checkpoint.exists():
            done = len(history.epochs)
            line = (
                f"interrupted: progress saved in {checkpoint}; continue with --resume "
                f"({done} finished epoch{'' if done == 1 else 's'} in history.csv and "
                "metrics.json)"
            )
        else:
            line = "interrupted before anything was saved; run the command again"
        print(f"\n{line}", file=sys.stderr, flush=True)
    raise SystemExit(INTERRUPTED)
