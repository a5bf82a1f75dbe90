"""Posterior predictive checks of models fitted to ordinary image folders: dark or colour
images make a statistic constant within some replicated data sets (no pixel lit in any
image of a set), and the check must still draw every figure and write every file."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from pyro_vae import ppc
from tests.helpers import run_script

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

PPC_FILES = {
    "ppc.nc",
    "ppc.json",
    "ppc_statistics.png",
    "prior_predictive_statistics.png",
    "replicates.png",
    "prior_predictive.png",
    "loglik_discrepancy.png",
    "pixel_p_values.png",
}


def dark_replicates(channels: int, images: int = 6, draws: int = 8) -> ppc.Replicates:
    """Draws as a model of dark images gives them: nothing lit in the real images, one lit
    pixel in the first replicate of every odd draw and none in the even draws, so
    ``lit_fraction`` is constant in half the replicated sets and varies in the others;
    the prior draws of even index are all black, so every statistic is constant there."""
    g = torch.Generator().manual_seed(0)
    shape = (channels, 4, 4)
    observed = 0.4 * torch.rand(images, *shape, generator=g)
    replicated = 0.4 * torch.rand(draws, images, *shape, generator=g)
    replicated[1::2, 0, 0, 0, 0] = 0.9
    prior = torch.rand(draws, images, *shape, generator=g)
    prior[::2] = 0.0
    return ppc.Replicates(
        observed=observed,
        z=torch.randn(draws, images, 2, generator=g),
        replicated=replicated,
        log_lik_observed=torch.randn(draws, images, generator=g),
        log_lik_replicated=torch.randn(draws, images, generator=g),
        prior_z=torch.randn(draws, images, 2, generator=g),
        prior_replicated=prior,
    )


@pytest.mark.parametrize("channels", [1, 3], ids=["grey", "colour"])
def test_statistics_constant_in_some_sets_are_still_plotted(channels):
    draws = dark_replicates(channels)
    lit = ppc.check(draws)["lit_fraction"]
    assert (lit.observed == 0).all() and lit.p_value == pytest.approx(0.75)
    idata = ppc.to_inference_data(draws)
    for group in ("posterior", "prior"):
        fig = ppc.plot_statistics(idata, group, num_pp_samples=draws.num_draws)
        assert len(fig.axes) == 3
        for ax in fig.axes:
            labels = [line.get_label() for line in ax.lines]
            assert "Observed" in labels and f"{group.title()} predictive" in labels
            # every replicated set is drawn, the constant ones too
            assert sum(len(line.get_xdata()) > 0 for line in ax.lines) >= draws.num_draws
        # a panel falls back to CDFs only where some set has no density
        cdfs = ["constant" in ax.get_title() for ax in fig.axes]
        assert cdfs == ([False, True, False] if group == "posterior" else [True] * 3)
        plt.close(fig)


def dark_folder(path: Path, rgb: bool, count: int = 40, size: int = 4) -> Path:
    """``count`` small, mostly black images: most pixels exactly 0, a few bright ones."""
    rng = np.random.default_rng(0)
    path.mkdir()
    shape = (size, size, 3) if rgb else (size, size)
    for i in range(count):
        pixels = rng.integers(0, 256, shape).astype(np.uint8)
        pixels[rng.random((size, size)) < 0.7] = 0
        Image.fromarray(pixels).save(path / f"{i}.png")
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["colour", "grey"])
def fitted_folder(request, tmp_path_factory) -> tuple[Path, list]:
    """A Bernoulli MLP fitted for one epoch to a folder of dark images, and the options
    that load that folder again."""
    root = tmp_path_factory.mktemp("ppc-folder")
    images = dark_folder(root / "images", rgb=request.param)
    data = ["--dataset", "folder", "--data-dir", images, "--num-workers", 0, "--image-size", 4]
    data += ["--rgb"] if request.param else []
    code = run_script(
        "fit.py",
        *data,
        *("--out", root / "run", "--epochs", 1, "--batch-size", 16, "--hidden", 16),
        *("--latent-dim", 2, "--no-progress"),
    )
    assert code == 0
    return root / "run" / "checkpoint.pt", data


def test_ppc_script_finishes_on_an_image_folder(fitted_folder, tmp_path, capsys):
    checkpoint, data = fitted_folder
    out = tmp_path / "ppc"
    code = run_script(
        "ppc.py", "--checkpoint", checkpoint, *data, "--images", 2, "--draws", 50, "--out", out
    )
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == PPC_FILES


def test_a_failing_ppc_writes_nothing_and_keeps_its_traceback(fitted_folder, tmp_path, monkeypatch):
    """A bug in the last figure must not leave the first files behind, nor pass for a
    user's mistake: the exception reaches the caller whole."""
    from pyro_vae import plots

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in a figure")

    monkeypatch.setattr(plots, "p_value_map", broken)
    checkpoint, data = fitted_folder
    out = tmp_path / "ppc"
    with pytest.raises(RuntimeError, match="a bug in a figure"):
        run_script("ppc.py", "--checkpoint", checkpoint, *data, "--draws", 4, "--out", out)
    assert list(out.iterdir()) == []
