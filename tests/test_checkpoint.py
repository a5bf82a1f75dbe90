"""Checkpoints: round trips, atomic writes, and clear refusals of foreign or damaged files."""

import pickle

import pytest
import torch

from pyro_vae import VAE, CheckpointError, load_checkpoint, load_vae, save_checkpoint


class Payload:
    """Stands for an arbitrary class inside a pickle: weights_only must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("options", [dict(), dict(likelihood="gaussian", arch="conv", channels=4)])
def test_round_trip_reproduces_outputs(tmp_path, options):
    vae = VAE(latent_dim=6, hidden=32, **options)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = save_checkpoint(tmp_path / "m.pt", vae, progress={"epoch": 3})
    loaded = load_vae(path)
    assert loaded.config == vae.config and not loaded.training
    x = torch.rand(4, 1, 28, 28)
    z = torch.randn(4, 6)
    torch.testing.assert_close(loaded.decode(z), vae.decode(z), rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode(x), vae.encode(x), rtol=0, atol=0)
    assert load_checkpoint(path)["progress"] == {"epoch": 3}


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    vae = VAE(latent_dim=2, hidden=8)
    path = save_checkpoint(tmp_path / "m.pt", vae)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, VAE(latent_dim=2, hidden=8))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"], "no temporary file left behind"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_foreign_damaged_and_malicious_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a pyro_vae checkpoint"):
        load_checkpoint(foreign)

    good = save_checkpoint(tmp_path / "good.pt", VAE(latent_dim=2, hidden=8))
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable pyro_vae checkpoint"):
        load_checkpoint(damaged)

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(text)

    evil = tmp_path / "evil.pt"
    torch.save({"format": "pyro_vae.checkpoint", "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(evil)
    with open(evil, "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", VAE(latent_dim=2, hidden=8))
    state = torch.load(path, weights_only=True)
    state["config"]["hidden"] = 9
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="do not fit its config"):
        load_vae(path)
    state["config"]["colour"] = "red"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="unknown VAEConfig field"):
        load_vae(path)
