"""``pyro-vae fit-prior`` and ``pyro-vae generate`` end to end on a slice of MNIST: a tiny
relaxed-categorical VAE, a conditional prior over its tokens (run folder, history, resume),
samples per class and completions, ``load_prior``, and the one-line errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from pyro_vae.cli.main import main
from pyro_vae.errors import CheckpointError
from pyro_vae.prior import COMMAND_TEMPERATURE, TokenPrior, load_prior
from tests.helpers import assert_one_line_error, pyro_vae

#: a VAE of 4 codes of 4 values, trained for seconds.
DVAE = ["--latent", "relaxed-categorical", "--groups", 4, "--classes", 4, "--hidden", 32]
DATA = ["--limit", 500, "--test-limit", 200, "--no-progress", "--accelerator", "cpu"]
PRIOR = ["--layers", 1, "--heads", 2, "--embd", 16]


@pytest.fixture(autouse=True)
def _one_thread():
    """Two cores are shared with other work: these small models need only one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_dir) -> Path:
    """A folder with ``dvae/`` (the VAE's run) and ``prior/`` (a two-epoch conditional
    prior's run), made once for the module."""
    root = tmp_path_factory.mktemp("prior-runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = ["--data-dir", mnist_dir, *DATA]
        fit = ["fit", *DVAE, *common, "--epochs", 1, "--iwae-particles", 0]
        assert main([str(a) for a in [*fit, "--out", root / "dvae"]]) == 0
        prior = ["fit-prior", "--checkpoint", root / "dvae" / "checkpoint.pt", *PRIOR, *common]
        assert main([str(a) for a in [*prior, "--epochs", 2, "--out", root / "prior"]]) == 0
    finally:
        torch.set_num_threads(threads)
    return root


def history(run: Path) -> list[dict]:
    """The rows of a run folder's history.csv."""
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def test_fit_prior_writes_a_run_folder_that_resumes(runs, mnist_dir, capsys):
    run = runs / "prior"
    assert {"config.json", "history.csv", "metrics.json", "checkpoint.pt", "samples.png"} <= {
        p.name for p in run.iterdir()
    }
    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for name in ("train_loss", "test_nats", "test_bits_per_token", "train_bits_per_token"):
        assert all(float(r[name]) > 0 for r in rows), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["captions"]["classes"] == list("0123456789")
    assert metrics["test_bits_per_token"] == pytest.approx(float(rows[-1]["test_bits_per_token"]))
    config = json.loads((run / "config.json").read_text())
    assert config["command"] == "fit-prior" and config["model"]["num_classes"] == 10
    # the checkpoint continues: a third epoch after the two
    args = ["fit-prior", "--checkpoint", runs / "dvae" / "checkpoint.pt", *PRIOR, *DATA]
    code, out, err = pyro_vae(
        capsys, *args, "--data-dir", mnist_dir, "--epochs", 3, "--resume", "--out", run
    )
    assert code == 0, err
    assert [int(r["epoch"]) for r in history(run)] == [1, 2, 3]
    assert history(run)[:2] == rows


def test_the_prior_fitted_to_posterior_draws_raises_the_held_out_bound(runs, mnist_test):
    """fit-prior's default codes are draws from the VAE's posterior, so the prior's held-out
    nats estimate minus the bound's prior term given the caption, -E_q log p(z | c):
    lower than the uniform prior's. The combined model marginalizes the caption, and
    p(z) = mean_c p(z | c) >= p(z | c_true) / C, so with the same draws of z (one seed)
    its bound gains at least (uniform - nats - log C) over the uniform prior's; and it
    gains, by more than its standard error."""
    import pyro

    from pyro_vae import evaluate, load_vae
    from pyro_vae.data import fixed_preprocess

    metrics = json.loads((runs / "prior" / "metrics.json").read_text())
    assert metrics["tokens"]["codes"] == "10 draws from the posterior q(z | x)"
    uniform_nats = 4 * math.log(4)  # 4 codes of 4
    assert metrics["test_nats"] < uniform_nats
    vae = load_vae(runs / "dvae" / "checkpoint.pt")
    prior = load_prior(runs / "prior" / "checkpoint.pt")
    x = fixed_preprocess(mnist_test.images[:200], vae.likelihood.preprocessing)
    bounds = {}
    for name, model in (("uniform", vae.eval()), ("learned", vae.with_prior(prior))):
        pyro.set_rng_seed(0)
        bounds[name] = evaluate.elbo(model, x, num_particles=20).double()
    gain = bounds["learned"] - bounds["uniform"]  # per image: log p(z) - log uniform, paired
    se = gain.std().item() / math.sqrt(len(gain))
    assert gain.mean() > 3 * se, gain.mean()
    assert gain.mean() > uniform_nats - metrics["test_nats"] - math.log(10) - 3 * se


def test_samples_png_is_redrawn_each_epoch_without_touching_the_training_rng(runs, tmp_path):
    import argparse

    from pyro_vae import load_vae
    from pyro_vae.cli.fit_prior import epoch_reporter

    prior = load_prior(runs / "prior" / "checkpoint.pt").train()
    vae = load_vae(runs / "dvae" / "checkpoint.pt").eval()
    args = argparse.Namespace(no_progress=False, seed=3, epochs=1)
    report = epoch_reporter(args, tmp_path / "samples.png", prior, vae, None)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    report(None)  # the record is only printed, and only under --no-progress
    assert (tmp_path / "samples.png").is_file() and prior.training
    assert torch.equal(torch.rand(3), expected)


def fit_prior_on_tokens(capsys, tokens, out, *options) -> dict:
    """``pyro-vae fit-prior --tokens`` for one epoch on the CPU; its metrics.json."""
    code, _, err = pyro_vae(
        capsys, "fit-prior", "--tokens", tokens, *options, *PRIOR, "--epochs", 1,
        "--no-progress", "--accelerator", "cpu", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    return json.loads((out / "metrics.json").read_text())


def test_fit_prior_reads_a_token_file_with_its_labels_as_captions(runs, mnist_dir, capsys):
    dvae, tokens = runs / "dvae" / "checkpoint.pt", runs / "tokens.pt"
    code, _, err = pyro_vae(
        capsys, "tokenize", "--checkpoint", dvae, "--data-dir", mnist_dir, "--split", "test",
        "--limit", 300, "--out", tokens,
    )  # fmt: skip
    assert code == 0, err
    out = runs / "from-tokens"
    metrics = fit_prior_on_tokens(capsys, tokens, out)
    assert (metrics["tokens"]["train_images"], metrics["tokens"]["test_images"]) == (270, 30)
    assert metrics["captions"]["source"].startswith("the labels of")
    assert metrics["tokens"]["codes"] == "the most likely codes"
    assert (out / "samples.png").is_file()  # decoded by the token file's own checkpoint
    code, _, err = pyro_vae(
        capsys, "fit-prior", "--tokens", tokens, "--codes", "posterior", "--out", runs / "never"
    )
    assert_one_line_error(code, err, "--codes posterior", "tokenize --draws D")
    code, _, err = pyro_vae(
        capsys, "fit-prior", "--tokens", tokens, "--draws", 3, "--out", runs / "never"
    )
    assert_one_line_error(code, err, "--draws", "--codes posterior")


def test_a_token_file_with_posterior_draws_fits_the_prior_to_them(runs, mnist_dir, capsys):
    dvae, tokens = runs / "dvae" / "checkpoint.pt", runs / "drawn-tokens.pt"
    code, out, err = pyro_vae(
        capsys, "tokenize", "--checkpoint", dvae, "--data-dir", mnist_dir, "--split", "test",
        "--limit", 200, "--draws", 3, "--out", tokens,
    )  # fmt: skip
    assert code == 0, err
    assert "3 posterior draws" in out
    record = torch.load(tokens, weights_only=True)
    assert record["draws"].shape == (3, 200, 4) and record["tokens"].shape == (200, 4)
    assert not torch.equal(record["draws"][0], record["draws"][1])  # draws, not copies
    metrics = fit_prior_on_tokens(capsys, tokens, runs / "from-drawn-tokens")
    assert metrics["tokens"]["codes"] == "3 draws from the posterior q(z | x)"
    assert (metrics["tokens"]["train_images"], metrics["tokens"]["test_images"]) == (180, 20)
    metrics = fit_prior_on_tokens(capsys, tokens, runs / "from-drawn-argmax", "--codes", "argmax")
    assert metrics["tokens"]["codes"] == "the most likely codes"


def test_fit_prior_takes_a_folders_class_subfolders_as_captions(runs, mnist_test, tmp_path, capsys):
    from PIL import Image

    for i in range(24):
        folder = tmp_path / "images" / ("even" if i % 2 == 0 else "odd")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mnist_test.images[i, 0].numpy()).save(folder / f"{i}.png")
    out = tmp_path / "run"
    code, _, err = pyro_vae(
        capsys, "fit-prior", "--checkpoint", runs / "dvae" / "checkpoint.pt", *PRIOR,
        "--dataset", "folder", "--data-dir", tmp_path / "images", "--num-workers", 0,
        "--epochs", 1, "--no-progress", "--accelerator", "cpu", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["captions"]["classes"] == ["even", "odd"]
    # images not sorted into classes have no captions to ask for
    for i in range(4):
        Image.fromarray(mnist_test.images[i, 0].numpy()).save(tmp_path / "images" / f"{i}.png")
    code, _, err = pyro_vae(
        capsys, "fit-prior", "--checkpoint", runs / "dvae" / "checkpoint.pt", *PRIOR,
        "--dataset", "folder", "--data-dir", tmp_path / "images", "--num-workers", 0, "--captions",
        "--out", tmp_path / "never",
    )  # fmt: skip
    assert_one_line_error(code, err, "--captions", "class subfolders")


def test_load_prior_rebuilds_the_prior_and_refuses_a_vae(runs):
    prior = load_prior(runs / "prior" / "checkpoint.pt")
    assert isinstance(prior, TokenPrior) and not prior.training
    assert (prior.config.vocab_size, prior.config.length, prior.config.num_classes) == (4, 4, 10)
    with pytest.raises(CheckpointError, match="holds a VAE, not a token prior"):
        load_prior(runs / "dvae" / "checkpoint.pt")


def test_generate_draws_a_row_per_class_and_completes_test_images(runs, mnist_dir, capsys):
    models = ["--checkpoint", runs / "dvae" / "checkpoint.pt"]
    models += ["--prior", runs / "prior" / "checkpoint.pt"]
    out = runs / "generated" / "all.png"
    code, _, err = pyro_vae(capsys, "generate", *models, "--caption", "all", "--n", 2, "--out", out)
    assert code == 0, err
    assert out.is_file()
    record = torch.load(out.with_suffix(".pt"), weights_only=True)
    assert record["images"].dtype == torch.uint8 and record["images"].shape == (20, 1, 28, 28)
    assert torch.equal(record["captions"], torch.arange(10).repeat_interleave(2))
    # the command draws at its documented temperature unless told otherwise, and says so
    assert (record["temperature"], record["top_k"]) == (COMMAND_TEMPERATURE, None)
    out = runs / "generated" / "completed.png"
    code, _, err = pyro_vae(
        capsys, "generate", *models, "--complete", "--data-dir", mnist_dir,
        "--num-images", 3, "--completions", 2, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert out.is_file()
    record = torch.load(out.with_suffix(".pt"), weights_only=True)
    assert record["images"].shape == (6, 1, 28, 28) and record["kept_tokens"] == 2


def test_completion_keeps_the_prefix_and_continues_it_as_the_network_says():
    from pyro_vae.cli.generate import complete

    prior = TokenPrior(vocab_size=5, length=6, num_classes=3, n_layer=2, n_head=2, n_embd=8)
    for parameter in prior.parameters():  # large weights: logits far apart, no near-ties
        torch.nn.init.normal_(parameter)
    prior.eval()
    prefix, captions = torch.randint(0, 5, (7, 2)), torch.arange(7) % 3
    filled = complete(prior, prefix, captions, top_k=2)
    assert filled.shape == (7, 6) and torch.equal(filled[:, :2], prefix)
    assert filled.min() >= 0 and filled.max() < 5
    # greedy (top_k=1) with the cache = the most likely next token of a full pass, each step
    greedy = complete(prior, prefix, captions, top_k=1)
    net = prior.distribution(captions).net
    for i in range(2, 6):
        assert torch.equal(greedy[:, i], net(captions, greedy[:, :i])[:, -1].argmax(-1))


def test_errors_are_one_line(runs, mnist_dir, tmp_path, capsys):
    dvae = runs / "dvae" / "checkpoint.pt"
    # an unconditional prior takes no --caption
    code, _, err = pyro_vae(
        capsys, "fit-prior", "--checkpoint", dvae, *PRIOR, *DATA, "--data-dir", mnist_dir,
        "--epochs", 1, "--no-captions", "--codes", "argmax", "--out", tmp_path / "plain",
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert metrics["captions"] is None and metrics["tokens"]["codes"] == "the most likely codes"
    plain = tmp_path / "plain" / "checkpoint.pt"
    code, _, err = pyro_vae(
        capsys, "generate", "--checkpoint", dvae, "--prior", plain, "--caption", 3,
        "--out", tmp_path / "x.png",
    )  # fmt: skip
    assert_one_line_error(code, err, "--caption", "unconditional")
    # a Gaussian VAE has no tokens
    gaussian = ["fit", "--latent-dim", 2, "--hidden", 16, *DATA, "--limit", 200, "--epochs", 1]
    code, _, err = pyro_vae(
        capsys, *gaussian, "--data-dir", mnist_dir, "--out", tmp_path / "gaussian"
    )
    assert code == 0, err
    code, _, err = pyro_vae(
        capsys, "fit-prior", "--checkpoint", tmp_path / "gaussian" / "checkpoint.pt",
        *DATA, "--data-dir", mnist_dir, "--out", tmp_path / "never",
    )  # fmt: skip
    assert_one_line_error(code, err, "'gaussian'", "relaxed-categorical")
    # a VAE checkpoint where the prior's should be
    code, _, err = pyro_vae(
        capsys, "generate", "--checkpoint", dvae, "--prior", dvae, "--out", tmp_path / "y.png"
    )
    assert_one_line_error(code, err, "not a token prior")
    # neither source of tokens
    code, _, err = pyro_vae(capsys, "fit-prior", "--out", tmp_path / "none")
    assert_one_line_error(code, err, "--checkpoint", "--tokens")


def test_the_new_commands_are_listed(capsys):
    code, out, _ = pyro_vae(capsys, "--help")
    assert code == 0 and "\n  fit-prior " in out and "\n  generate " in out


def test_evaluate_and_ppc_take_the_prior_and_write_beside_it(runs, mnist_dir, capsys):
    dvae, prior = runs / "dvae" / "checkpoint.pt", runs / "prior" / "checkpoint.pt"
    common = ["--checkpoint", dvae, "--prior", prior, "--data-dir", mnist_dir]
    code, out, err = pyro_vae(
        capsys, "evaluate", *common, "--limit", 30, "--particles", 10, "--no-progress",
        "--no-plots",
    )  # fmt: skip
    assert code == 0, err
    record = json.loads((runs / "prior" / "evaluation.json").read_text())
    assert record["prior"] == str(prior) and record["kl_per_unit"] is None
    assert record["log_likelihood"] < 0 and math.isfinite(record["kl"])
    assert not (runs / "dvae" / "evaluation.json").exists()  # the VAE's own folder is left alone
    code, out, err = pyro_vae(capsys, "ppc", *common, "--images", 10, "--draws", 5)
    assert code == 0, err
    assert json.loads((runs / "prior" / "ppc" / "ppc.json").read_text())["prior"] == str(prior)
