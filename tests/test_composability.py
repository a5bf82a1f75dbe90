"""docs/composability.md, executed: every ```python block of the guide is a test.

The first block (the setup: a small VAE fitted on MNIST) runs once per session; each
later block runs on its own copy of the names the setup defined and checks its outcome
with its own asserts. Editing the guide edits these tests, so they cannot drift apart.
Below them, the inverse-problem helpers and scripts/inpaint.py are tested directly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyro
import pytest
import torch

from pyro_vae import save_checkpoint
from pyro_vae.inverse import infer_svi, make_mask, restoration_model
from tests.helpers import run_script

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "composability.md"


def _sections() -> list[tuple[str, str]]:
    """(heading, code) of each ```python block, in the order of the guide."""
    sections, heading = [], "top"
    for match in re.finditer(
        r"^## ([^\n]+)$|^```python\n(.*?)^```$", GUIDE.read_text(), re.M | re.S
    ):
        if match.group(1):
            heading = match.group(1)
        else:
            sections.append((heading, match.group(2)))
    return sections


SETUP, *RECIPES = _sections()


@pytest.fixture(scope="session")
def setup_names(mnist_dir: Path) -> dict:
    """The names the guide's setup block defines (a fitted ``vae``, digits ``x``, ...)."""
    previous = os.environ.get("PYRO_VAE_DATA")
    os.environ["PYRO_VAE_DATA"] = str(mnist_dir)  # where the guide's load_mnist() looks
    try:
        names: dict = {"__name__": "composability_setup"}
        exec(compile(SETUP[1], f"{GUIDE.name}: {SETUP[0]}", "exec"), names)
    finally:
        if previous is None:
            del os.environ["PYRO_VAE_DATA"]
        else:
            os.environ["PYRO_VAE_DATA"] = previous
    return names


def test_guide_has_the_recipes():
    headings = [heading for heading, _ in RECIPES]
    for recipe in ("condition", "replay", "scale", "block", "Predictive", "Importance", "Jit"):
        assert any(recipe in heading for heading in headings), recipe
    for recipe in ("Two VAEs", "Inpainting", "NUTS", "Denoising", "Super-resolution"):
        assert any(recipe in heading for heading in headings), recipe
    assert any("semi-supervised" in heading for heading in headings)
    for recipe in ("param store rule", "frozen prior"):
        assert any(recipe in heading for heading in headings), recipe


@pytest.mark.mnist
@pytest.mark.parametrize("heading, code", RECIPES, ids=[h for h, _ in RECIPES])
def test_recipe(setup_names: dict, heading: str, code: str):
    names = dict(setup_names)
    try:
        exec(compile(code, f"{GUIDE.name}: {heading}", "exec"), names)
    finally:
        pyro.clear_param_store()


# ---------------------------------------------------------------- inverse problems
def test_make_mask_kinds():
    shape = (1, 28, 28)
    left = make_mask("left-half", shape)
    assert left[..., :14].all() and not left[..., 14:].any()
    top = make_mask("top-half", shape)
    assert top[:, :14].all() and not top[:, 14:].any()
    rand = make_mask("random:0.5", shape, torch.Generator().manual_seed(0))
    assert 0.4 < (~rand).float().mean() < 0.6
    for bad in ("random:1.5", "random:x", "middle"):
        with pytest.raises(ValueError, match="mask"):
            make_mask(bad, shape)


@pytest.mark.mnist
def test_hidden_pixels_never_enter_the_likelihood(setup_names: dict):
    vae, x = setup_names["vae"], setup_names["x"]
    mask = make_mask("left-half", vae.config.image_shape)
    z = torch.randn(len(x), vae.config.latent_dim)

    def log_density(images: torch.Tensor) -> torch.Tensor:
        conditioned = pyro.poutine.condition(restoration_model, data={vae.z_site: z})
        trace = pyro.poutine.trace(conditioned).get_trace(vae, images, mask)
        return trace.log_prob_sum()

    scrambled = torch.where(mask, x, torch.rand_like(x))
    assert torch.equal(log_density(x), log_density(scrambled))
    # ... while the known pixels do count
    assert not torch.equal(log_density(x), log_density(torch.where(mask, 1 - x, x)))


@pytest.mark.mnist
def test_inference_leaves_the_vae_and_param_store_alone(setup_names: dict):
    vae, x = setup_names["vae"], setup_names["x"]
    before = {name: value.clone() for name, value in vae.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in vae.parameters()]
    pyro.clear_param_store()
    pyro.param("someone_elses", torch.ones(3))
    infer_svi(vae, x[:2], make_mask("top-half", vae.config.image_shape), num_steps=20)
    assert list(pyro.get_param_store().keys()) == ["someone_elses"]
    assert all(torch.equal(value, before[name]) for name, value in vae.state_dict().items())
    assert all(p.requires_grad for p in vae.parameters())
    # no gradient reached the frozen decoder (fit() may have left some; they are unchanged)
    for p, grad in zip(vae.parameters(), grads, strict=True):
        assert (p.grad is None and grad is None) or torch.equal(p.grad, grad)
    pyro.clear_param_store()


def test_restoration_model_rejects_bad_input():
    from pyro_vae import VAE

    vae = VAE(latent_dim=2, hidden=8)
    with pytest.raises(ValueError, match="expected images of shape"):
        restoration_model(vae, torch.zeros(2, 28, 28))
    with pytest.raises(ValueError, match="noise"):
        restoration_model(vae, torch.zeros(2, 1, 28, 28), noise=0.0)


@pytest.fixture(scope="session")
def checkpoint(setup_names: dict, tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("inpaint") / "checkpoint.pt", setup_names["vae"])


@pytest.mark.mnist
def test_inpaint_script_writes_a_figure(checkpoint: Path, mnist_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "inpainting.png"
    status = run_script(
        "inpaint.py", "--checkpoint", str(checkpoint), "--data-dir", str(mnist_dir),
        "--mask", "random:0.5", "--noise", "0.3", "--num-images", "3", "--steps", "100",
        "--out", str(out),
    )  # fmt: skip
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    # it reports how close the completion came, on hidden and on noisy known pixels
    assert "hidden pixels" in printed.out and "noisy input" in printed.out


def test_inpaint_script_reports_one_line_errors(tmp_path: Path, capsys):
    missing = str(tmp_path / "missing.pt")
    assert run_script("inpaint.py", "--checkpoint", missing) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "does not exist" in err
    status = run_script("inpaint.py", "--checkpoint", missing, "--mask", "diagonal")
    assert status == 2 and "unknown mask" in capsys.readouterr().err
