"""Which failures the scripts print as one ``error:`` line: the user's (a bad option, a
damaged data file, an output folder that cannot be made), and only those; a bug in the
package keeps its traceback."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyro_vae import VAE
from pyro_vae.checkpoint import save_checkpoint
from pyro_vae.data import MNIST_FILES, load_mnist
from pyro_vae.errors import DataError
from tests.helpers import run_script

TEST_IMAGES = MNIST_FILES["test"][0] + ".gz"


def one_line_error(capsys, code: int, *expected: str) -> str:
    """The last line of stderr, checked to be the scripts' one-line error with ``expected``."""
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert " error: " in line and all(part in line for part in expected), err
    return line


# ---------------------------------------------------------------- damaged MNIST files
def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def corrupted(data: bytes) -> bytes:
    middle = len(data) // 2
    noise = np.random.default_rng(0).integers(0, 256, 256, dtype=np.uint8).tobytes()
    return data[:middle] + noise + data[middle + 256 :]


def not_gzip(data: bytes) -> bytes:
    return b"<html>404 not found</html>"


@pytest.mark.parametrize("damage", [truncated, corrupted, not_gzip])
def test_a_damaged_mnist_file_is_a_data_error_naming_it(damage, mnist_dir, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    source = Path(mnist_dir) / "MNIST" / "raw"
    for name in MNIST_FILES["test"]:
        shutil.copy(source / f"{name}.gz", raw)
    damaged = raw / TEST_IMAGES
    damaged.write_bytes(damage(damaged.read_bytes()))
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path, "test", download=False)
    message = str(error.value)
    assert str(damaged) in message and "damaged" in message and "\n" not in message
    assert "delete it" in message and "intact" in message


def test_a_truncated_uncompressed_idx_file_says_what_to_do(mnist_dir, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    source = Path(mnist_dir) / "MNIST" / "raw"
    for name in MNIST_FILES["test"]:
        with gzip.open(source / f"{name}.gz") as f:
            (raw / name).write_bytes(f.read())
    images = raw / MNIST_FILES["test"][0]
    images.write_bytes(images.read_bytes()[:6])  # cut inside the header
    with pytest.raises(DataError, match="truncated.*delete it"):
        load_mnist(tmp_path, "test", download=False)


def test_fit_reports_a_damaged_mnist_file_in_one_line(mnist_dir, tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in [*MNIST_FILES["train"], *MNIST_FILES["test"]]:
        (raw / f"{name}.gz").symlink_to(Path(mnist_dir).resolve() / "MNIST" / "raw" / f"{name}.gz")
    damaged = raw / TEST_IMAGES
    data = damaged.read_bytes()
    damaged.unlink()
    damaged.write_bytes(truncated(data))
    code = run_script("fit.py", "--data-dir", tmp_path, "--out", tmp_path / "run")
    one_line_error(capsys, code, str(damaged), "delete it")


# ---------------------------------------------------------------- output folders
@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, list]:
    """A folder of tiny images, the options that load it, and a checkpoint of a VAE for
    those images (untrained: these tests stop before any work)."""
    root = tmp_path_factory.mktemp("cli")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).save(images / f"{i}.png")
    data = ["--dataset", "folder", "--data-dir", images, "--num-workers", 0]
    vae = VAE(image_shape=(1, 4, 4), likelihood="continuous-bernoulli", latent_dim=2, hidden=8)
    return save_checkpoint(root / "checkpoint.pt", vae), data


def script_args(script: str, folder_run, out: Path) -> list:
    checkpoint, data = folder_run
    if script == "fit.py":
        return [*data, "--epochs", 1, "--out", out]
    if script == "tokenize.py":  # --out names a file there; its folder is the one made
        return ["--checkpoint", checkpoint, *data, "--out", out / "tokens.pt"]
    return ["--checkpoint", checkpoint, *data, "--out", out]


@pytest.mark.parametrize("script", ["fit.py", "evaluate.py", "ppc.py", "tokenize.py"])
@pytest.mark.parametrize("where", ["below a file", "is a file"])
def test_an_out_folder_blocked_by_a_file_is_one_line(script, where, folder_run, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    out = blocker / "run" if where == "below a file" else blocker
    code = run_script(script, *script_args(script, folder_run, out))
    one_line_error(capsys, code, "--out", str(blocker), "is a file", "choose another --out")
    assert blocker.read_text() == "a file, not a folder"


def test_fit_ssvae_out_below_a_file_is_one_line(mnist_dir, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    args = ["--data-dir", mnist_dir, "--limit", 1000, "--test-limit", 10, "--epochs", 1]
    code = run_script("fit_ssvae.py", *args, "--out", blocker / "run")
    one_line_error(capsys, code, str(blocker / "run"), "is a file")


def test_an_out_folder_without_permission_is_one_line(folder_run, tmp_path, capsys, monkeypatch):
    """Simulated, since the tests may run as root, whom no permission stops."""
    out = tmp_path / "locked" / "run"
    mkdir = Path.mkdir

    def denied(self, *args, **kwargs):
        if self in (out, out.parent):
            raise PermissionError(13, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    code = run_script("fit.py", *script_args("fit.py", folder_run, out))
    one_line_error(capsys, code, str(out), "Permission denied", "choose another --out")


def test_tokenize_out_naming_a_folder_is_one_line(folder_run, tmp_path, capsys):
    checkpoint, data = folder_run
    code = run_script("tokenize.py", "--checkpoint", checkpoint, *data, "--out", tmp_path)
    one_line_error(capsys, code, f"--out {tmp_path} is a folder", "tokens.pt")


# ---------------------------------------------------------------- user errors vs bugs
@pytest.mark.parametrize(
    ("script", "option", "expected"),
    [
        ("ppc.py", ["--draws", 0], "--draws must be positive"),
        ("evaluate.py", ["--particles", -1], "--particles must be positive"),
        ("ppc.py", ["--image-size", 4, 4, 4], "--image-size takes N or H W"),
        ("fit.py", ["--image-size", 0], "--image-size takes N or H W, each at least 1"),
        ("evaluate.py", ["--num-workers", -1], "--num-workers must be 0"),
        ("fit.py", ["--iwae-particles", -1], "--iwae-particles must be 0"),
        ("tokenize.py", ["--decode", "t.pt", "--out", "grid.pgn"], "end the name with one of"),
    ],
)
def test_a_bad_option_is_one_line(script, option, expected, folder_run, tmp_path, capsys):
    code = run_script(script, *script_args(script, folder_run, tmp_path), *option)
    one_line_error(capsys, code, expected)


def test_a_folder_of_one_image_is_one_line(folder_run, tmp_path, capsys):
    """One image leaves nothing to hold out for testing."""
    one = tmp_path / "one"
    one.mkdir()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(one / "only.png")
    args = [*script_args("fit.py", folder_run, tmp_path / "run"), "--data-dir", one]
    one_line_error(capsys, run_script("fit.py", *args), f"{one} holds one image", "at least 2")


@pytest.mark.filterwarnings(r"ignore:var\(\). degrees of freedom:UserWarning")  # one image
def test_evaluate_pictures_a_single_held_out_image(folder_run, tmp_path):
    """``--limit 1`` leaves no pair of images to interpolate between; the rest is drawn."""
    args = [*script_args("evaluate.py", folder_run, tmp_path), "--limit", 1, "--particles", 2]
    assert run_script("evaluate.py", *args, "--no-progress") == 0
    written = {p.name for p in tmp_path.iterdir()}
    assert {"evaluation.json", "latent_scatter.png"} <= written
    assert "interpolation.png" not in written


@pytest.mark.parametrize("bug", [ValueError, FileNotFoundError])
def test_a_bug_in_the_package_keeps_its_traceback(bug, folder_run, tmp_path, monkeypatch):
    """A plain ValueError or OSError from inside pyro_vae is not the user's mistake: the
    script must not print it as one, but let it through with its traceback."""
    from pyro_vae.cli import evaluate  # the command's code, which the script runs

    def broken(*args, **kwargs):
        raise bug("an internal inconsistency")

    monkeypatch.setattr(evaluate, "evaluate_vae", broken)
    with pytest.raises(bug, match="an internal inconsistency"):
        run_script("evaluate.py", *script_args("evaluate.py", folder_run, tmp_path))
