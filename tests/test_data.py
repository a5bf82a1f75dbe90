"""MNIST reading, preprocessing, batching and image folders."""

import gzip

import pytest
import torch
from PIL import Image

from pyro_vae.data import (
    ImageFolder,
    TensorBatches,
    binarize,
    dequantize,
    fixed_preprocess,
    load_mnist,
    preprocess,
    read_idx,
    split_folder,
)
from pyro_vae.errors import DataError


def test_mnist_is_read_from_the_raw_files(mnist_train, mnist_test):
    assert mnist_train.images.shape == (60000, 1, 28, 28)
    assert mnist_test.images.shape == (10000, 1, 28, 28)
    assert mnist_train.images.dtype == torch.uint8
    assert mnist_train.images.max() == 255
    assert sorted(mnist_test.labels.unique().tolist()) == list(range(10))
    # the first training digit of MNIST is a 5, the first test digit a 7
    assert (mnist_train.labels[0].item(), mnist_test.labels[0].item()) == (5, 7)


def test_missing_mnist_offline_names_the_folder(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=str(tmp_path / "MNIST" / "raw")):
        load_mnist(tmp_path, "test", download=False)

    import torchvision.datasets

    class Offline:
        def __init__(self, *args, **kwargs):
            raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(DataError, match="could not be downloaded.*copy train-images"):
        load_mnist(tmp_path, "train")
    with pytest.raises(DataError, match="unknown MNIST split"):
        load_mnist(tmp_path, "validation")


def test_truncated_and_foreign_idx_files_are_refused(tmp_path):
    bad = tmp_path / "x.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28]) + b"\0" * 100)
    with pytest.raises(DataError, match="truncated"):
        read_idx(bad)
    (tmp_path / "y").write_bytes(b"PNG....")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "y")


def test_dynamic_binarization_is_fresh_and_fixed_binarization_is_seeded():
    images = torch.full((200, 1, 28, 28), 128, dtype=torch.uint8)
    a, b = preprocess(images, "binarize"), preprocess(images, "binarize")
    assert set(a.unique().tolist()) == {0.0, 1.0} and not torch.equal(a, b)
    assert abs(a.mean().item() - 128 / 255) < 0.01
    assert torch.equal(fixed_preprocess(images, "binarize"), fixed_preprocess(images, "binarize"))
    assert torch.equal(binarize(torch.ones(5)), torch.ones(5))


def test_dequantization_stays_within_each_8_bit_level():
    images = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8)
    x = dequantize(images)
    assert (x >= 0).all() and (x < 1).all()
    assert torch.equal((x * 256).floor().to(torch.uint8), images)
    assert preprocess(x, "dequantize") is x, "float data passes through"
    with pytest.raises(DataError, match="uint8"):
        preprocess(images.int(), "dequantize")


def test_batches_cover_each_image_once_per_epoch_and_resume_mid_epoch():
    images = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1)
    batches = TensorBatches(images, 3, seed=1).prepare(0, 1, torch.device("cpu"))
    epoch = list(batches.epoch(0))
    assert len(batches) == 4 and [len(b) for b in epoch] == [3, 3, 3, 1]
    assert sorted(torch.cat(epoch).flatten().tolist()) == list(range(10))
    assert torch.equal(torch.cat(list(batches.epoch(0, start=2))), torch.cat(epoch[2:]))
    assert not torch.equal(torch.cat(list(batches.epoch(1))), torch.cat(epoch))


def _png(path, height, width, value=100, mode="L"):
    channels = () if mode == "L" else (3,)
    Image.fromarray(torch.full((height, width, *channels), value, dtype=torch.uint8).numpy()).save(
        path
    )


def test_image_folder_reads_resizes_and_names_bad_files(tmp_path):
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "a.png", 8, 12)
    _png(tmp_path / "sub" / "b.PNG", 8, 12, mode="RGB")
    folder = ImageFolder(tmp_path)
    assert len(folder) == 2 and folder.image_shape == (1, 8, 12)
    assert folder[1].shape == (1, 8, 12) and folder[1].dtype == torch.uint8
    assert ImageFolder(tmp_path, grayscale=False)[0].shape == (3, 8, 12)

    _png(tmp_path / "c.jpg", 20, 20)
    with pytest.raises(DataError, match="images differ in size.*--image-size"):
        ImageFolder(tmp_path)
    resized = ImageFolder(tmp_path, size=(16, 16))
    assert resized[2].shape == (1, 16, 16)
    train, test = split_folder(resized)
    assert len(train) + len(test) == 3 and len(test) >= 1

    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png is not a readable image"):
        ImageFolder(tmp_path)
    lazy = ImageFolder(tmp_path, size=(16, 16))  # no size scan: the bad file shows when read
    with pytest.raises(DataError, match="broken.png is not a readable image"):
        lazy[lazy.files.index(tmp_path / "broken.png")]


def test_missing_or_empty_folders_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no PNG or JPEG"):
        ImageFolder(tmp_path)
