"""The VAE driven the way users drive it outside fit(): their own SVI loops, a second
model of the same name, the decoder inside their own model, odd dtypes and data types,
and vectors instead of images. Each test here failed on the code before issue 10."""

from __future__ import annotations

import json
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.optim import Adam
from torch.utils.data import TensorDataset

from pyro_vae import (
    VAE,
    DataError,
    Run,
    UsageError,
    fit,
    load_checkpoint,
    load_vae,
    save_checkpoint,
)
from tests.helpers import run_script


def binary(n: int = 64, shape=(1, 28, 28), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, *shape, generator=generator) < 0.3).float()


def snapshot(vae) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in vae.named_parameters()}


def train_with_svi(vae, x: torch.Tensor, steps: int = 5) -> None:
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(steps):
        svi.step(x)


def moved(before: dict[str, torch.Tensor], vae) -> list[str]:
    return [name for name, p in vae.named_parameters() if not torch.equal(before[name], p)]


# ------------------------------------------------------------ item 1: the param store
def test_a_second_vae_of_the_same_name_trains_in_a_user_svi_loop():
    """A notebook cell run twice: the second VAE() must train its own weights."""
    x = binary()
    first = VAE(latent_dim=4, hidden=32)
    train_with_svi(first, x)
    second = VAE(latent_dim=4, hidden=32)
    before, first_before = snapshot(second), snapshot(first)
    with pytest.warns(UserWarning, match="another model named 'vae'"):
        train_with_svi(second, x)
    assert sorted(moved(before, second)) == sorted(before)  # every parameter moved
    assert not moved(first_before, first)  # and the first model was left alone
    # the optimizer now holds the second model's tensors under the shared names
    store = pyro.get_param_store()
    owned = {id(p) for p in second.parameters()}
    assert all(id(store.get_param(name)) in owned for name in store.keys())


def test_training_the_first_vae_again_trains_the_first():
    x = binary()
    first, second = VAE(latent_dim=4, hidden=32), VAE(latent_dim=4, hidden=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_with_svi(first, x, 1)
        train_with_svi(second, x, 1)
        before = snapshot(first)
        train_with_svi(first, x, 3)
    assert sorted(moved(before, first)) == sorted(before)


def test_a_loaded_checkpoint_can_take_another_name(tmp_path):
    vae = VAE(latent_dim=4, hidden=32)
    save_checkpoint(tmp_path / "a.pt", vae)
    twin = load_vae(tmp_path / "a.pt", name="twin")
    assert twin.config.name == "twin" and twin.z_site == "twin.z"
    x = binary(8)
    torch.testing.assert_close(twin.reconstruct(x), vae.eval().reconstruct(x))
    with pytest.raises(UsageError, match="name"):
        load_vae(tmp_path / "a.pt", name="has space")


# ------------------------------------------------------------ item 2: a frozen prior
def test_svi_over_z_in_a_user_model_leaves_a_frozen_vae_bit_identical():
    vae = VAE(latent_dim=4, hidden=32)
    train_with_svi(vae, binary())
    before = snapshot(vae)
    target = binary(3, seed=1)

    def model(y):
        with pyro.plate("images", 3):
            z = pyro.sample("z", dist.Normal(torch.zeros(3, 4), 1.0).to_event(1))
            with vae.frozen():
                likelihood = vae.decoder_distribution(z)
            pyro.sample("y", likelihood, obs=y)

    def guide(y):
        loc = pyro.param("loc", torch.zeros(3, 4))
        with pyro.plate("images", 3):
            pyro.sample("z", dist.Normal(loc, 0.1).to_event(1))

    pyro.clear_param_store()
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(target) for _ in range(30)]
    assert losses[-1] < losses[0]
    assert set(pyro.get_param_store().keys()) == {"loc"}
    assert not moved(before, vae)
    assert all(p.requires_grad for p in vae.parameters())  # unfrozen again


def test_the_vae_model_inside_a_user_model_is_frozen_under_frozen():
    """poutine.condition(vae.model) inside SVI: the weights stay out of the optimizer."""
    vae = VAE(latent_dim=4, hidden=32)
    before = snapshot(vae)
    target = binary(3, seed=2)

    def model(y):
        with vae.frozen():
            poutine.condition(vae.model, data={vae.x_site: y})(batch_size=3)

    def guide(y):
        loc = pyro.param("loc", torch.zeros(3, 4))
        with pyro.plate(vae.data_site, 3):
            pyro.sample(vae.z_site, dist.Normal(loc, 0.1).to_event(1))

    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(10):
        svi.step(target)
    assert list(pyro.get_param_store().keys()) == ["loc"]
    assert not moved(before, vae)


def test_decoder_distribution_is_the_models_likelihood_with_the_learned_sigma():
    vae = VAE(latent_dim=4, hidden=32, likelihood="gaussian", sigma_init=0.3)
    z = torch.randn(5, 4)
    d = vae.decoder_distribution(z)
    assert d.event_shape == (1, 28, 28) and d.batch_shape == (5,)
    torch.testing.assert_close(d.mean, vae.decode(z))
    torch.testing.assert_close(d.stddev, torch.full_like(d.mean, 0.3))
    x = torch.rand(5, 1, 28, 28)
    trace = poutine.trace(poutine.condition(vae.model, data={vae.z_site: z})).get_trace(x)
    torch.testing.assert_close(trace.nodes[vae.x_site]["fn"].log_prob(x), d.log_prob(x))


def test_conditioning_z_sets_the_number_of_images():
    vae = VAE(latent_dim=4, hidden=32)
    z = torch.randn(6, 4)
    decoded = poutine.condition(vae.model, data={vae.z_site: z})()
    torch.testing.assert_close(decoded, vae.decode(z))
    # vectorized draws of z keep their leading dimensions
    draws = torch.randn(3, 6, 4)
    trace = poutine.trace(poutine.condition(vae.model, data={vae.z_site: draws})).get_trace()
    assert trace.nodes[vae.x_site]["value"].shape == (3, 6, 1, 28, 28)
    # Predictive conditions each posterior z the same way (it also runs the model once
    # unconditioned to count its plates, which needs batch_size)
    samples = Predictive(vae.model, posterior_samples={vae.z_site: draws})(batch_size=6)
    assert samples[vae.x_site].shape == (3, 6, 1, 28, 28)


def test_an_unbatched_z_is_an_error_not_a_lost_dimension():
    vae = VAE(latent_dim=4, hidden=32)
    with pytest.raises(UsageError, match=r"\(batch, 4\)"):
        poutine.condition(vae.model, data={vae.z_site: torch.randn(4)})(batch_size=1)
    with pytest.raises(UsageError, match=r"\(batch, 4\)"):
        poutine.condition(vae.model, data={vae.z_site: torch.randn(4)})()
    with pytest.raises(UsageError, match="batch_size=2"):
        poutine.condition(vae.model, data={vae.z_site: torch.randn(3, 4)})(batch_size=2)
    # a z of the right batch but another latent size, with batch_size given or not
    for call in ({"batch_size": 3}, {}):
        with pytest.raises(UsageError, match=r"\(batch, 4\)"):
            poutine.condition(vae.model, data={vae.z_site: torch.randn(3, 7)})(**call)


# ------------------------------------------------------------ item 3: seeds
def test_fit_script_twice_with_one_seed_writes_identical_results(mnist_dir, tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        code = run_script(
            "fit.py", "--data-dir", mnist_dir, "--out", out, "--epochs", "1", "--limit", "512",
            "--test-limit", "256", "--latent-dim", "4", "--hidden", "32", "--seed", "3",
            "--no-progress", "--device", "cpu",
        )  # fmt: skip
        assert code == 0
        metrics = json.loads((out / "metrics.json").read_text())
        metrics.pop("train_seconds")
        rows = (out / "history.csv").read_text().splitlines()
        seconds = rows[0].split(",").index("seconds")
        history = [[v for k, v in enumerate(r.split(",")) if k != seconds] for r in rows]
        runs.append((metrics, history))
    assert runs[0] == runs[1]


def test_fit_ssvae_script_twice_with_one_seed_trains_the_same_weights(mnist_dir, tmp_path):
    """As fit.py, fit_ssvae.py seeds before it builds the model (whatever ran before it
    in the process), so one seed gives one run."""
    weights = []
    for i in range(2):
        torch.manual_seed(100 + i)  # what ran before must not matter
        out = tmp_path / f"run{i}"
        code = run_script(
            "fit_ssvae.py", "--data-dir", mnist_dir, "--out", out, "--epochs", "1",
            "--limit", "300", "--test-limit", "100", "--labels-per-class", "2",
            "--latent-dim", "4", "--hidden", "16", "--seed", "3", "--no-progress",
            "--device", "cpu",
        )  # fmt: skip
        assert code == 0
        weights.append(load_checkpoint(out / "checkpoint.pt")["model"])
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


def test_seeding_before_building_reproduces_a_python_run():
    x = binary(128)
    results = []
    for _ in range(2):
        pyro.set_rng_seed(5)
        vae = VAE(latent_dim=4, hidden=32)
        history = fit(vae, x, x[:32], batch_size=32, run=Run(epochs=1, seed=5, progress=False))
        results.append(history.epochs[-1].test_elbo)
    assert results[0] == results[1]


# ------------------------------------------------------------ item 4: types and modes
def test_uint8_images_in_the_model_name_the_fix():
    vae = VAE(latent_dim=4, hidden=32)
    images = (binary(4) * 255).to(torch.uint8)
    for program in (vae.model, vae.guide):
        with pytest.raises(DataError, match="uint8.*preprocess"):
            program(images)


def test_float32_images_in_a_float64_model_name_the_fix():
    vae = VAE(latent_dim=4, hidden=32).double()
    with pytest.raises(DataError, match="float64"):
        vae.model(binary(4))


def test_nan_images_in_the_model_are_named_as_data():
    vae = VAE(latent_dim=4, hidden=32)
    x = binary(4)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        vae.model(x)
    with pytest.raises(DataError, match="NaN"):
        Trace_ELBO().loss(vae.model, vae.guide, x)


def test_fit_takes_a_dataset_of_image_label_pairs():
    images = (binary(96) * 255).to(torch.uint8)
    labels = torch.zeros(96, dtype=torch.long)
    vae = VAE(latent_dim=4, hidden=32)
    data = TensorDataset(images, labels)
    run = Run(epochs=1, progress=False)
    history = fit(vae, data, batch_size=32, num_workers=0, run=run)
    assert len(history.epochs) == 1 and history.epochs[0].train_loss > 0


def test_a_float64_model_fits_uint8_images():
    images = (binary(96) * 255).to(torch.uint8)
    vae = VAE(latent_dim=4, hidden=32).double()
    history = fit(vae, images, images[:32], batch_size=32, run=Run(epochs=1, progress=False))
    assert next(vae.parameters()).dtype == torch.float64
    assert history.epochs[0].test_elbo < 0


def test_a_loaded_relaxed_categorical_model_in_eval_mode_refuses_svi(tmp_path):
    vae = VAE(latent="relaxed-categorical", groups=3, classes=4, hidden=32)
    save_checkpoint(tmp_path / "c.pt", vae)
    loaded = load_vae(tmp_path / "c.pt")
    assert not loaded.training
    with pytest.raises(UsageError, match=r"vae\.train\(\)"):
        train_with_svi(loaded, binary(8), 1)
    # evaluation in eval mode is what eval mode is for, with or without gradients
    with torch.no_grad():
        Trace_ELBO().loss(loaded.model, loaded.guide, binary(8))
    codes = loaded.guide(binary(8))
    assert ((codes == 0) | (codes == 1)).all()
    loaded.train()
    train_with_svi(loaded, binary(8), 1)


def test_fit_with_zero_epochs_says_it_did_nothing():
    with pytest.raises(UsageError, match="epochs"):
        fit(VAE(latent_dim=4, hidden=32), binary(32), run=Run(epochs=0, progress=False))


# ------------------------------------------------------------ item 8: vectors
def test_a_gaussian_vae_of_vectors_fits_tabular_data():
    generator = torch.Generator().manual_seed(0)
    # 8 features on two latent factors, far outside [0, 1]
    factors = torch.randn(512, 2, generator=generator)
    data = 50.0 + 20.0 * factors @ torch.randn(2, 8, generator=generator)
    data = data + torch.randn(512, 8, generator=generator)
    vae = VAE(image_shape=(8,), likelihood="gaussian", latent_dim=2, hidden=32, sigma_init=5.0)
    assert vae.x_site == "vae.x"
    run = Run(epochs=30, lr=1e-2, progress=False)
    history = fit(vae, data[:448], data[448:], batch_size=64, run=run)
    first, last = history.epochs[0].test_elbo, history.epochs[-1].test_elbo
    assert last > first + 20
    assert vae.sample(5).shape == (5, 8)
    assert vae.reconstruct(data[:5]).shape == (5, 8)


def test_a_gaussian_scale_far_from_the_data_is_named_with_the_fix():
    data = 1000.0 + 300.0 * torch.randn(64, 8)
    vae = VAE(image_shape=(8,), likelihood="gaussian", latent_dim=2, hidden=32)
    with pytest.raises(DataError, match="sigma_init"):
        fit(vae, data, run=Run(epochs=1, progress=False))


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli"])
def test_other_likelihoods_take_vectors_too(likelihood):
    vae = VAE(image_shape=(10,), likelihood=likelihood, latent_dim=2, hidden=16)
    x = binary(6, (10,))
    assert Trace_ELBO().loss(vae.model, vae.guide, x) > 0


def test_conv_needs_images():
    with pytest.raises(UsageError, match="conv"):
        VAE(image_shape=(8,), arch="conv")
