"""The importance-weighted bound as a Pyro ELBO: exact on a linear-Gaussian model with its
exact posterior, rising with k towards log p(x) otherwise, Trace_ELBO at k = 1, scaled
per data point under subsampling (unlike RenyiELBO(alpha=0)), the estimators' shared
expectation and their signal-to-noise ratios, and the VAE's fused path."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

from pyro_vae import VAE, UsageError
from pyro_vae.evaluate import log_weights
from pyro_vae.objectives import IWAE_ELBO

#: x = A z + B + noise(SIGMA), z ~ N(0, 1): the posterior and log p(x) are exact.
A, B, SIGMA = 1.5, 0.3, 0.8
POST_VAR = 1.0 / (1.0 + A**2 / SIGMA**2)
EXACT = (POST_VAR * A / SIGMA**2, -POST_VAR * A * B / SIGMA**2, math.sqrt(POST_VAR))


def model(x, num_data=None):
    n = x.shape[0]
    with pyro.plate("data", num_data or n, subsample=torch.arange(n)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(A * z + B, SIGMA), obs=x)


def make_guide(w, c, s):
    """q(z | x) = N(w x + c, s): exact with EXACT's values."""

    def guide(x, num_data=None):
        n = x.shape[0]
        with pyro.plate("data", num_data or n, subsample=torch.arange(n)):
            pyro.sample("z", dist.Normal(w * x + c, s))

    return guide


def log_evidence(x):
    return dist.Normal(B, math.sqrt(A**2 + SIGMA**2)).log_prob(x)


def guide_params(values=(0.4, 0.1, 0.9)):
    return [torch.tensor(v, requires_grad=True) for v in values]


X = torch.linspace(-2.0, 3.0, 7)


@pytest.mark.parametrize("estimator", ["iwae", "dreg", "stl"])
@pytest.mark.parametrize("k", [1, 5, 50])
def test_the_bound_is_log_p_x_for_every_k_when_the_guide_is_exact(k, estimator):
    guide = make_guide(*(torch.tensor(v) for v in EXACT))
    loss = IWAE_ELBO(k, estimator).loss(model, guide, X)
    assert loss == pytest.approx(-log_evidence(X).sum().item(), abs=1e-4)


def test_the_bound_rises_with_k_towards_log_p_x_when_the_guide_is_not_exact():
    guide = make_guide(*(torch.tensor(v) for v in (0.1, 0.5, 0.3)))  # off-centre, narrow
    x = X.repeat(300)  # 2100 independent bounds per value of k
    exact = log_evidence(x).sum().item()
    bounds = [-IWAE_ELBO(k).loss(model, guide, x) for k in (1, 5, 50, 500)]
    assert bounds[0] < bounds[1] < bounds[2] < bounds[3] < exact
    assert exact - bounds[3] < 0.5 * (exact - bounds[0])  # most of the gap closed


def test_k_1_is_trace_elbo_in_value_and_gradient():
    params = guide_params()
    guide = make_guide(*params)
    results = []
    for elbo in (IWAE_ELBO(1, max_plate_nesting=1), Trace_ELBO()):
        pyro.set_rng_seed(3)
        loss = elbo.differentiable_loss(model, guide, X, num_data=70)
        results.append((loss.item(), torch.autograd.grad(loss, params)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for ours, pyros in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(ours, pyros)


def test_a_subsampled_batch_is_scaled_outside_the_log_sum_exp_unlike_renyi_elbo():
    """6 images standing for 600: the loss is 100 times the sum of the per-image bounds
    of evaluate.py's log weights; RenyiELBO(alpha=0) scales inside the log-sum-exp."""
    pyro.set_rng_seed(0)
    vae = VAE(image_shape=(1, 6, 6), latent_dim=2, hidden=16)
    x = (torch.rand(6, 1, 6, 6) < 0.4).float()
    k = 5
    pyro.set_rng_seed(1)
    ours = IWAE_ELBO(k).loss(vae.model, vae.guide, x, num_data=600)
    pyro.set_rng_seed(1)
    per_image = torch.logsumexp(log_weights(vae, x, k), 0) - math.log(k)
    assert ours == pytest.approx(-100.0 * per_image.sum().item(), rel=1e-5)
    # over many draws, RenyiELBO's estimate differs from the per-image bound it should be
    renyi, iwae = RenyiELBO(alpha=0, num_particles=k), IWAE_ELBO(k)
    draws = {"renyi": [], "iwae": []}
    for _ in range(200):
        draws["renyi"].append(renyi.loss(vae.model, vae.guide, x, num_data=600))
        draws["iwae"].append(iwae.loss(vae.model, vae.guide, x, num_data=600))
    mean = {name: torch.tensor(values).mean() for name, values in draws.items()}
    error = math.sqrt(sum(torch.tensor(v).var().item() / len(v) for v in draws.values()))
    assert abs(mean["renyi"] - mean["iwae"]) > 5 * error


def gradient_draws(estimator: str, k: int, reps: int, batch: int = 1, seed: int = 0):
    """``(reps, 3)``: the guide parameters' gradient of the loss, one row per draw."""
    params = guide_params()
    guide = make_guide(*params)
    elbo = IWAE_ELBO(k, estimator, max_plate_nesting=1)
    x = torch.full((batch,), 1.3)
    pyro.set_rng_seed(seed)
    rows = [
        torch.stack(torch.autograd.grad(elbo.differentiable_loss(model, guide, x), params))
        for _ in range(reps)
    ]
    return torch.stack(rows)


def test_dreg_and_iwae_gradients_have_the_same_expectation():
    iwae = gradient_draws("iwae", 10, 600, batch=20, seed=0)
    dreg = gradient_draws("dreg", 10, 600, batch=20, seed=1)
    error = (iwae.var(0) / len(iwae) + dreg.var(0) / len(dreg)).sqrt()
    assert ((iwae.mean(0) - dreg.mean(0)).abs() < 4 * error).all(), (iwae.mean(0), dreg.mean(0))
    # and the test can tell: "stl" is biased for k > 1, and shows it here
    stl = gradient_draws("stl", 10, 600, batch=20, seed=2)
    error = (iwae.var(0) / len(iwae) + stl.var(0) / len(stl)).sqrt()
    assert ((iwae.mean(0) - stl.mean(0)).abs() > 4 * error).any()


def signal_to_noise(estimator: str, k: int) -> torch.Tensor:
    draws = gradient_draws(estimator, k, 400)
    return draws.mean(0).abs() / draws.std(0)


def test_the_guides_signal_to_noise_falls_with_k_for_iwae_and_not_for_dreg():
    """Rainforth et al. (2018): the IWAE gradient of the guide loses its signal as k
    grows (as 1/sqrt(k)); Tucker et al.'s DReG does not."""
    iwae_1, iwae_100 = signal_to_noise("iwae", 1), signal_to_noise("iwae", 100)
    dreg_1, dreg_100 = signal_to_noise("dreg", 1), signal_to_noise("dreg", 100)
    assert (iwae_100 < 0.5 * iwae_1).all(), (iwae_1, iwae_100)
    assert (dreg_100 > 0.8 * dreg_1).all(), (dreg_1, dreg_100)


FAMILIES = [
    ("bernoulli", "gaussian", "mlp"),
    ("continuous-bernoulli", "gaussian", "conv"),
    ("gaussian", "gaussian", "mlp"),
    ("bernoulli", "relaxed-categorical", "mlp"),
    ("continuous-bernoulli", "relaxed-categorical", "mlp"),
    ("gaussian", "relaxed-categorical", "conv"),
]


@pytest.mark.parametrize("likelihood,latent,arch", FAMILIES)
@pytest.mark.parametrize("estimator", ["iwae", "dreg", "stl"])
def test_the_vaes_fused_path_equals_the_generic_one(estimator, likelihood, latent, arch):
    pyro.set_rng_seed(0)
    vae = VAE(
        image_shape=(1, 8, 8), likelihood=likelihood, latent=latent, arch=arch, hidden=16,
        **({"latent_dim": 3} if latent == "gaussian" else {}),
    )  # fmt: skip
    x = torch.rand(6, 1, 8, 8)
    x = (x < 0.4).float() if likelihood == "bernoulli" else x
    elbo = IWAE_ELBO(5, estimator, max_plate_nesting=1)
    results = []
    for program in ((vae.model, vae.guide), (lambda *a, **k: vae.model(*a, **k),
                                             lambda *a, **k: vae.guide(*a, **k))):  # fmt: skip
        vae.zero_grad()
        pyro.set_rng_seed(1)
        loss = elbo.differentiable_loss(*program, x, num_data=60)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in vae.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for fused, generic in zip(results[0][1], results[1][1], strict=True):
        # float32 sums in another order: close relative to the gradient's own size
        scale = generic.abs().max().item() + 1e-6
        torch.testing.assert_close(fused / scale, generic / scale, rtol=0, atol=1e-4)


def test_svi_trains_a_vae_with_dreg_and_its_parameters_move():
    pyro.set_rng_seed(0)
    vae = VAE(image_shape=(1, 8, 8), latent_dim=3, hidden=16)
    x = (torch.rand(32, 1, 8, 8) < 0.4).float()
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), IWAE_ELBO(5, "dreg"))
    losses = [svi.step(x) for _ in range(30)]
    assert losses[-1] < losses[0]
    for name, param in vae.named_parameters():
        assert not torch.equal(param, before[name]), name


FEATURES = 4
#: x[n] in R^4, x[n, j] = A z[n] + B + noise: one z per point, its exact posterior
POINT_PRECISION = 1.0 + FEATURES * A**2 / SIGMA**2


def point_posterior(x):  # (N, 4) -> the exact q(z | x) as (loc, scale), each (N, 1)
    loc = A / SIGMA**2 * (x - B).sum(-1, keepdim=True) / POINT_PRECISION
    return loc, torch.full_like(loc, POINT_PRECISION**-0.5)


def plate_at_minus_2(x):  # the data plate at dim -2, the features' plate inside it
    with pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("features", FEATURES, dim=-1):
            pyro.sample("x", dist.Normal(A * z + B, SIGMA), obs=x)


def plate_at_minus_2_guide(x):
    with pyro.plate("data", x.shape[0], dim=-2):
        pyro.sample("z", dist.Normal(*point_posterior(x)))


def event_dims(x, num_data=60):  # vectors as events, a subsample of num_data points
    with pyro.plate("data", num_data, subsample=torch.arange(x.shape[0])):
        z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
        loc = (A * z + B).expand(z.shape[:-1] + (FEATURES,))
        pyro.sample("x", dist.Normal(loc, SIGMA).to_event(1), obs=x)


def event_dims_guide(x, num_data=60):
    with pyro.plate("data", num_data, subsample=torch.arange(x.shape[0])):
        pyro.sample("z", dist.Normal(*point_posterior(x)).to_event(1))


def two_latents(x):  # z1 -> z2 -> x per point; the guide draws them in the other order
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
        z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
        pyro.sample("x", dist.Normal(z2, SIGMA), obs=x)


def two_latents_guide(x):  # p(z2 | x), then p(z1 | z2): the exact posterior
    variance = 1.0 / (0.5 + 1.0 / SIGMA**2)
    with pyro.plate("data", x.shape[0]):
        z2 = pyro.sample("z2", dist.Normal(variance * x / SIGMA**2, math.sqrt(variance)))
        pyro.sample("z1", dist.Normal(z2 / 2, math.sqrt(0.5)))


VECTORS = torch.linspace(-2.0, 3.0, 24).reshape(6, FEATURES)
VECTORS_LOG_P = dist.MultivariateNormal(
    torch.full((FEATURES,), B), SIGMA**2 * torch.eye(FEATURES) + A**2
).log_prob(VECTORS)
STRUCTURES = {
    "data plate at dim -2 with a plate inside": (
        plate_at_minus_2, plate_at_minus_2_guide, VECTORS, VECTORS_LOG_P.sum()
    ),
    "event dims and subsampling": (
        event_dims, event_dims_guide, VECTORS, 10 * VECTORS_LOG_P.sum()
    ),
    "two latents, guide in the other order": (
        two_latents, two_latents_guide, X,
        dist.Normal(0.0, math.sqrt(2.0 + SIGMA**2)).log_prob(X).sum(),
    ),
}  # fmt: skip


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_other_program_structures_give_log_p_x_with_an_exact_guide(structure, estimator):
    """Exact posteriors of other shapes of program: the bound is log p(x) (scaled to the
    data set) for every draw, so any misplaced dimension or scale shows."""
    model_, guide_, data, log_p = STRUCTURES[structure]
    loss = IWAE_ELBO(7, estimator).loss(model_, guide_, data)
    assert loss == pytest.approx(-log_p.item(), rel=1e-5)


def hierarchical_guide(params):
    """q(z2 | x) q(z1 | z2) for :func:`two_latents`, with the parameters ``params``:
    ``(a, b, s2, c, d, s1)`` for z2 ~ N(a x + b, s2), z1 ~ N(c z2 + d, s1)."""

    def guide(x):
        a, b, s2, c, d, s1 = params
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(a * x + b, s2))
            pyro.sample("z1", dist.Normal(c * z2 + d, s1))

    return guide


def exact_hierarchical_params():
    variance = 1.0 / (0.5 + 1.0 / SIGMA**2)
    values = (variance / SIGMA**2, 0.0, math.sqrt(variance), 0.5, 0.0, math.sqrt(0.5))
    return [torch.tensor(v, requires_grad=True) for v in values]


@pytest.mark.parametrize("estimator", ["dreg", "stl"])
def test_at_the_exact_hierarchical_posterior_the_path_gradient_is_zero_for_every_draw(
    estimator,
):
    """With q(z1, z2 | x) = p(z1, z2 | x), every log weight is log p(x) whatever the draw,
    so the guide's path gradient is exactly zero, through z2's effect on q(z1 | z2) too
    (the IWAE estimator's score term is not: zero only in expectation)."""
    params = exact_hierarchical_params()
    guide = hierarchical_guide(params)
    for estimator_, zero in ((estimator, True), ("iwae", False)):
        elbo = IWAE_ELBO(5, estimator_, max_plate_nesting=1)
        grads = torch.autograd.grad(elbo.differentiable_loss(two_latents, guide, X), params)
        size = torch.stack(grads).abs().max().item()
        assert (size < 1e-4) == zero, (estimator_, grads)


def test_dreg_is_unbiased_for_a_hierarchical_guide():
    """z2 drawn first and z1 from q(z1 | z2): DReG's gradient has the IWAE gradient's
    expectation for the parameters of both levels."""
    params = [torch.tensor(v, requires_grad=True) for v in (0.5, 0.1, 0.7, 0.3, -0.2, 0.6)]
    guide = hierarchical_guide(params)
    x = torch.full((80,), 1.3)  # a wide batch: fewer, cheaper draws for the same precision

    def draws(estimator, seed, reps=200):
        elbo = IWAE_ELBO(10, estimator, max_plate_nesting=1)
        pyro.set_rng_seed(seed)
        loss = lambda: elbo.differentiable_loss(two_latents, guide, x)  # noqa: E731
        return torch.stack([torch.stack(torch.autograd.grad(loss(), params)) for _ in range(reps)])

    iwae, dreg = draws("iwae", 0), draws("dreg", 1)
    error = (iwae.var(0) / len(iwae) + dreg.var(0) / len(dreg)).sqrt()
    assert ((iwae.mean(0) - dreg.mean(0)).abs() < 4 * error).all(), (iwae.mean(0), dreg.mean(0))


def test_dreg_stays_unbiased_for_the_model_when_its_decoder_draws_dropout():
    """The model replayed at detached values (DReG with a guide of several sites) must draw
    the same dropout masks as its first run, or the model's gradient is wrong."""
    weight = torch.tensor(1.0, requires_grad=True)
    dropout = torch.nn.Dropout(0.5)

    def dropout_model(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
            z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
            pyro.sample("x", dist.Normal(dropout(weight * z2), SIGMA), obs=x)

    guide = hierarchical_guide([torch.tensor(v) for v in (0.5, 0.1, 0.7, 0.3, -0.2, 0.6)])
    x = torch.full((80,), 1.3)  # a wide batch: fewer, cheaper draws for the same precision

    def draws(estimator, seed, reps=100):
        elbo = IWAE_ELBO(10, estimator, max_plate_nesting=1)
        pyro.set_rng_seed(seed)
        loss = lambda: elbo.differentiable_loss(dropout_model, guide, x)  # noqa: E731
        return torch.stack([torch.autograd.grad(loss(), [weight])[0] for _ in range(reps)])

    iwae, dreg = draws("iwae", 0), draws("dreg", 1)
    error = (iwae.var() / len(iwae) + dreg.var() / len(dreg)).sqrt()
    assert (iwae.mean() - dreg.mean()).abs() < 4 * error, (iwae.mean(), dreg.mean())


def test_a_guide_of_several_sites_is_replayed_for_gradients_only():
    """DReG's gradient through a hierarchy costs one more run of guide and model; the
    loss as a number (``loss()``, under no_grad) runs each once, as Trace_ELBO does."""
    calls = {"model": 0, "guide": 0}
    guide = hierarchical_guide(exact_hierarchical_params())

    def counted(name, program):
        def run(x):
            calls[name] += 1
            return program(x)

        return run

    elbo = IWAE_ELBO(3, "dreg", max_plate_nesting=1)
    elbo.loss(counted("model", two_latents), counted("guide", guide), X)
    assert calls == {"model": 1, "guide": 1}
    elbo.differentiable_loss(counted("model", two_latents), counted("guide", guide), X)
    assert calls == {"model": 3, "guide": 3}


def test_what_a_guide_of_several_sites_cannot_replay_is_refused_by_name():
    """Dropout in such a guide, or a flow that cannot evaluate a value it did not draw,
    would give DReG a wrong gradient; they stop with the reason and the way out."""
    dropout = torch.nn.Dropout(0.5)

    def dropout_guide(x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(dropout(x), 1.0))
            pyro.sample("z1", dist.Normal(z2 / 2, 1.0))

    with pytest.raises(UsageError, match="guide site 'z2'.*outside pyro.sample.*'iwae'"):
        IWAE_ELBO(3, "dreg").differentiable_loss(two_latents, dropout_guide, X)
    IWAE_ELBO(3, "iwae").differentiable_loss(two_latents, dropout_guide, X)  # fine

    planar = pyro.distributions.transforms.Planar(1)

    def flow_guide(x):
        with pyro.plate("data", x.shape[0]):
            base = dist.Normal(torch.zeros(x.shape[0], 1), 1.0).to_event(1)
            pyro.sample("z", dist.TransformedDistribution(base, [planar]))

    def flow_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z[..., 0], SIGMA), obs=x)

    with pytest.raises(UsageError, match="'z'.*Planar, Radial.*'iwae'"):
        IWAE_ELBO(3, "dreg").differentiable_loss(flow_model, flow_guide, X)


def test_a_tempered_likelihood_and_an_inner_subsampled_plate_weigh_inside_the_log_weights():
    """A scale on the observation alone is Pyro's per-site meaning, log w = s log p(x|z)
    + log p(z) - log q(z|x); a plate inside the data plate scales its sites alike,
    written as a vectorized or a sequential plate."""
    guide = make_guide(*(torch.tensor(v) for v in (0.1, 0.5, 0.3)))

    def tempered(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.poutine.scale(scale=0.2):
                pyro.sample("x", dist.Normal(A * z + B, SIGMA), obs=x)

    pyro.set_rng_seed(5)
    loss = IWAE_ELBO(5, max_plate_nesting=1).loss(tempered, guide, X)
    pyro.set_rng_seed(5)
    trace = pyro.poutine.trace(pyro.plate("p", 5, dim=-2)(guide)).get_trace(X)
    z, q = trace.nodes["z"]["value"], trace.nodes["z"]["fn"]
    log_w = 0.2 * dist.Normal(A * z + B, SIGMA).log_prob(X)
    log_w = log_w + dist.Normal(0.0, 1.0).log_prob(z) - q.log_prob(z)
    assert loss == pytest.approx(-(torch.logsumexp(log_w, 0) - math.log(5)).sum().item(), rel=1e-5)

    rows = torch.tensor([0, 2])  # 2 of 4 features, drawn once for both forms

    def vectorized(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("features", FEATURES, dim=-1, subsample=rows):
                pyro.sample("x", dist.Normal(A * z + B, SIGMA), obs=x[:, rows])

    def sequential(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            for j in pyro.plate("features", FEATURES, subsample=rows):
                pyro.sample(f"x{j}", dist.Normal(A * z + B, SIGMA), obs=x[:, j : j + 1])

    losses = []
    for program in (vectorized, sequential):
        pyro.set_rng_seed(6)
        losses.append(IWAE_ELBO(5).loss(program, plate_at_minus_2_guide, VECTORS))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_an_observation_masked_where_its_density_is_nan_counts_for_nothing():
    x = torch.tensor([0.5, float("nan"), -1.0, 2.0])
    observed = ~x.isnan()

    def masked_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.poutine.mask(mask=observed):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def prior_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pyro.validation_enabled(False):  # validation would refuse the nan itself
        losses = []
        for elbo in (IWAE_ELBO(1, max_plate_nesting=1), Trace_ELBO()):
            pyro.set_rng_seed(7)
            losses.append(elbo.loss(masked_model, prior_guide, x))
    assert math.isfinite(losses[0]) and losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_deterministic_sites_inside_and_outside_the_plate_add_nothing():
    """``pyro.deterministic`` records a value and has no density: not a global latent."""

    def recording_model(x):
        pyro.deterministic("offset", torch.tensor(B))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.deterministic("mean", A * z + B)
            pyro.sample("x", dist.Normal(A * z + B, SIGMA), obs=x)

    guide = make_guide(*(torch.tensor(v) for v in EXACT))
    for estimator in ("iwae", "dreg"):
        loss = IWAE_ELBO(5, estimator).loss(recording_model, guide, X)
        assert loss == pytest.approx(-log_evidence(X).sum().item(), abs=1e-4)


def test_a_scale_on_the_whole_program_scales_the_bound_and_a_kl_weight_stays_inside():
    """``poutine.scale(c)`` around model and guide (a user's normalisation of the loss)
    multiplies the bound by c; a scale on the latent alone is a KL weight inside the log
    weights (``log w = log p(x|z) + beta (log p(z) - log q)``). Sites with different
    scales have Pyro's per-site meaning, inside: with c as well, ``log w = c log p(x|z) +
    c beta (log p(z) - log q)``."""
    guide = make_guide(*(torch.tensor(v) for v in (0.1, 0.5, 0.3)))  # not exact
    elbo = IWAE_ELBO(5, max_plate_nesting=1)

    def loss_of(model_, guide_):
        pyro.set_rng_seed(4)
        return elbo.loss(model_, guide_, X)

    plain = loss_of(model, guide)
    scaled = loss_of(pyro.poutine.scale(model, 0.01), pyro.poutine.scale(guide, 0.01))
    assert scaled == pytest.approx(0.01 * plain, rel=1e-5)

    def weighted(c):  # the latent's sites at c * beta, the observation at c
        def model_(x):
            with pyro.poutine.scale(scale=c), pyro.plate("data", x.shape[0]):
                with pyro.poutine.scale(scale=0.5):
                    z = pyro.sample("z", dist.Normal(0.0, 1.0))
                pyro.sample("x", dist.Normal(A * z + B, SIGMA), obs=x)

        def guide_(x):
            with pyro.poutine.scale(scale=0.5 * c):
                guide(x)

        return loss_of(model_, guide_)

    pyro.set_rng_seed(4)
    trace = pyro.poutine.trace(pyro.plate("p", 5, dim=-2)(guide)).get_trace(X)
    z = trace.nodes["z"]["value"]
    log_x = dist.Normal(A * z + B, SIGMA).log_prob(X)
    log_z = dist.Normal(0.0, 1.0).log_prob(z) - trace.nodes["z"]["fn"].log_prob(z)

    def bound(log_w):
        return -(torch.logsumexp(log_w, 0) - math.log(5)).sum().item()

    assert weighted(1.0) == pytest.approx(bound(log_x + 0.5 * log_z), rel=1e-5)
    assert weighted(0.01) == pytest.approx(bound(0.01 * log_x + 0.005 * log_z), rel=1e-5)


def test_programs_it_cannot_bound_per_data_point_are_refused_by_name():
    def global_model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    def global_guide(x):
        pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(UsageError, match="'w' is outside every plate"):
        IWAE_ELBO(3).loss(global_model, global_guide, X)
    packed = AutoDiagonalNormal(model)  # its one latent vector sits outside the plate
    with pytest.raises(UsageError, match="_AutoDiagonalNormal_latent.*AutoNormal keeps"):
        IWAE_ELBO(3).loss(model, packed, X)
    pyro.clear_param_store()
    assert IWAE_ELBO(3).loss(model, AutoNormal(model), X) > -log_evidence(X).sum().item()

    def discrete_model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def discrete_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(0.3))

    def two_plates(x):  # the same points in two differently named plates
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("labels", x.shape[0]):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(UsageError, match="no plate holds them all.*'x' in labels"):
        IWAE_ELBO(3).loss(two_plates, make_guide(*guide_params()), X)
    with pytest.raises(UsageError, match="'c'.*no rsample"):
        IWAE_ELBO(3).loss(discrete_model, discrete_guide, X)
    with pytest.raises(UsageError, match="estimator"):
        IWAE_ELBO(3, "reinforce")
    with pytest.raises(UsageError, match="num_particles"):
        IWAE_ELBO(0)


def test_fits_module_takes_the_direct_route_and_equals_the_elbo_class():
    from pyro_vae.train import ELBOLoss

    pyro.set_rng_seed(0)
    vae = VAE(image_shape=(1, 8, 8), latent_dim=3, hidden=16)
    x = (torch.rand(6, 1, 8, 8) < 0.4).float()
    elbo = IWAE_ELBO(4, "dreg", max_plate_nesting=1)
    module = ELBOLoss(vae, elbo, num_data=60)
    module.weight = 0.5  # a KL warm-up's weight, inside the log weights
    assert module.fused()
    results = []
    for loss_of in (
        module,
        lambda x: elbo.differentiable_loss(vae.model, vae.guide, x, num_data=60),
    ):
        vae.zero_grad()
        pyro.set_rng_seed(1)
        with vae.kl_weight(0.5):
            loss = loss_of(x)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in vae.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for direct, through_class in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(direct, through_class)


@pytest.mark.parametrize("elbo", ["iwae", IWAE_ELBO(5, "dreg"), IWAE_ELBO(3, "stl")])
def test_fit_trains_with_the_importance_weighted_bound(elbo, mnist_train, mnist_test):
    from pyro_vae import Run, fit

    pyro.set_rng_seed(0)
    vae = VAE(latent_dim=8, hidden=64)
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    run = Run(epochs=2, accelerator="cpu", progress=False)
    history = fit(vae, mnist_train.images[:2000], mnist_test.images[:300], batch_size=100,
                  elbo=elbo, warmup=1, run=run)  # fmt: skip
    assert history.epochs[1].test_elbo > history.epochs[0].test_elbo
    for name, param in vae.named_parameters():
        assert not torch.equal(param, before[name]), name
    with pytest.raises(UsageError, match="compile"):
        fit(vae, mnist_train.images[:100], elbo=elbo, run=run.replace(compile=True))


def test_the_command_line_trains_with_dreg_and_refuses_particles_without_iwae(
    mnist_dir, tmp_path, capsys
):
    from tests.helpers import run_script

    common = ["--data-dir", mnist_dir, "--limit", 500, "--test-limit", 200, "--epochs", 1,
              "--latent-dim", 4, "--hidden", 32, "--no-progress"]  # fmt: skip
    out = tmp_path / "iw"
    args = [*common, "--elbo", "iwae", "--particles", 5, "--estimator", "dreg", "--out", out]
    assert run_script("fit.py", *args) == 0
    assert (out / "checkpoint.pt").is_file() and (out / "history.csv").is_file()
    capsys.readouterr()
    assert run_script("fit.py", *common, "--estimator", "dreg", "--out", tmp_path / "x") == 2
    assert "need --elbo iwae" in capsys.readouterr().err
