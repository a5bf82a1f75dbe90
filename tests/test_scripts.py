"""scripts/fit.py end to end on a slice of MNIST, and its one-line errors."""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.helpers import SCRIPTS, run_script

QUICK = ["--limit", "256", "--test-limit", "128", "--batch-size", "64", "--no-progress"]


def run(capsys, name, *args):
    """Run a script in this process; return (exit status, stdout, stderr)."""
    code = run_script(name, *args)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, pattern):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err
    assert "error:" in lines[-1] and pattern in lines[-1], err


def check_run_folder(out, epochs):
    expected = {
        "config.json",
        "history.csv",
        "metrics.json",
        "checkpoint.pt",
        "loss.png",
        "reconstructions.png",
        "samples.png",
    }
    assert expected <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["unit"] == "nats per image" and metrics["epochs"] == epochs
    assert math.isfinite(metrics["test_elbo"])
    if metrics["likelihood"] == "bernoulli":  # densities of continuous data may exceed 1
        assert metrics["test_elbo"] < 0
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    for picture in ("loss.png", "reconstructions.png", "samples.png"):
        with Image.open(out / picture) as image:
            assert min(image.size) > 200
    return metrics


def test_fit_script_runs_as_a_command(tmp_path, mnist_dir):
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "fit.py"),
            "--data-dir",
            mnist_dir,
            "--epochs",
            "2",
            "--out",
            out,
            *QUICK,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    metrics = check_run_folder(out, 2)
    assert "test_bits_per_dim_bound" not in metrics, "binary data has no bits/dim"
    # --no-progress drops the bars but still logs each epoch
    logged = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in logged] == ["1/2", "2/2"], result.stdout


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli", "gaussian"])
def test_fit_each_likelihood_and_architecture(capsys, tmp_path, mnist_dir, likelihood, arch):
    out = tmp_path / "run"
    code, stdout, err = run(
        capsys,
        "fit.py",
        "--likelihood",
        likelihood,
        "--arch",
        arch,
        "--data-dir",
        mnist_dir,
        "--epochs",
        "1",
        "--out",
        out,
        "--channels",
        "8",
        *QUICK,
    )
    assert code == 0, err
    metrics = check_run_folder(out, 1)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["likelihood"] == likelihood and config["model"]["arch"] == arch
    if likelihood != "bernoulli":
        assert metrics["test_bits_per_dim_bound"] > 0


def test_resume_continues_and_a_finished_run_is_not_overwritten(capsys, tmp_path, mnist_dir):
    out = tmp_path / "run"
    base = ["--data-dir", mnist_dir, "--out", out, *QUICK]
    assert run(capsys, "fit.py", *base, "--epochs", "1")[0] == 0
    code, _, err = run(capsys, "fit.py", *base, "--epochs", "2")
    assert_one_line_error(code, err, "already holds a run; pass --resume")
    code, _, err = run(capsys, "fit.py", *base, "--epochs", "2", "--resume")
    assert code == 0, err
    check_run_folder(out, 2)
    code, _, err = run(capsys, "fit.py", *base, "--epochs", "3", "--resume", "--latent-dim", "7")
    assert_one_line_error(code, err, "latent_dim: checkpoint has 50, asked for 7")
    (out / "checkpoint.pt").write_bytes(b"garbage")
    code, _, err = run(capsys, "fit.py", *base, "--epochs", "3", "--resume")
    assert_one_line_error(code, err, "not a readable pyro_vae checkpoint")


def test_a_folder_of_images_fits_end_to_end(capsys, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(30):
        pixels = (torch.rand(20, 20) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
    out = tmp_path / "run"
    code, _, err = run(
        capsys,
        "fit.py",
        "--dataset",
        "folder",
        "--data-dir",
        images,
        "--image-size",
        "16",
        "--likelihood",
        "continuous-bernoulli",
        "--arch",
        "conv",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        "--out",
        out,
        "--no-progress",
    )
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["model"]["image_shape"] == [1, 16, 16]
    check_run_folder(out, 1)


def test_user_mistakes_are_one_line_errors(monkeypatch, capsys, tmp_path, mnist_dir):
    code, _, err = run(capsys, "fit.py", "--likelihood", "poisson")
    assert_one_line_error(code, err, "invalid choice: 'poisson'")
    code, _, err = run(
        capsys,
        "fit.py",
        "--dataset",
        "folder",
        "--data-dir",
        tmp_path / "nowhere",
        "--out",
        tmp_path / "a",
    )
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run(capsys, "fit.py", "--epochs", "-1", "--out", tmp_path / "b")
    assert_one_line_error(code, err, "--epochs must be positive")
    code, _, err = run(capsys, "fit.py", "--resume", "--out", tmp_path / "c")
    assert_one_line_error(code, err, "there is no checkpoint")

    import torchvision.datasets

    class Offline:
        def __init__(self, *args, **kwargs):
            raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    code, _, err = run(capsys, "fit.py", "--data-dir", tmp_path / "empty", "--out", tmp_path / "d")
    assert_one_line_error(code, err, "MNIST is not in")
    images = tmp_path / "odd"
    images.mkdir()
    Image.fromarray(torch.zeros(18, 18, dtype=torch.uint8).numpy()).save(images / "a.png")
    Image.fromarray(torch.zeros(18, 18, dtype=torch.uint8).numpy()).save(images / "b.png")
    code, _, err = run(
        capsys,
        "fit.py",
        "--dataset",
        "folder",
        "--data-dir",
        images,
        "--arch",
        "conv",
        "--out",
        tmp_path / "e",
    )
    assert_one_line_error(code, err, "multiples of 4")


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_a_diverging_run_stops_with_the_step_and_keeps_its_checkpoint(
    monkeypatch, capsys, tmp_path, mnist_dir
):
    from pyro_vae.likelihoods import BernoulliLikelihood

    original = BernoulliLikelihood.distribution
    calls = {"n": 0}

    def poisoned(self, params):
        calls["n"] += 1  # 4 training steps, 1 test evaluation, then the 5th step
        return original(self, params * float("nan") if calls["n"] >= 6 else params)

    monkeypatch.setattr(BernoulliLikelihood, "distribution", poisoned)
    out = tmp_path / "run"
    code, _, err = run(
        capsys,
        "fit.py",
        "--data-dir",
        mnist_dir,
        "--epochs",
        "2",
        "--out",
        out,
        *QUICK,
    )
    assert_one_line_error(code, err, "at step 5")
    assert f"the last good epoch is in {out / 'checkpoint.pt'}" in err
    from pyro_vae import load_checkpoint

    assert load_checkpoint(out / "checkpoint.pt")["progress"]["epoch"] == 1
