"""Shared fixtures: where MNIST is, small data slices, and a CPU-only default device."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch

from pyro_vae.data import ImageSet, default_data_dir, load_mnist
from pyro_vae.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def mnist_root() -> Path:
    """``$PYRO_VAE_MNIST_DIR``, else the project's shared data beside the checkout, else the
    user's data folder (where torchvision downloads MNIST when it is online)."""
    if "PYRO_VAE_MNIST_DIR" in os.environ:
        return Path(os.environ["PYRO_VAE_MNIST_DIR"])
    shared = REPO.parent / "shared" / "data"
    return shared if (shared / "MNIST" / "raw").is_dir() else default_data_dir()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    root = mnist_root()
    try:
        load_mnist(root, "test")
    except DataError as error:  # fail, never skip: a suite without MNIST tests nothing real
        pytest.fail(f"MNIST is needed by the tests: {error}", pytrace=False)
    return root


@pytest.fixture(scope="session")
def mnist_train(mnist_dir) -> ImageSet:
    return load_mnist(mnist_dir, "train")


@pytest.fixture(scope="session")
def mnist_test(mnist_dir) -> ImageSet:
    return load_mnist(mnist_dir, "test")


@pytest.fixture(autouse=True)
def _fresh_rng_and_store():
    """Each test starts from a known seed and an empty global param store."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
