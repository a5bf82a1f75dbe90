"""Super-resolution with the decoder as the prior, restoration of colour images, and
scripts/restore.py (with its older name, scripts/inpaint.py) end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pyro_vae import VAE, Run, fit, plots, save_checkpoint
from pyro_vae.errors import UsageError
from pyro_vae.inverse import (
    downsample,
    image_site,
    infer_nuts,
    infer_svi,
    low_res_site,
    make_mask,
    observed_site,
    restoration_model,
)
from tests.helpers import run_script

NOISE = 0.05  # std of the noise on the low-resolution pixels


@pytest.fixture(scope="module")
def fitted(mnist_train) -> VAE:
    """A small MNIST VAE fitted for a few seconds: 470 steps, sharp enough to matter."""
    pyro.set_rng_seed(0)
    vae = VAE(name="sr", latent_dim=16, hidden=256)
    run = Run(epochs=3, accelerator="cpu", progress=False)
    fit(vae, mnist_train.images[:10000], batch_size=64, run=run)
    return vae


@pytest.fixture(scope="module")
def checkpoint(fitted: VAE, tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("restore") / "checkpoint.pt", fitted)


def low_resolution(grey: torch.Tensor, factor: int, seed: int = 0) -> torch.Tensor:
    """Block averages of ``grey`` images plus Gaussian noise of std NOISE."""
    low = downsample(grey, factor)
    return low + NOISE * torch.randn(low.shape, generator=torch.Generator().manual_seed(seed))


def squared_error(images: torch.Tensor, target: torch.Tensor) -> float:
    return ((images - target) ** 2).mean().item()


# ---------------------------------------------------------------- the forward operator
def test_downsample_averages_blocks_and_checks_the_factor():
    images = torch.rand(5, 2, 3, 28, 28)  # extra leading dims: draws of a batch
    low = downsample(images, 4)
    assert low.shape == (5, 2, 3, 7, 7)
    assert torch.allclose(low.flatten(0, 1), F.avg_pool2d(images.flatten(0, 1), 4), atol=1e-6)
    assert downsample(images, 1) is images
    with pytest.raises(UsageError, match="factor 5 does not divide the image size 28 x 28"):
        downsample(images, 5)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(UsageError, match="positive integer"):
            downsample(images, bad)


def test_restoration_model_checks_the_low_resolution_problem():
    vae = VAE(latent_dim=2, hidden=8)
    full = torch.zeros(2, 1, 28, 28)
    with pytest.raises(UsageError, match=r"low-resolution images \(factor 4\) of shape"):
        restoration_model(vae, full, noise=NOISE, factor=4)
    with pytest.raises(UsageError, match=r"\(batch, 1, 7, 7\), got \(2, 1, 28, 28\)"):
        restoration_model(vae, full, noise=NOISE, factor=4)
    with pytest.raises(UsageError, match="does not divide"):
        restoration_model(vae, torch.zeros(2, 1, 5, 5), noise=NOISE, factor=5)
    with pytest.raises(UsageError, match="super-resolution needs noise"):
        restoration_model(vae, torch.zeros(2, 1, 7, 7), factor=4)
    with pytest.raises(UsageError, match="mask of shape"):
        restoration_model(vae, torch.zeros(2, 1, 7, 7), torch.ones(1, 28, 28), NOISE, factor=4)
    # the inference front ends say so in one line, before Pyro adds its trace to the message
    for infer in (infer_svi, infer_nuts):
        with pytest.raises(UsageError) as error:
            infer(vae, full, noise=NOISE, factor=4)
        assert "\n" not in str(error.value)


def test_the_model_scores_block_averages_of_the_decoded_image():
    vae = VAE(latent_dim=3, hidden=16)
    z = torch.randn(4, 3)
    observed = torch.rand(4, 1, 14, 14)
    known = make_mask("random:0.5", (1, 14, 14), torch.Generator().manual_seed(0))

    def trace(images: torch.Tensor, mask: torch.Tensor | None = None):
        conditioned = pyro.poutine.condition(restoration_model, data={vae.z_site: z})
        return pyro.poutine.trace(conditioned).get_trace(vae, images, mask, NOISE, factor=2)

    nodes = trace(observed).nodes
    image, low = nodes[image_site(vae)]["value"], nodes[low_res_site(vae)]["value"]
    assert torch.allclose(low, F.avg_pool2d(image, 2), atol=1e-6)
    expected = torch.distributions.Normal(low, NOISE).log_prob(observed).sum()
    assert torch.allclose(nodes[observed_site(vae)]["fn"].log_prob(observed).sum(), expected)
    # a mask hides low-resolution pixels: their values never enter the density
    scrambled = torch.where(known, observed, torch.rand_like(observed))
    assert torch.equal(
        trace(observed, known).log_prob_sum(), trace(scrambled, known).log_prob_sum()
    )
    assert not torch.equal(trace(observed).log_prob_sum(), trace(scrambled).log_prob_sum())
    # inpainting and denoising trace as before: no low-resolution site
    plain = pyro.poutine.trace(restoration_model).get_trace(
        vae, torch.rand(4, 1, 28, 28), None, 0.1
    )
    assert low_res_site(vae) not in plain.nodes


# ---------------------------------------------------------------- on MNIST
@pytest.mark.mnist
def test_super_resolution_beats_bilinear_upsampling(fitted: VAE, mnist_test):
    """At factor 4 (7 x 7 -> 28 x 28), on 64 held-out digits, the posterior mean is closer
    to the grey originals than bilinear upsampling of the same low-resolution input."""
    grey = mnist_test.images[:64].float() / 255.0
    low = low_resolution(grey, 4)
    pyro.set_rng_seed(1)
    posterior = infer_svi(fitted, low, noise=NOISE, factor=4, num_steps=300, num_samples=32)
    bilinear = F.interpolate(low, scale_factor=4, mode="bilinear", align_corners=False)
    assert posterior.images.shape == (32, 64, 1, 28, 28)
    assert squared_error(posterior.mean, grey) < 0.9 * squared_error(bilinear, grey)


@pytest.mark.mnist
def test_nuts_super_resolution(fitted: VAE, mnist_test):
    grey = mnist_test.images[:3].float() / 255.0
    low = low_resolution(grey, 4)
    pyro.set_rng_seed(2)
    posterior = infer_nuts(fitted, low, noise=NOISE, factor=4, num_samples=20, warmup_steps=20)
    assert posterior.z.shape == (20, 3, fitted.config.latent_dim)
    assert torch.isfinite(posterior.images).all()
    average_digit = fitted.sample(1000).mean(0)
    assert squared_error(posterior.mean, grey) < 0.8 * squared_error(average_digit, grey)


# ---------------------------------------------------------------- colour images
def colour_vae() -> VAE:
    return VAE(
        name="colour", image_shape=(3, 16, 16), arch="conv", likelihood="gaussian",
        latent_dim=4, hidden=32, channels=8,
    )  # fmt: skip


def test_colour_images_go_through_every_restoration(tmp_path: Path):
    vae = colour_vae()
    images = torch.rand(2, 3, 16, 16)
    mask = make_mask("top-half", vae.config.image_shape)
    for observed, known, noise, factor in [
        (images, mask, None, 1),  # inpainting
        (images, None, 0.1, 1),  # denoising
        (low_resolution(images, 4), None, NOISE, 4),  # super-resolution
        (low_resolution(images, 2), make_mask("left-half", (3, 8, 8)), NOISE, 2),
    ]:
        posterior = infer_svi(
            vae, observed, known, noise, factor=factor, num_steps=5, num_samples=6
        )
        assert posterior.images.shape == (6, 2, 3, 16, 16)
        assert posterior.std.shape == (2, 3, 16, 16)

    # the figures keep the colour: a pure green input shows as green blocks
    green = torch.zeros(2, 3, 4, 4)
    green[:, 1] = 1.0
    dark = torch.zeros(2, 3, 16, 16)
    figure = plots.super_resolution(green, dark[None], dark, dark + 0.1, dark, bilinear=dark)
    pixels = np.asarray(Image.open(plots.save(figure, tmp_path / "sr.png")).convert("RGB"))
    is_green = (pixels[..., 1] > 200) & (pixels[..., 0] < 60) & (pixels[..., 2] < 60)
    assert is_green.sum() > 100
    figure = plots.inpainting(dark, green.repeat_interleave(4, -1).repeat_interleave(4, -2),
                              mask, dark[None], dark)  # fmt: skip
    pixels = np.asarray(Image.open(plots.save(figure, tmp_path / "in.png")).convert("RGB"))
    assert ((pixels[..., 1] > 200) & (pixels[..., 0] < 60) & (pixels[..., 2] < 60)).sum() > 100


def test_restore_script_on_a_folder_of_colour_images(tmp_path: Path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(20):
        pixels = torch.randint(0, 256, (16, 16, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"{i:02d}.png")
    checkpoint = save_checkpoint(tmp_path / "colour.pt", colour_vae())
    out = tmp_path / "figures" / "sr.png"
    status = run_script(
        "restore.py", "--checkpoint", checkpoint, "--dataset", "folder", "--data-dir", folder,
        "--rgb", "--task", "super-resolution", "--factor", "4", "--steps", "5", "--samples", "4",
        "--draws", "2", "--out", out,
    )  # fmt: skip
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "of 2 held-out images" in printed.out  # the folder's held-out 10%
    # greyscale data for a colour model is named, in one line
    status = run_script(
        "restore.py", "--checkpoint", checkpoint, "--dataset", "folder", "--data-dir", folder,
        "--task", "super-resolution", "--out", out,
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and err.strip().count("\n") == 0 and "fitted on (3, 16, 16)" in err


# ---------------------------------------------------------------- the scripts
@pytest.mark.mnist
def test_restore_script_super_resolution(checkpoint: Path, mnist_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "sr.png"
    status = run_script(
        "restore.py", "--checkpoint", checkpoint, "--data-dir", mnist_dir,
        "--task", "super-resolution", "--factor", "4", "--num-images", "4", "--steps", "200",
        "--samples", "20", "--draws", "3", "--out", out,
    )  # fmt: skip
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    with Image.open(out) as image:
        assert image.size[0] > image.size[1] > 300  # a column per panel, a row per digit
    assert "super-resolution x4 (7x7 -> 28x28" in printed.out
    assert "posterior mean" in printed.out and "bilinear upsampling" in printed.out


@pytest.mark.mnist
def test_inpaint_script_keeps_its_old_options(
    checkpoint: Path, mnist_dir: Path, tmp_path: Path, capsys
):
    quick = ["--num-images", "2", "--steps", "30", "--samples", "8", "--draws", "2"]
    out = tmp_path / "inpainting.png"
    status = run_script(
        "inpaint.py", "--checkpoint", checkpoint, "--data-dir", mnist_dir, "--mask", "top-half",
        "--method", "svi", "--seed", "1", *quick, "--out", out,
    )  # fmt: skip
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert out.read_bytes()[:4] == b"\x89PNG" and "hidden pixels" in printed.out
    # no mask, only noise: denoising, as before
    status = run_script(
        "inpaint.py", "--checkpoint", checkpoint, "--data-dir", mnist_dir, "--mask", "none",
        "--noise", "0.3", *quick, "--out", out,
    )  # fmt: skip
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "noisy input" in printed.out and "hidden pixels" not in printed.out


@pytest.mark.parametrize(
    "options, message",
    [
        (["--task", "super-resolution", "--noise", "0"], "needs --noise > 0"),
        (["--task", "super-resolution", "--factor", "1"], "at least 2"),
        (["--task", "inpaint", "--factor", "4"], "--factor is for --task super-resolution"),
        (["--task", "denoise", "--noise", "0"], "nothing to restore"),
        (["--task", "inpaint", "--mask", "diagonal"], "unknown mask"),
        (["--draws", "5", "--samples", "3"], "cannot exceed --samples"),
    ],
)
def test_restore_script_reports_bad_options_in_one_line(tmp_path, capsys, options, message):
    status = run_script("restore.py", "--checkpoint", tmp_path / "missing.pt", *options)
    err = capsys.readouterr().err
    assert status == 2 and err.strip().count("\n") == 0 and message in err, err


@pytest.mark.mnist
def test_restore_script_names_a_factor_that_does_not_divide(checkpoint, mnist_dir, capsys):
    status = run_script(
        "restore.py", "--checkpoint", checkpoint, "--data-dir", mnist_dir,
        "--task", "super-resolution", "--factor", "5",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and err.strip().count("\n") == 0, err
    assert "factor 5 does not divide the image size 28 x 28" in err


def test_restore_script_names_an_output_folder_it_cannot_make(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file where the folder should go")
    out = tmp_path / "taken" / "sr.png"
    status = run_script("restore.py", "--checkpoint", tmp_path / "missing.pt", "--out", out)
    err = capsys.readouterr().err
    assert status == 2 and err.strip().count("\n") == 0 and "is a file" in err, err


@pytest.mark.parametrize("name, message", [("folder", "is a folder"), ("figure.xyz", ".png")])
def test_restore_script_refuses_a_figure_path_it_cannot_write_before_the_work(
    tmp_path, capsys, name, message
):
    """--out names one figure: a folder, or a suffix matplotlib cannot write, is refused
    in one line before the checkpoint is even read (the missing checkpoint below would be
    the error otherwise), not after the inference."""
    out = tmp_path / name
    if name == "folder":
        out.mkdir()
    status = run_script("restore.py", "--checkpoint", tmp_path / "missing.pt", "--out", out)
    err = capsys.readouterr().err
    assert status == 2 and err.strip().count("\n") == 0 and message in err, err
