"""fit(): parameters move, runs are reproducible and isolated, divergence and Ctrl-C are safe."""

import math
import os
import signal

import pyro
import pytest
import torch
from PIL import Image
from pyro.nn import pyro_method

from pyro_vae import VAE, Run, TrainingDivergedError, fit, load_checkpoint
from pyro_vae.data import ImageFolder
from pyro_vae.errors import CheckpointError, DataError
from pyro_vae.train import kl_weight_at

SMALL = dict(latent_dim=8, hidden=64)


@pytest.fixture(scope="module")
def digits(mnist_train, mnist_test):
    return mnist_train.images[:512], mnist_test.images[:256]


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "options",
    [
        dict(likelihood="bernoulli"),
        dict(likelihood="continuous-bernoulli", arch="conv", channels=4),
        dict(likelihood="gaussian", gaussian_sigma="pixel"),
    ],
)
def test_every_parameter_moves_and_the_test_elbo_improves(digits, options):
    train, test = digits
    vae = VAE(**SMALL, **options)
    before = snapshot(vae)
    history = fit(vae, train[:256], test, batch_size=32, run=Run(epochs=3, lr=3e-3, progress=False))
    after = vae.state_dict()
    for name, value in before.items():
        assert not torch.equal(value, after[name]), f"{name} did not move"
    elbos = history.column("test_elbo")
    assert elbos[-1] > elbos[0], elbos
    assert [r.epoch for r in history.epochs] == [1, 2, 3]
    assert history.epochs[-1].step == 3 * 8 and all(r.seconds > 0 for r in history.epochs)


def test_same_seed_same_weights_and_different_seed_different(digits):
    train, _ = digits
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(0)  # identical initial weights; the fit seed drives the rest
        vae = VAE(**SMALL)
        fit(vae, train[:128], batch_size=32, run=Run(epochs=1, seed=seed, progress=False))
        runs.append(vae.decoder.net[-2].weight.detach().clone())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_two_vaes_with_the_same_name_both_learn_and_leave_the_param_store_alone(digits):
    train, test = digits
    sentinel = pyro.param("vae.encoder$$$net.1.weight", torch.zeros(3))
    first, second = VAE(**SMALL), VAE(**SMALL)
    fit(first, train, batch_size=64, run=Run(epochs=2, progress=False))
    fresh = snapshot(second)
    fit(second, train, batch_size=64, run=Run(epochs=2, progress=False))
    assert pyro.get_param_store()["vae.encoder$$$net.1.weight"] is sentinel
    for name, value in fresh.items():
        assert not torch.equal(value, second.state_dict()[name])
    from pyro_vae.evaluate import elbo

    untrained = elbo(VAE(**SMALL), test.float().div(255).bernoulli()).mean()
    for vae in (first, second):
        assert elbo(vae, test.float().div(255).bernoulli()).mean() > untrained + 50


def test_fit_runs_a_subclass_model_and_reports_each_epoch(digits):
    calls = []

    class Watched(VAE):
        @pyro_method
        def model(self, x=None, **kwargs):
            calls.append(x.shape[0])
            return super().model(x, **kwargs)

    seen = []
    fit(
        Watched(**SMALL),
        digits[0][:64],
        batch_size=32,
        on_epoch=seen.append,
        run=Run(epochs=2, progress=False),
    )
    assert calls.count(32) >= 4, "fit must train the subclass's model, not the base body"
    assert [record.epoch for record in seen] == [1, 2]
    assert seen[-1].summary(2).startswith("epoch 2/2  train loss ")


def test_kl_warmup_ramps_linearly_and_is_recorded(digits):
    assert [kl_weight_at(s, 2.0, 4) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert kl_weight_at(0, 0.5, 0) == 0.5
    history = fit(
        VAE(**SMALL), digits[0][:128], batch_size=32, warmup=2, run=Run(epochs=2, progress=False)
    )
    assert history.column("kl_weight") == [0.5, 1.0]


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_divergence_stops_before_the_bad_step_and_keeps_the_last_good_checkpoint(digits, tmp_path):
    vae = VAE(**SMALL)
    path = tmp_path / "run.pt"
    fit(vae, digits[0][:128], batch_size=32, run=Run(epochs=1, checkpoint=path, progress=False))
    good = snapshot(vae)
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    vae.decoder.register_forward_hook(poison)
    with pytest.raises(TrainingDivergedError, match="at step 7") as info:
        fit(
            vae,
            digits[0][:128],
            batch_size=32,
            run=Run(epochs=2, checkpoint=path, resume=True, progress=False),
        )
    assert info.value.step == 7  # 4 steps in epoch 1, then the third of epoch 2
    saved = load_checkpoint(path)
    assert saved["progress"]["epoch"] == 1
    for name, value in good.items():
        assert torch.equal(saved["model"][name], value)
        assert torch.isfinite(vae.state_dict()[name]).all(), "the NaN step was not applied"


def test_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(digits, tmp_path):
    train, test = digits
    train = train[:256]
    torch.manual_seed(0)
    reference = VAE(**SMALL)
    fit(reference, train, test, batch_size=32, run=Run(epochs=2, progress=False))

    torch.manual_seed(0)
    vae = VAE(**SMALL)
    calls = {"n": 0}

    def press_ctrl_c(module, inputs):
        calls["n"] += 1
        if calls["n"] == 11:  # during the 3rd batch of epoch 2 (8 steps + 1 test pass each)
            os.kill(os.getpid(), signal.SIGINT)

    hook = vae.encoder.register_forward_pre_hook(press_ctrl_c)
    path = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(vae, train, test, batch_size=32, run=Run(epochs=2, checkpoint=path, progress=False))
    hook.remove()
    progress = load_checkpoint(path)["progress"]
    assert (progress["epoch"], progress["batch"], progress["step"]) == (1, 2, 10)

    resumed = VAE(**SMALL)
    history = fit(
        resumed,
        train,
        test,
        batch_size=32,
        run=Run(epochs=2, checkpoint=path, resume=True, progress=False),
    )
    assert len(history.epochs) == 2
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-6)


def test_resume_goes_on_at_the_learning_rate_asked_for(digits, tmp_path):
    path = tmp_path / "c.pt"
    fit(
        VAE(**SMALL),
        digits[0][:64],
        batch_size=32,
        run=Run(epochs=1, checkpoint=path, progress=False),
    )
    first = load_checkpoint(path)["optimizer"]
    assert first["param_groups"][0]["lr"] == 1e-3
    fit(
        VAE(**SMALL),
        digits[0][:64],
        batch_size=32,
        run=Run(epochs=2, lr=2.5e-4, checkpoint=path, resume=True, progress=False),
    )
    state = load_checkpoint(path)
    second = state["optimizer"]
    assert {group["lr"] for group in second["param_groups"]} == {2.5e-4}
    assert [row["lr"] for row in state["history"]] == [1e-3, 2.5e-4]
    # Adam's moments were carried over, not restarted: its step counts went on from 2
    assert {int(s["step"]) for s in second["state"].values()} == {4}


def test_resume_refuses_a_checkpoint_of_another_model(digits, tmp_path):
    path = tmp_path / "c.pt"
    fit(
        VAE(**SMALL),
        digits[0][:64],
        batch_size=32,
        run=Run(epochs=1, checkpoint=path, progress=False),
    )
    with pytest.raises(CheckpointError, match="latent_dim: checkpoint has 8, asked for 9"):
        fit(
            VAE(latent_dim=9, hidden=64),
            digits[0][:64],
            run=Run(epochs=2, checkpoint=path, resume=True),
        )


def test_wrong_data_is_named_before_training(digits):
    with pytest.raises(DataError, match="images are 1x32x32"):
        fit(VAE(**SMALL), torch.zeros(4, 1, 32, 32, dtype=torch.uint8), run=Run(progress=False))
    with pytest.raises(DataError, match="binary"):
        fit(VAE(**SMALL), torch.full((4, 1, 28, 28), 0.5), run=Run(progress=False))
    with pytest.raises(DataError, match="NaN"):
        fit(VAE(likelihood="gaussian", **SMALL), torch.full((4, 1, 28, 28), float("nan")))
    with pytest.raises(ValueError, match="unknown elbo"):
        fit(VAE(**SMALL), digits[0], elbo="renyi")


def test_a_folder_of_images_streams_through_a_dataloader(tmp_path):
    generator = torch.Generator().manual_seed(0)
    for i in range(40):
        pixels = (torch.rand(12, 16, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i:02d}.png")
    folder = ImageFolder(tmp_path)
    vae = VAE(image_shape=folder.image_shape, likelihood="continuous-bernoulli", **SMALL)
    before = snapshot(vae)
    history = fit(vae, folder, batch_size=16, num_workers=2, run=Run(epochs=2, progress=False))
    assert history.epochs[-1].step == 6 and math.isfinite(history.epochs[-1].train_loss)
    assert not torch.equal(before["decoder.net.0.weight"], vae.state_dict()["decoder.net.0.weight"])
