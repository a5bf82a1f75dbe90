"""Data: MNIST and image folders as 8-bit tensors, their preprocessing, and batching.

Images are kept as ``uint8`` ``(N, C, H, W)`` tensors until a batch is drawn; each batch
is then made into data for the likelihood (:func:`preprocess`): binarized with a fresh
Bernoulli draw (dynamic binarization, the usual protocol for MNIST log-likelihoods) or
uniformly dequantized, so a continuous density on it is a proper bound on the
probability of the 8-bit image. Held-out splits get one fixed, seeded draw instead.
"""

from __future__ import annotations

import copy
import gzip
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import DataError, UsageError

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: seed of the fixed binarization / dequantization of held-out splits.
TEST_SEED = 0


@dataclass(frozen=True)
class ImageSet:
    """8-bit images ``(N, C, H, W)`` and, where known, their integer labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def head(self, n: int | None) -> ImageSet:
        """The first ``n`` images (all of them for ``None``)."""
        if n is None:
            return self
        labels = None if self.labels is None else self.labels[:n]
        return ImageSet(self.images[:n], labels)


def default_data_dir() -> Path:
    """``$PYRO_VAE_DATA`` if set, else ``./data``: where MNIST is looked for and downloaded."""
    return Path(os.environ.get("PYRO_VAE_DATA", "data"))


# ---------------------------------------------------------------------------- MNIST
def load_mnist(
    root: str | Path | None = None, split: str = "train", download: bool = True
) -> ImageSet:
    """MNIST's ``split`` ("train" or "test") from ``root/MNIST/raw``.

    The IDX files are read as they are, gzipped or not, so a read-only copy works and
    nothing is written next to it. Missing files are downloaded by torchvision into
    ``root`` when ``download`` is true; offline, the error says where to put them.
    """
    if split not in MNIST_FILES:
        raise DataError(f"unknown MNIST split {split!r}; choose 'train' or 'test'")
    root = Path(root) if root is not None else default_data_dir()
    raw = root / "MNIST" / "raw"
    paths = [_find_idx(raw, name) for name in MNIST_FILES[split]]
    if None in paths and download:
        _download_mnist(root)
        paths = [_find_idx(raw, name) for name in MNIST_FILES[split]]
    if None in paths:
        missing = [n for n, p in zip(MNIST_FILES[split], paths, strict=True) if p is None]
        raise DataError(
            f"MNIST files missing: {', '.join(m + '.gz' for m in missing)} not found in {raw}; "
            "copy the four MNIST files there (or pass --data-dir to the folder above MNIST/)"
        )
    images = torch.from_numpy(read_idx(paths[0])).unsqueeze(1)
    labels = torch.from_numpy(read_idx(paths[1]).astype(np.int64))
    if images.shape[1:] != (1, 28, 28) or labels.shape != images.shape[:1]:
        raise DataError(f"{paths[0]} does not hold 28 x 28 MNIST images matching its labels")
    return ImageSet(images, labels)


def _find_idx(raw: Path, name: str) -> Path | None:
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _download_mnist(root: Path) -> None:
    from torchvision.datasets import MNIST

    try:
        MNIST(str(root), download=True)
    except Exception as error:  # torchvision raises URLError, RuntimeError, OSError...
        raise DataError(
            f"MNIST is not in {root / 'MNIST' / 'raw'} and could not be downloaded ({error}); "
            "offline, copy train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz into that folder"
        ) from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (LeCun's format for MNIST), gzipped or not, into a numpy array."""
    path = Path(path)
    # a cut-short download or a bad copy: say which file, and how to get a good one
    fix = "delete it so that it is downloaded again, or copy an intact one in its place"
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:  # truncated or corrupt gzip
        raise DataError(f"{path} is damaged ({error}); {fix}") from None
    except OSError as error:
        raise DataError(f"cannot read {path}: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes; {fix}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated inside its header; {fix}")
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {body.size} bytes; {fix}")
    return body.reshape(shape).copy()


# ---------------------------------------------------------------------------- folders
class ImageFolder(Dataset):
    """Every PNG/JPEG under ``root`` (searched recursively) as uint8 ``(C, H, W)`` tensors.

    :param grayscale: convert to one channel (else three, RGB).
    :param size: ``(height, width)`` to resize to; without it all images must share a size.
    """

    def __init__(
        self, root: str | Path, grayscale: bool = True, size: tuple[int, int] | None = None
    ):
        from PIL import Image

        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist or is not a folder")
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DataError(f"no PNG or JPEG images found under {root}")
        self.grayscale = grayscale
        self.size = tuple(size) if size is not None else None
        if self.size is None:
            sizes = {}
            for path in self.files:
                try:
                    with Image.open(path) as image:
                        sizes.setdefault(image.size, path)
                except OSError:
                    raise DataError(f"{path} is not a readable image") from None
                if len(sizes) > 1:
                    (w0, h0), first = next(iter(sizes.items()))
                    w1, h1 = image.size
                    raise DataError(
                        f"images differ in size: {first} is {h0}x{w0} but {path} is {h1}x{w1}; "
                        "pass a size (--image-size) to resize them"
                    )
            width, height = next(iter(sizes))
            self.size = (height, width)
        self.image_shape = (1 if grayscale else 3, *self.size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(self.files[index]) as image:
                image = image.convert("L" if self.grayscale else "RGB")
                if image.size != (self.size[1], self.size[0]):
                    image = image.resize((self.size[1], self.size[0]), Image.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except OSError:
            raise DataError(f"{self.files[index]} is not a readable image") from None
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(array.copy())


def split_folder(folder: ImageFolder, test_fraction: float = 0.1, seed: int = TEST_SEED):
    """Seeded (train, test) subsets of a folder; the test part is at least one image."""
    n = len(folder)
    n_test = max(1, int(round(n * test_fraction))) if n > 1 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return torch.utils.data.Subset(folder, order[n_test:]), torch.utils.data.Subset(
        folder, order[:n_test]
    )


def stack_dataset(dataset: Dataset, batch_size: int = 256, num_workers: int = 0) -> ImageSet:
    """Read a whole (small) dataset into one uint8 tensor, e.g. a held-out split."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    return ImageSet(torch.cat(list(loader)))


# ---------------------------------------------------------------------------- preprocessing
def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Bernoulli draw per pixel with probability = grey level in [0, 1]."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (noise < x).to(x.dtype)


def dequantize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """8-bit levels k -> (k + u) / 256 with u ~ U[0, 1): a continuous density on the
    result lower-bounds the probability of the 8-bit image (Theis et al., 2016)."""
    noise = torch.rand(images.shape, generator=generator, device=images.device)
    return (images.float() + noise) / 256.0


def preprocess(
    images: torch.Tensor, how: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Make likelihood data from a batch: uint8 images are binarized or dequantized
    (``how``); floating-point input is taken to be ready and passed through."""
    if images.is_floating_point():
        return images
    if images.dtype != torch.uint8:
        raise DataError(f"images must be uint8 (0..255) or floating point, got {images.dtype}")
    if how == "binarize":
        return binarize(images.float() / 255.0, generator)
    if how == "dequantize":
        return dequantize(images, generator)
    raise UsageError(f"unknown preprocessing {how!r}; choose 'binarize' or 'dequantize'")


def fixed_preprocess(images: torch.Tensor, how: str, seed: int = TEST_SEED) -> torch.Tensor:
    """:func:`preprocess` with one seeded draw: the fixed version of a held-out split."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    return preprocess(images, how, generator)


def check_shape(image_shape: tuple[int, ...], shape: tuple[int, ...], what: str) -> None:
    """Raise :class:`DataError` unless one data point of shape ``shape`` fits a model of
    data points ``image_shape`` (``(C, H, W)`` images or ``(D,)`` vectors)."""
    if tuple(shape) != tuple(image_shape):
        got, want = "x".join(map(str, shape)), "x".join(map(str, image_shape))
        kind = "images are {} (C x H x W)" if len(image_shape) == 3 else "vectors are {}"
        raise DataError(f"{what} {kind.format(got)} but the model expects {want}")


def check_tensor(image_shape: tuple[int, ...], data: torch.Tensor, what: str) -> None:
    """Raise :class:`DataError` unless ``data`` is a non-empty ``(N, *image_shape)`` tensor."""
    if not isinstance(data, torch.Tensor):
        raise DataError(f"{what} data must be a tensor or a Dataset, got {type(data).__name__}")
    dims = 1 + len(image_shape)
    if data.dim() != dims or data.shape[0] == 0:
        layout = "(N, C, H, W)" if dims == 4 else "(N, D)"
        raise DataError(f"{what} data must be a non-empty {layout} tensor, got {tuple(data.shape)}")
    check_shape(image_shape, data.shape[1:], what)


def held_out_data(
    images: torch.Tensor,
    image_shape: tuple[int, ...],
    likelihood,
    what: str = "held-out",
    seed: int = TEST_SEED,
) -> torch.Tensor:
    """Held-out data for ``likelihood`` (a :class:`~pyro_vae.likelihoods.Likelihood`):
    shape checked, uint8 images given one fixed, seeded preprocessing (the same every
    time), floating-point data passed as it is, then checked against the support."""
    check_tensor(image_shape, images, what)
    x = fixed_preprocess(images, likelihood.preprocessing, seed)
    likelihood.check_data(x)
    return x


@dataclass(frozen=True)
class HeldOut:
    """Held-out data made ready once (:func:`held_out_data`), with optional labels; each
    training process scores its own :meth:`shard` of it."""

    data: torch.Tensor
    labels: torch.Tensor | None = None

    @classmethod
    def of(
        cls, images: torch.Tensor, image_shape, likelihood, labels: torch.Tensor | None = None
    ) -> HeldOut:
        """Check and preprocess ``images`` (see :func:`held_out_data`) once, for good."""
        data = held_out_data(images, image_shape, likelihood, "test")
        if labels is not None and labels.shape != data.shape[:1]:
            raise DataError(f"need one label per held-out image, got {tuple(labels.shape)}")
        return cls(data, labels)

    def shard(self, rank: int, world: int, device: torch.device, dtype: torch.dtype) -> HeldOut:
        """Process ``rank``'s every ``world``-th data point, on ``device`` in ``dtype``."""
        labels = None if self.labels is None else self.labels[rank::world].to(device)
        return HeldOut(self.data[rank::world].to(device=device, dtype=dtype), labels)

    def __len__(self) -> int:
        return self.data.shape[0]


# ---------------------------------------------------------------------------- batching
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch``: a function of (seed, epoch) alone, so a run
    resumed mid-epoch sees the same order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


class Batches:
    """What the batch sources share: each epoch's shuffled order, the shard of it that
    one process trains on, and making each batch ready for the likelihood.

    A source is built once, on the CPU and unsharded; :meth:`prepare` gives each
    training process its own copy, sharded, on its device and in its dtype, which the
    loop only iterates (``len``, :meth:`epoch`).

    With ``world`` processes (data-parallel training), the order of an epoch is padded by
    wrapping around to a multiple of ``world`` and process ``rank`` takes every
    ``world``-th index from ``rank`` on: the shards are disjoint (but for the padding),
    cover the data set, and hold the same number of batches, as every process must take
    the same number of steps.

    :param preprocessing: "binarize" or "dequantize" for uint8 images (see
        :func:`preprocess`); floating-point batches pass as they are.
    :param dtype: the dtype batches are cast to (the model's).
    :param check: called on each floating-point batch, e.g. a likelihood's ``check_data``.
    """

    def __init__(
        self,
        num_data: int,
        batch_size: int,
        seed: int,
        preprocessing: str | None,
        dtype: torch.dtype | None,
        check: Callable[[torch.Tensor], None] | None,
    ):
        self.num_data = num_data
        self.batch_size = batch_size
        self.seed = seed
        self.preprocessing = preprocessing
        self.dtype = dtype
        self.check = check
        self.rank, self.world = 0, 1
        self.on_bad_data: Callable[[DataError, torch.Tensor], torch.Tensor] | None = None

    def prepare(
        self,
        rank: int,
        world: int,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        on_bad_data: Callable[[DataError, torch.Tensor], torch.Tensor] | None = None,
    ):
        """This source as process ``rank`` of ``world`` trains on it: its shard, delivered
        on ``device`` in ``dtype`` (None: as stored). The source itself is unchanged.

        :param on_bad_data: where several processes train, called with the DataError of a
            batch that fails ``check`` and the batch; it returns a stand-in batch, since
            the other processes must not be left waiting (see :mod:`pyro_vae.divergence`).
            Without it the error is raised.
        """
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of {world} processes")
        prepared = copy.copy(self)
        prepared.rank, prepared.world, prepared.on_bad_data = rank, world, on_bad_data
        prepared.dtype = dtype if dtype is not None else self.dtype
        prepared.place(torch.device(device))
        return prepared

    def place(self, device: torch.device) -> None:
        """Deliver batches on ``device`` (called by :meth:`prepare` on its copy)."""
        raise NotImplementedError

    @property
    def shard_size(self) -> int:
        """Data points this process sees per epoch."""
        return -(-self.num_data // self.world)

    def __len__(self) -> int:
        return -(-self.shard_size // self.batch_size)

    def _order(self, epoch: int) -> torch.Tensor:
        order = epoch_permutation(self.num_data, self.seed, epoch)
        if self.world == 1:
            return order
        padded = order.repeat(-(-self.shard_size * self.world // self.num_data))
        return padded[: self.shard_size * self.world][self.rank :: self.world]

    def _ready(self, batch: torch.Tensor) -> torch.Tensor:
        floating = batch.is_floating_point()
        if self.preprocessing is not None:
            batch = preprocess(batch, self.preprocessing)
        if self.dtype is not None and batch.dtype != self.dtype:
            batch = batch.to(self.dtype)
        if floating and self.check is not None:
            try:
                self.check(batch)
            except DataError as error:
                if self.on_bad_data is None:
                    raise
                return self.on_bad_data(error, batch)
        return batch


class TensorBatches(Batches):
    """Mini-batches of an in-memory image tensor that lives on the training device.

    The whole data set is moved once (by :meth:`prepare`); a batch is an index into it.
    This avoids the per-batch collation of a ``DataLoader``, the slow path for data that
    fits in memory. Floating-point data is checked (``check``) once, as a whole, not per
    batch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        preprocessing: str | None = None,
        dtype: torch.dtype | None = None,
        check: Callable[[torch.Tensor], None] | None = None,
    ):
        super().__init__(images.shape[0], batch_size, seed, preprocessing, dtype, None)
        if images.is_floating_point() and check is not None:
            check(images)
        self.images = images

    def place(self, device: torch.device) -> None:
        self.images = self.images.to(device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """The ready batches of ``epoch`` from batch number ``start`` on."""
        order = self._order(epoch).to(self.images.device)
        for i in range(start, len(self)):
            yield self._ready(self.images[order[i * self.batch_size : (i + 1) * self.batch_size]])


class LoaderBatches(Batches):
    """Mini-batches streamed from a ``Dataset`` through a ``DataLoader`` with workers,
    for image collections too large to hold in memory. Items may be images or tuples
    whose first element is the image, such as ``(image, label)``. Floating-point batches
    are checked (``check``) as they arrive."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        num_workers: int = 2,
        preprocessing: str | None = None,
        dtype: torch.dtype | None = None,
        check: Callable[[torch.Tensor], None] | None = None,
    ):
        super().__init__(len(dataset), batch_size, seed, preprocessing, dtype, check)
        self.dataset = dataset
        self.device = torch.device("cpu")
        self.num_workers = num_workers

    def place(self, device: torch.device) -> None:
        self.device = device

    def epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """The ready batches of ``epoch`` from batch number ``start`` on."""
        order = self._order(epoch)[start * self.batch_size :]
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=order.tolist(),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for batch in loader:
            if isinstance(batch, (tuple, list)):  # (image, label, ...) items: the image
                batch = batch[0]
            yield self._ready(batch.to(self.device, non_blocking=True))


class PairedBatches:
    """The semi-supervised batch source: each step's batch of unlabelled images (from
    ``unlabelled``, a source above) paired with a random batch of the labelled images,
    preprocessed alike, as ``(x_unlabelled, x_labelled, labels)``.

    :param labelled: ``(L, ...)`` uint8 images (or ready floating-point data).
    :param labels: ``(L,)`` integer labels.
    :param batch_size: labelled images per step (all of them when there are fewer).
    """

    def __init__(
        self,
        unlabelled: Batches,
        labelled: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
    ):
        self.unlabelled = unlabelled
        self.labelled, self.labels = labelled, labels
        self.batch_size = batch_size
        self.num_data = unlabelled.num_data
        self.num_labelled = labelled.shape[0]

    def prepare(self, rank, world, device, dtype=None, on_bad_data=None) -> PairedBatches:
        """As :meth:`Batches.prepare`: the unlabelled shard, and the labelled images on
        ``device`` (every process draws its labelled batches from all of them)."""
        prepared = copy.copy(self)
        prepared.unlabelled = self.unlabelled.prepare(rank, world, device, dtype, on_bad_data)
        prepared.labelled = self.labelled.to(device)
        prepared.labels = self.labels.to(device)
        return prepared

    def __len__(self) -> int:
        return len(self.unlabelled)

    def epoch(self, epoch: int, start: int = 0):
        """``(x_unlabelled, x_labelled, labels)`` of each step of ``epoch`` from ``start``."""
        source = self.unlabelled
        for x_u in source.epoch(epoch, start):
            pick = torch.randperm(self.num_labelled, device=x_u.device)[: self.batch_size]
            x_l = preprocess(self.labelled[pick], source.preprocessing).to(x_u.dtype)
            yield x_u, x_l, self.labels[pick]
