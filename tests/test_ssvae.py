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

from pyro_vae import VAE, CheckpointError, DataError, save_checkpoint
from pyro_vae.ssvae import SSVAE, balanced_labels, fit_ssvae, load_ssvae
from tests.helpers import run_script


def tiny(num_classes: int = 3) -> SSVAE:
    return SSVAE(image_shape=(1, 4, 4), latent_dim=2, hidden=8, num_classes=num_classes)


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


def test_balanced_labels():
    labels = torch.arange(10).repeat(20)
    chosen = balanced_labels(labels, per_class=3, seed=1)
    assert chosen.unique().numel() == 30
    assert torch.equal(torch.bincount(labels[chosen]), torch.full((10,), 3))
    with pytest.raises(DataError, match="fewer than 30"):
        balanced_labels(labels, per_class=30)


def test_fit_and_checkpoint_round_trip(tmp_path: Path):
    torch.manual_seed(0)
    ssvae = tiny(num_classes=2)
    # two classes: dark and bright images, told apart by the classifier after training
    images = torch.cat([torch.full((40, 1, 4, 4), 30), torch.full((40, 1, 4, 4), 220)]).to(
        torch.uint8
    )
    labels = torch.cat([torch.zeros(40), torch.ones(40)]).long()
    chosen = balanced_labels(labels, per_class=2)
    history = fit_ssvae(
        ssvae,
        images[chosen],
        labels[chosen],
        images,
        (images, labels),
        epochs=10,
        batch_size=20,
        lr=1e-2,
        device="cpu",
        checkpoint=tmp_path / "ssvae.pt",
    )
    assert [record.epoch for record in history] == list(range(1, 11))
    assert history[-1].test_accuracy > 0.95
    loaded = load_ssvae(tmp_path / "ssvae.pt")
    x = (torch.rand(8, 1, 4, 4) < 0.5).float()
    assert torch.equal(loaded.classifier(x), ssvae.classifier(x))
    save_checkpoint(tmp_path / "vae.pt", VAE(image_shape=(1, 4, 4), latent_dim=2, hidden=8))
    with pytest.raises(CheckpointError, match="not an SSVAE"):
        load_ssvae(tmp_path / "vae.pt")
    with pytest.raises(DataError, match="binary pixels"):
        grey = images.float() / 255
        fit_ssvae(ssvae, grey[chosen], labels[chosen], grey, epochs=1, device="cpu")
    with pytest.raises(DataError, match="labels must lie"):
        fit_ssvae(ssvae, images[:2], torch.tensor([0, 5]), images, epochs=1, device="cpu")


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
    assert load_ssvae(out / "checkpoint.pt").num_classes == 10
    assert run_script("fit_ssvae.py", *args) == 2
    assert "already holds a run" in capsys.readouterr().err
