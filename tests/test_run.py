"""The run described once: Run's checks and round trip, the learning-rate schedule, the
precision a run records and the precision a checkpoint loads in, the public signatures."""

from __future__ import annotations

import inspect
import json
import math

import pyro
import pytest
import torch

from pyro_vae import VAE, History, Run, UsageError, fit, load_vae
from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.devices import make_fabric
from pyro_vae.ssvae import SSVAE, balanced_labels, fit_ssvae, load_ssvae


def test_a_run_round_trips_through_json_and_names_unknown_settings():
    run = Run(
        epochs=3, lr=2e-3, lr_schedule="cosine", accelerator="cpu", devices=[0, 1],
        loggers=["csv", "csv", "tensorboard"], log_dir="logs", checkpoint="c.pt",
    )  # fmt: skip
    assert run.devices == (0, 1) and run.loggers == ("csv", "tensorboard")
    assert Run.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    with pytest.raises(UsageError, match="unknown Run field.*batch_size"):
        Run.from_dict({**run.to_dict(), "batch_size": 3})


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"lr": math.nan}, "lr=nan"),
        ({"lr": math.inf}, "lr=inf"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"epochs": 0}, "epochs=0"),
        ({"lr_schedule": "linear"}, "unknown lr_schedule"),
        ({"precision": "8-bit"}, "unknown precision"),
        ({"loggers": ["wandb"], "log_dir": "x"}, "unknown logger"),
        ({"loggers": ["csv"]}, "log_dir"),
        ({"resume": True}, "resume=True needs a checkpoint"),
        ({"accelerator": "cuda:1", "devices": 2}, "names one device"),
    ],
)
def test_a_bad_setting_is_a_usage_error_that_names_it(settings, match):
    with pytest.raises(UsageError, match=match):
        Run(**settings)


def test_a_device_shorthand_names_the_accelerator_and_the_index():
    run = Run(accelerator="cuda:1")
    assert (run.accelerator, run.devices) == ("cuda", (1,))


def test_the_cosine_schedule_falls_from_lr_to_zero_and_training_follows_it():
    run = Run(lr=1e-2, lr_schedule="cosine", epochs=2, accelerator="cpu", progress=False)
    assert run.lr_at(0, 100) == pytest.approx(1e-2)
    assert run.lr_at(50, 100) == pytest.approx(5e-3)
    assert run.lr_at(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert Run(lr=1e-2).lr_at(99, 100) == 1e-2
    images = (torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    history = fit(VAE(latent_dim=2, hidden=8), images, batch_size=16, run=run)
    # 4 steps an epoch, 8 in all: the last step of epoch 1 is step 3, of epoch 2 step 7
    assert history.column("lr") == pytest.approx([run.lr_at(3, 8), run.lr_at(7, 8)])


def test_16_mixed_on_the_cpu_is_refused_rather_than_run_as_bf16():
    """Fabric would warn and run bf16-mixed, while the run folder said 16-mixed."""
    with pytest.raises(UsageError, match="16-mixed.*CUDA.*bf16-mixed"):
        make_fabric(Run(accelerator="cpu", precision="16-mixed"))
    images = torch.rand(8, 1, 28, 28).round()
    with pytest.raises(UsageError, match="16-mixed"):
        fit(VAE(latent_dim=2, hidden=8), images, run=Run(accelerator="cpu", precision="16-mixed"))


def test_a_float64_checkpoint_loads_in_float64_with_its_weights_unrounded(tmp_path):
    images = (torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    vae = VAE(latent_dim=2, hidden=8)
    run = Run(epochs=1, precision="64-true", accelerator="cpu", progress=False)
    fit(vae, images.double(), batch_size=32, run=run.replace(checkpoint=str(tmp_path / "c.pt")))
    stored = load_checkpoint(tmp_path / "c.pt")["model"]
    loaded = load_vae(tmp_path / "c.pt")
    assert next(loaded.parameters()).dtype == torch.float64
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, stored[name]), name  # bit for bit: not via float32
    # rounding through float32 would change them: the test can tell
    weight = stored["encoder.net.1.weight"]
    assert not torch.equal(weight.float().double(), weight)


def test_an_ssvae_float64_checkpoint_loads_in_float64(tmp_path):
    pool = (torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).byte()
    labels = torch.arange(40) % 2
    labelled = balanced_labels(labels, 2)
    pyro.set_rng_seed(0)
    ssvae = SSVAE(latent_dim=2, hidden=8, num_classes=2)
    run = Run(epochs=1, precision="64-true", accelerator="cpu", progress=False)
    path = tmp_path / "m2.pt"
    fit_ssvae(ssvae, pool[labelled], labels[labelled], pool, run=run.replace(checkpoint=path))
    loaded = load_ssvae(path)
    assert next(loaded.parameters()).dtype == torch.float64
    stored = load_checkpoint(path)["model"]
    assert all(torch.equal(v, stored[k]) for k, v in loaded.state_dict().items())


def test_fit_and_fit_ssvae_return_the_same_history_type_with_device_and_rank():
    images = (torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).byte()
    labels = torch.arange(40) % 2
    run = Run(epochs=1, accelerator="cpu", progress=False)
    vae_history = fit(VAE(latent_dim=2, hidden=8), images, images[:10], run=run)
    ssvae = SSVAE(latent_dim=2, hidden=8, num_classes=2)
    ssvae_history = fit_ssvae(ssvae, images[:4], labels[:4], images, (images, labels), run=run)
    for history in (vae_history, ssvae_history):
        assert type(history) is History and history.device == "cpu" and history.rank == 0
        assert history.epochs[0].epoch == 1 and history.epochs[0].step > 0
    assert vae_history.epochs[0].test_elbo < 0
    assert 0 <= ssvae_history.epochs[0].test_accuracy <= 1
    assert "test accuracy" in ssvae_history.epochs[0].summary(1)
    again = History.from_rows(ssvae_history.to_rows())
    assert again.epochs == ssvae_history.epochs


@pytest.mark.parametrize("function", [fit, fit_ssvae])
def test_public_training_functions_take_at_most_twelve_parameters(function):
    parameters = inspect.signature(function).parameters
    assert len(parameters) <= 12 and "run" in parameters
