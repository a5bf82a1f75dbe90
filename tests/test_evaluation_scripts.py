"""scripts/evaluate.py and scripts/ppc.py end to end on a tiny model fitted to MNIST."""

from __future__ import annotations

import json
import math
from pathlib import Path

import arviz as az
import pytest
from PIL import Image

from tests.helpers import run_script


@pytest.fixture(scope="module")
def fitted(mnist_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    code = run_script(
        "fit.py",
        *("--data-dir", mnist_dir, "--out", out, "--limit", 256, "--test-limit", 64),
        *("--epochs", 1, "--batch-size", 64, "--hidden", 32, "--latent-dim", 2, "--no-progress"),
    )
    assert code == 0
    return out / "checkpoint.pt"


def test_evaluate_script_writes_numbers_and_pictures(fitted, mnist_dir, tmp_path, capsys):
    args = ["--checkpoint", fitted, "--data-dir", mnist_dir, "--out", tmp_path, "--limit", 40]
    code = run_script(
        "evaluate.py", *args, "--particles", 20, "--particle-chunk", 8, "--no-progress"
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "K=20" in printed and "active units" in printed
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert result["num_images"] == 40 and result["num_particles"] == 20
    assert result["data"] == "binarized" and result["unit"] == "nats per image"
    assert math.isfinite(result["log_likelihood"]) and result["nll"] == -result["log_likelihood"]
    assert result["log_likelihood"] > result["elbo"] - 1.0
    assert len(result["kl_per_unit"]) == 2 and 0 <= result["active_units"] <= 2
    for picture in ("latent_scatter", "interpolation", "traversals", "manifold", "loss"):
        with Image.open(tmp_path / f"{picture}.png") as image:
            assert min(image.size) > 100


def test_ppc_script_writes_netcdf_json_and_figures(fitted, mnist_dir, tmp_path, capsys):
    args = ["--checkpoint", fitted, "--data-dir", mnist_dir, "--out", tmp_path]
    assert run_script("ppc.py", *args, "--images", 16, "--draws", 8) == 0
    assert "log_likelihood" in capsys.readouterr().out
    idata = az.from_netcdf(str(tmp_path / "ppc.nc"))
    assert idata.posterior_predictive["x"].shape == (1, 8, 16, 1, 28, 28)
    assert {"posterior", "observed_data", "log_likelihood", "prior_predictive"} <= set(
        idata.groups()
    )
    summary = json.loads((tmp_path / "ppc.json").read_text())
    assert summary["images"] == 16 and summary["draws"] == 8
    assert 0.0 <= summary["statistics"]["mean_intensity"]["p_value"] <= 1.0
    for figure in (
        "ppc_statistics",
        "prior_predictive_statistics",
        "replicates",
        "prior_predictive",
        "loglik_discrepancy",
        "pixel_p_values",
    ):
        assert (tmp_path / f"{figure}.png").stat().st_size > 1000, figure


@pytest.mark.parametrize("script", ["evaluate.py", "ppc.py"])
def test_scripts_report_a_bad_checkpoint_in_one_line(script, tmp_path, capsys):
    bogus = tmp_path / "checkpoint.pt"
    bogus.write_text("not a checkpoint")
    assert run_script(script, "--checkpoint", bogus) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"{script}: error: ")
    assert "not a readable pyro_vae checkpoint" in err
