"""The same contract on a CUDA GPU; every test here skips cleanly on a machine without one."""

import pytest
import torch
from pyro import poutine

from pyro_vae import VAE, Run, fit, load_vae
from pyro_vae.evaluate import elbo, iwae_log_likelihood
from pyro_vae.ssvae import SSVAE, active_code_dims, fit_ssvae, load_ssvae

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_training_and_evaluation_stay_on_the_gpu(tmp_path, arch):
    images = (torch.rand(256, 1, 28, 28) * 255).to(torch.uint8)
    vae = VAE(arch=arch, latent_dim=8, hidden=64, channels=8)
    history = fit(
        vae,
        images,
        images[:64],
        batch_size=64,
        run=Run(epochs=2, accelerator="cuda", checkpoint=tmp_path / "c.pt", progress=False),
    )
    assert all(p.is_cuda for p in vae.parameters())
    assert history.epochs[-1].test_elbo is not None
    x = images[:8].cuda().float().div(255).bernoulli()
    trace = poutine.trace(vae.guide).get_trace(x)
    assert trace.nodes[vae.z_site]["value"].is_cuda
    assert vae.sample(4).is_cuda
    bound = iwae_log_likelihood(vae, x, num_particles=64, particle_chunk=16)
    assert bound.is_cuda and (bound >= elbo(vae, x, num_particles=64) - 1e-3).all()
    on_cpu = load_vae(tmp_path / "c.pt", map_location="cpu")
    z = torch.randn(3, 8)
    torch.testing.assert_close(on_cpu.decode(z), vae.decode(z.cuda()).cpu(), rtol=1e-4, atol=1e-5)


def test_stacked_ssvae_trains_on_the_gpu_and_loads_on_the_cpu(tmp_path):
    images = (torch.rand(120, 1, 28, 28) * 255).to(torch.uint8)
    labels = torch.arange(120) % 10
    base = VAE(latent_dim=6, hidden=32).cuda()
    with torch.no_grad():  # make codes 0, 2 and 3 follow the image
        base.encoder.net[3].weight[[0, 2, 3]] *= 50.0
    dims = active_code_dims(base, images)  # CPU images, CUDA VAE
    ssvae = SSVAE(likelihood="gaussian", latent_dim=4, hidden=32, base=base, code_dims=dims)
    fit_ssvae(
        ssvae,
        images[:20],
        labels[:20],
        images[20:],
        (images[:40], labels[:40]),
        batch_size=20,
        run=Run(epochs=1, accelerator="cuda", checkpoint=tmp_path / "m1m2.pt"),
    )
    assert all(p.is_cuda for p in ssvae.parameters()) and ssvae._code_index.is_cuda
    x = images[:8].float().div(255).bernoulli()
    on_cpu = load_ssvae(tmp_path / "m1m2.pt", map_location="cpu")
    assert on_cpu.code_dims == dims
    assert torch.equal(on_cpu.classify(x), ssvae.classify(x.cuda()).cpu())


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_on_the_gpu_stays_finite_and_near_float32(precision):
    images = (torch.rand(512, 1, 28, 28) * 255).to(torch.uint8)
    results = {}
    for name in ("32-true", precision):
        torch.manual_seed(0)
        vae = VAE(latent_dim=8, hidden=64)
        run = Run(epochs=2, accelerator="cuda", precision=name, progress=False)
        history = fit(vae, images, images[:128], batch_size=64, run=run)
        results[name] = history.epochs[-1].test_elbo
    assert abs(results[precision] - results["32-true"]) < 0.02 * abs(results["32-true"])


@pytest.mark.parametrize("latent", ["gaussian", "relaxed-categorical"])
def test_the_fused_elbo_equals_pyros_on_the_gpu(latent):
    """The fused ELBO's loss and gradients equal Pyro's Trace_ELBO on CUDA tensors too."""
    import pyro
    from pyro.infer import Trace_ELBO

    from pyro_vae.fused import FusedTrace_ELBO
    from tests.test_fused import NUM_DATA, assert_same, data_for, loss_and_grads, tiny_vae

    vae = tiny_vae(latent=latent, image_shape=(1, 8, 8)).cuda()
    x = data_for(vae).cuda()
    with pyro.validation_enabled(False):
        routes = [
            loss_and_grads(vae, lambda elbo=elbo: elbo.differentiable_loss(
                vae.model, vae.guide, x, num_data=NUM_DATA))
            for elbo in (FusedTrace_ELBO(), Trace_ELBO())
        ]  # fmt: skip
    assert routes[0][0].is_cuda
    assert_same(*routes)


@pytest.mark.parametrize("mode", [True, "reduce-overhead"])
def test_compiled_fused_training_on_the_gpu_matches_eager(mode):
    """fit(run=Run(compile=...)) on CUDA, with CUDA graphs under "reduce-overhead", reaches the
    eager run's held-out ELBO (different noise, so within 2%)."""
    images = (torch.rand(512, 1, 28, 28) * 255).to(torch.uint8)
    results = {}
    for compile in (False, mode):
        torch.manual_seed(0)
        vae = VAE(latent_dim=8, hidden=64)
        run = Run(epochs=3, accelerator="cuda", compile=compile, progress=False)
        history = fit(vae, images, images[:128], batch_size=64, run=run)
        results[compile] = history.epochs[-1].test_elbo
    assert abs(results[mode] - results[False]) < 0.02 * abs(results[False])
