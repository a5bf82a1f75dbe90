"""The M2 semi-supervised VAE: its enumerated ELBO, labelled and generative modes,
checkpoints, and scripts/fit_ssvae.py. Its MNIST accuracy is tested in the
composability guide (tests/test_composability.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from pyro_vae import VAE, CheckpointError, DataError, Run, save_checkpoint
from pyro_vae.ssvae import SSVAE, active_code_dims, balanced_labels, fit_ssvae, load_ssvae
from tests.helpers import run_script


def tiny(num_classes: int = 3) -> SSVAE:
    return SSVAE(image_shape=(1, 4, 4), latent_dim=2, hidden=8, num_classes=num_classes)


def tiny_stacked(num_classes: int = 3, code_dims: list[int] | None = None) -> SSVAE:
    """M1 + M2: a tiny M2 on (some of) the codes of a tiny base VAE."""
    base = VAE(image_shape=(1, 4, 4), latent_dim=3, hidden=8)
    return SSVAE(
        image_shape=(1, 4, 4),
        latent_dim=2,
        hidden=8,
        likelihood="gaussian",
        gaussian_sigma="pixel",
        sigma_init=0.5,
        num_classes=num_classes,
        base=base,
        code_dims=code_dims,
    )


def test_enumerated_elbo_is_the_label_average_plus_entropy():
    """-U(x) = sum_y q(y|x) (-ELBO(x, y)) - H(q(y|x)): TraceEnum_ELBO sums y out exactly."""
    pyro.set_rng_seed(0)
    ssvae = tiny()
    x = (torch.rand(1, 1, 4, 4) < 0.5).float()
    particles = {"num_particles": 20000, "vectorize_particles": True}
    enumerated = TraceEnum_ELBO(max_plate_nesting=1, **particles).loss(ssvae.model, ssvae.guide, x)
    q = torch.softmax(ssvae.classifier(x), -1).squeeze(0).detach()
    per_label = torch.tensor(
        [
            Trace_ELBO(max_plate_nesting=1, **particles).loss(
                ssvae.model, ssvae.guide, x, torch.tensor([label])
            )
            for label in range(3)
        ]
    )
    expected = (q * per_label).sum() + (q * q.log()).sum()
    assert enumerated == pytest.approx(expected.item(), abs=0.05)
    # and it is not the plain labelled loss of any single label
    assert min(abs(enumerated - loss) for loss in per_label.tolist()) > 0.05


def test_labelled_batch_observes_the_label():
    ssvae = tiny()
    x, y = torch.zeros(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    guide_trace = poutine.trace(ssvae.guide).get_trace(x, y)
    assert ssvae.y_site not in guide_trace.nodes
    model_trace = poutine.trace(poutine.replay(ssvae.model, trace=guide_trace)).get_trace(x, y)
    site = model_trace.nodes[ssvae.y_site]
    assert site["is_observed"] and torch.equal(site["value"], y)
    assert torch.allclose(site["fn"].log_prob(y), torch.full((5,), -torch.log(torch.tensor(3.0))))


def test_generation_conditions_on_the_given_labels():
    ssvae = tiny()
    y = torch.tensor([2, 0])
    z = torch.randn(2, 2)
    means = poutine.condition(ssvae.model, data={ssvae.z_site: z})(y=y)
    expected = torch.sigmoid(ssvae.decoder(torch.cat([z, torch.eye(3)[y]], -1)))
    assert torch.allclose(means, expected)
    trace = poutine.trace(ssvae.model).get_trace(batch_size=7)
    assert trace.nodes[ssvae.y_site]["value"].shape == (7,)
    assert trace.nodes[ssvae.x_site]["value"].shape == (7, 1, 4, 4)
    with pytest.raises(ValueError, match="one label per image"):
        ssvae.model(torch.zeros(3, 1, 4, 4), torch.tensor([0, 1]))


def test_stacked_model_explains_the_base_code_and_the_base_decoder_the_image():
    """M1 + M2: the guide draws the code from the base encoder; the model scores that code
    under M2's Gaussian given (y, z) on the modelled dimensions (0 and 2 here) and under
    N(0, 1) on the rest, and the image under the base decoder given the code."""
    pyro.set_rng_seed(1)
    ssvae = tiny_stacked(code_dims=[2, 0])
    base = ssvae.base
    x, y = (torch.rand(4, 1, 4, 4) < 0.5).float(), torch.tensor([0, 2, 1, 1])
    guide_trace = poutine.trace(ssvae.guide).get_trace(x, y)
    code = guide_trace.nodes[base.z_site]["value"]
    assert code.shape == (4, 3)
    assert torch.allclose(guide_trace.nodes[base.z_site]["fn"].mean, base.encode(x))
    model_trace = poutine.trace(poutine.replay(ssvae.model, trace=guide_trace)).get_trace(x, y)
    model_trace.compute_log_prob()
    z = model_trace.nodes[ssvae.z_site]["value"]
    mean = ssvae.decoder(torch.cat([z, torch.eye(3)[y]], -1))
    assert ssvae.code_dims == [0, 2] and mean.shape == (4, 2)
    sigma = ssvae.likelihood.sigma
    normal = torch.distributions.Normal
    expected_code = normal(mean, sigma).log_prob(code[:, [0, 2]]).sum(-1)
    expected_code += normal(0.0, 1.0).log_prob(code[:, 1])
    assert torch.allclose(model_trace.nodes[base.z_site]["log_prob"], expected_code)
    image = model_trace.nodes[ssvae.x_site]
    assert ssvae.x_site == base.x_site and image["is_observed"]
    expected_image = base.likelihood.distribution(base.decoder(code)).log_prob(x)
    assert torch.allclose(image["log_prob"], expected_image)
    # with y unobserved and enumerated, the code is scored under every label at once
    enum_guide = poutine.trace(poutine.enum(ssvae.guide, first_available_dim=-2)).get_trace(x)
    code = enum_guide.nodes[base.z_site]["value"]
    labels = enum_guide.nodes[ssvae.y_site]["value"]
    assert labels.shape == (3, 1) and code.shape == (4, 3)
    enum_model = poutine.trace(poutine.replay(ssvae.model, trace=enum_guide)).get_trace(x)
    enum_model.compute_log_prob()
    z = enum_model.nodes[ssvae.z_site]["value"]
    one_hot = torch.eye(3)[labels.squeeze(1)][:, None].expand(3, 4, 3)  # (label, image, 3)
    mean = ssvae.decoder(torch.cat([z, one_hot], -1))
    expected_code = normal(mean, sigma).log_prob(code[:, [0, 2]]).sum(-1)
    expected_code += normal(0.0, 1.0).log_prob(code[:, 1])
    assert expected_code.shape == (3, 4)
    assert torch.allclose(enum_model.nodes[base.z_site]["log_prob"], expected_code)
    enumerated = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        ssvae.model, ssvae.guide, x
    )
    assert torch.isfinite(enumerated)
    assert ssvae.model(batch_size=5).shape == (5, 1, 4, 4)


def test_stacked_model_checks_its_base_and_leaves_it_alone():
    base = VAE(image_shape=(1, 4, 4), latent_dim=3, hidden=8)
    stacked = SSVAE(image_shape=(1, 4, 4), likelihood="gaussian", base=base)
    # the SSVAE froze its own copy; the VAE passed in still trains as before
    assert stacked.base is not base and not stacked.base.training
    assert base.training and all(p.requires_grad for p in base.parameters())
    assert torch.equal(stacked.base.decoder.net[0].weight, base.decoder.net[0].weight)
    with pytest.raises(ValueError, match="must be 'gaussian'"):
        SSVAE(image_shape=(1, 4, 4), latent_dim=2, base=base)
    with pytest.raises(ValueError, match="differs from the base"):
        SSVAE(latent_dim=2, likelihood="gaussian", base=base)
    with pytest.raises(ValueError, match="share the name"):
        SSVAE(image_shape=(1, 4, 4), likelihood="gaussian", name="vae", base=base)
    discrete = VAE(image_shape=(1, 4, 4), latent="relaxed-categorical", groups=2, classes=3)
    with pytest.raises(ValueError, match="'gaussian' latent"):
        SSVAE(image_shape=(1, 4, 4), likelihood="gaussian", base=discrete)
    for dims in ([], [0, 0], [3], [0.5]):
        with pytest.raises(ValueError, match="code_dims must be distinct"):
            SSVAE(image_shape=(1, 4, 4), likelihood="gaussian", base=base, code_dims=dims)
    with pytest.raises(ValueError, match="pass base too"):
        SSVAE(image_shape=(1, 4, 4), code_dims=[0])


def test_active_code_dims_leave_out_a_code_the_encoder_ignores():
    torch.manual_seed(0)
    base = VAE(image_shape=(1, 4, 4), latent_dim=3, hidden=8)
    with torch.no_grad():  # codes 0 and 2 follow the image; code 1 no longer does
        base.encoder.net[3].weight[[0, 2]] *= 20.0
        base.encoder.net[3].weight[1] = 0.0
    images = (torch.rand(200, 1, 4, 4) * 255).to(torch.uint8)
    assert active_code_dims(base, images) == [0, 2]
    assert active_code_dims(base, images, threshold=1e-9) == [0, 2]
    with torch.no_grad():
        base.encoder.net[3].weight[:3] = 0.0
    with pytest.raises(DataError, match="collapsed to its prior"):
        active_code_dims(base, images)


def test_balanced_labels():
    labels = torch.arange(10).repeat(20)
    chosen = balanced_labels(labels, per_class=3, seed=1)
    assert chosen.unique().numel() == 30
    assert torch.equal(torch.bincount(labels[chosen]), torch.full((10,), 3))
    with pytest.raises(DataError, match="fewer than 30"):
        balanced_labels(labels, per_class=30)


def dark_and_bright() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two classes of 4x4 images, dark and bright, and 2 labelled images of each:
    (images, labels, indices of the labelled ones)."""
    images = torch.cat([torch.full((40, 1, 4, 4), 30), torch.full((40, 1, 4, 4), 220)])
    labels = torch.cat([torch.zeros(40), torch.ones(40)]).long()
    return images.to(torch.uint8), labels, balanced_labels(labels, per_class=2)


def fit_dark_and_bright(ssvae: SSVAE, epochs: int, checkpoint: Path) -> list:
    """fit_ssvae on :func:`dark_and_bright`, tested on all of its images."""
    images, labels, chosen = dark_and_bright()
    return fit_ssvae(
        ssvae,
        images[chosen],
        labels[chosen],
        images,
        (images, labels),
        batch_size=20,
        run=Run(epochs=epochs, lr=1e-2, accelerator="cpu", checkpoint=checkpoint),
    )


def test_fit_and_checkpoint_round_trip(tmp_path: Path):
    torch.manual_seed(0)
    ssvae = tiny(num_classes=2)
    # the classifier tells the dark images from the bright ones after training
    history = fit_dark_and_bright(ssvae, epochs=10, checkpoint=tmp_path / "ssvae.pt")
    assert [record.epoch for record in history.epochs] == list(range(1, 11))
    assert history.epochs[-1].test_accuracy > 0.95
    loaded = load_ssvae(tmp_path / "ssvae.pt")
    x = (torch.rand(8, 1, 4, 4) < 0.5).float()
    assert torch.equal(loaded.classifier(x), ssvae.classifier(x))
    save_checkpoint(tmp_path / "vae.pt", VAE(image_shape=(1, 4, 4), latent_dim=2, hidden=8))
    with pytest.raises(CheckpointError, match="not an SSVAE"):
        load_ssvae(tmp_path / "vae.pt")
    images, labels, chosen = dark_and_bright()
    with pytest.raises(DataError, match="binary pixels"):
        grey = images.float() / 255
        fit_ssvae(ssvae, grey[chosen], labels[chosen], grey, run=Run(epochs=1, accelerator="cpu"))
    with pytest.raises(DataError, match="labels must lie"):
        fit_ssvae(
            ssvae, images[:2], torch.tensor([0, 5]), images, run=Run(epochs=1, accelerator="cpu")
        )


def test_stacked_fit_trains_m2_alone_and_round_trips(tmp_path: Path, recwarn):
    torch.manual_seed(0)
    ssvae = tiny_stacked(num_classes=2, code_dims=[1, 2])
    base_before = {k: v.clone() for k, v in ssvae.base.state_dict().items()}
    m2_before = ssvae.classifier.net[1].weight.clone()
    fit_dark_and_bright(ssvae, epochs=2, checkpoint=tmp_path / "m1m2.pt")
    # the base is frozen and stays in eval mode, so Pyro has nothing to warn about
    assert all(torch.equal(v, base_before[k]) for k, v in ssvae.base.state_dict().items())
    assert not torch.equal(ssvae.classifier.net[1].weight, m2_before)
    ssvae.train()
    assert ssvae.training and not ssvae.base.training
    assert not [w for w in recwarn if "param store" in str(w.message)]
    loaded = load_ssvae(tmp_path / "m1m2.pt")
    assert loaded.base is not None and loaded.base.config == ssvae.base.config
    assert loaded.code_dims == [1, 2]
    x = (torch.rand(8, 1, 4, 4) < 0.5).float()
    assert torch.equal(loaded.classify(x), ssvae.classify(x))
    assert torch.equal(loaded.base.encode(x), ssvae.base.encode(x))


@pytest.mark.mnist
def test_fit_ssvae_script(tmp_path: Path, mnist_dir: Path, capsys):
    root = mnist_dir
    out = tmp_path / "run"
    args = ["--data-dir", str(root), "--limit", "500", "--test-limit", "200", "--epochs", "1"]
    args += ["--hidden", "32", "--latent-dim", "4", "--labels-per-class", "2", "--out", str(out)]
    assert run_script("fit_ssvae.py", *args) == 0
    assert "test accuracy" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labelled_images"] == 20 and metrics["unlabelled_images"] == 480
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["epochs"] == 1
    # the device it ran on, not the option's "auto"
    assert metrics["accelerator"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert load_ssvae(out / "checkpoint.pt").num_classes == 10
    assert run_script("fit_ssvae.py", *args) == 2
    assert "already holds a run" in capsys.readouterr().err
    # M1 + M2 on a VAE checkpoint; an untrained VAE has no active code, and says so
    m1 = VAE(latent_dim=6, hidden=16)
    save_checkpoint(tmp_path / "m1.pt", m1)
    stacked = [*args[:-1], str(tmp_path / "m1m2"), "--base", str(tmp_path / "m1.pt")]
    assert run_script("fit_ssvae.py", *stacked) == 2
    assert "collapsed to its prior" in capsys.readouterr().err
    with torch.no_grad():  # codes 0, 2 and 3 now follow the image
        m1.encoder.net[3].weight[[0, 2, 3]] *= 50.0
    save_checkpoint(tmp_path / "m1.pt", m1)
    assert run_script("fit_ssvae.py", *stacked) == 0
    assert "M2 models 3 of the base's 6 code dimensions" in capsys.readouterr().out
    loaded = load_ssvae(tmp_path / "m1m2" / "checkpoint.pt")
    metrics = json.loads((tmp_path / "m1m2" / "metrics.json").read_text())
    assert loaded.base is not None and loaded.code_dims == metrics["code_dims"] == [0, 2, 3]
    assert metrics["base"].endswith("m1.pt")
    assert run_script("fit_ssvae.py", *args[:-1], str(tmp_path / "bad"), "--all-codes") == 2
    assert "pass --base too" in capsys.readouterr().err
    bad = [*stacked[:-3], str(tmp_path / "bad"), *stacked[-2:], "--likelihood", "bernoulli"]
    assert run_script("fit_ssvae.py", *bad) == 2
    assert "--likelihood gaussian" in capsys.readouterr().err


def test_resuming_with_other_classes_base_or_code_dims_is_refused(tmp_path):
    """A checkpoint belongs to one SSVAE: resuming it with another number of classes, other
    code dimensions or another base VAE stops with the differences named, instead of
    loading weights into a model they were not trained for."""
    torch.manual_seed(0)
    images = torch.rand(12, 1, 4, 4).round()
    labels = torch.arange(12) % 3
    path = tmp_path / "m2.pt"
    options = {"batch_size": 6}
    run = Run(epochs=1, accelerator="cpu", progress=False)
    fit_ssvae(
        tiny_stacked(code_dims=[0, 2]),
        images[:6],
        labels[:6],
        images,
        **options,
        run=run.replace(checkpoint=path),
    )
    for other, named in (
        (tiny_stacked(num_classes=4, code_dims=[0, 2]), "num_classes"),
        (tiny_stacked(code_dims=[0, 1]), "code_dims"),
    ):
        with pytest.raises(CheckpointError, match=named):
            fit_ssvae(
                other,
                images[:6],
                labels[:6] % other.num_classes,
                images,
                **options,
                run=run.replace(checkpoint=path, resume=True),
            )
    wider = VAE(image_shape=(1, 4, 4), latent_dim=3, hidden=16)
    other = SSVAE(
        image_shape=(1, 4, 4),
        latent_dim=2,
        hidden=8,
        likelihood="gaussian",
        gaussian_sigma="pixel",
        sigma_init=0.5,
        num_classes=3,
        base=wider,
        code_dims=[0, 2],
    )
    with pytest.raises(CheckpointError, match="base_config"):
        fit_ssvae(
            other,
            images[:6],
            labels[:6],
            images,
            **options,
            run=run.replace(checkpoint=path, resume=True),
        )
    # a checkpoint from before a config field existed reads as that field's default
    state = torch.load(path, weights_only=True)
    del state["base_config"]["sigma_floor"]
    torch.save(state, path)
    history = fit_ssvae(
        tiny_stacked(code_dims=[0, 2]),
        images[:6],
        labels[:6],
        images,
        **options,
        run=run.replace(epochs=2, checkpoint=path, resume=True),
    )
    assert [record.epoch for record in history.epochs] == [1, 2]
