"""What the command-line scripts share: data options, device choice, one-line errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pyro_vae.data import ImageFolder, load_mnist, split_folder, stack_dataset
from pyro_vae.errors import CheckpointError, DataError, TrainingDivergedError

#: mistakes a user can make; the scripts report them in one line, without a traceback.
USER_ERRORS = (DataError, CheckpointError, TrainingDivergedError, ValueError, FileNotFoundError)


def run_main(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> int:
    """Parse arguments and run ``main``; user mistakes become one ``error:`` line and exit 2."""
    args = parser.parse_args()
    try:
        main(args)
    except USER_ERRORS as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


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
    if args.dataset == "mnist":
        return load_mnist(args.data_dir, "train"), load_mnist(args.data_dir, "test")
    if args.data_dir is None:
        raise DataError("--dataset folder needs --data-dir PATH, the folder of images")
    size = None
    if args.image_size:
        if len(args.image_size) not in (1, 2):
            raise ValueError("--image-size takes N or H W")
        size = (args.image_size[0], args.image_size[-1])
    folder = ImageFolder(args.data_dir, grayscale=not args.rgb, size=size)
    train, test = split_folder(folder)
    return train, stack_dataset(test)
