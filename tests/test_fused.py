"""The fused ELBO is Pyro's estimator: equal losses and gradients from the same random state,
for every configuration of the VAE; every other program goes through Pyro unchanged."""

from __future__ import annotations

import contextlib
import importlib
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.nn import PyroModule, PyroParam, PyroSample

from pyro_vae import VAE, DataError, UsageError
from pyro_vae.fused import FusedTrace_ELBO, FusedTraceMeanField_ELBO
from pyro_vae.latents import GaussianLatent
from pyro_vae.likelihoods import BernoulliLikelihood
from pyro_vae.ssvae import SSVAE
from pyro_vae.vae import SiteShapeError

#: (fused, Pyro's) pairs; the id says which estimator
ESTIMATORS = {
    "trace": (FusedTrace_ELBO, Trace_ELBO),
    "meanfield": (FusedTraceMeanField_ELBO, TraceMeanField_ELBO),
}
LATENTS = {
    "gaussian": {"latent": "gaussian"},
    "relaxed": {"latent": "relaxed-categorical"},
    "straight-through": {"latent": "relaxed-categorical", "straight_through": True},
}
LIKELIHOODS = {
    "bernoulli": {"likelihood": "bernoulli"},
    "continuous-bernoulli": {"likelihood": "continuous-bernoulli"},
    "gaussian-shared": {"likelihood": "gaussian", "gaussian_sigma": "shared"},
    "gaussian-pixel": {"likelihood": "gaussian", "gaussian_sigma": "pixel"},
    "gaussian-fixed": {"likelihood": "gaussian", "gaussian_sigma": "fixed"},
}
#: conv with the relaxed-categorical latent is a 2 x 2 grid of codes on these images
SHAPES = {
    "mlp": {"arch": "mlp", "image_shape": (1, 8, 8)},
    "conv": {"arch": "conv", "image_shape": (1, 8, 8), "channels": 4},
    "vectors": {"arch": "mlp", "image_shape": (5,)},
}
BATCH, NUM_DATA = 6, 50  # a subsample: every log-density is scaled by 50 / 6
KL_WEIGHT, TEMPERATURE = 0.3, 0.7


def tiny_vae(**kwargs) -> VAE:
    vae = VAE(hidden=16, latent_dim=3, groups=2, classes=3, **kwargs)
    if vae.latent.relaxed:
        vae.latent.temperature = TEMPERATURE
    return vae.train()


def data_for(vae: VAE, batch: int = BATCH) -> torch.Tensor:
    """Data in the support of the VAE's likelihood: binary for Bernoulli, else [0, 1]."""
    x = torch.rand(batch, *vae.config.image_shape)
    return x.round() if vae.config.likelihood == "bernoulli" else x


def loss_and_grads(vae: VAE, compute: Callable[[], torch.Tensor], seed: int = 7):
    """The loss from a known random state, and the gradient of every parameter of ``vae``."""
    pyro.set_rng_seed(seed)
    loss = compute()
    params = [p for p in vae.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


def assert_same(fused, pyro_route) -> None:
    """Equal losses, and equal gradients of every parameter, to float32 rounding."""
    (loss, grads), (expected, expected_grads) = fused, pyro_route
    # Pyro adds the sites' sums as Python floats (double) and rounds once; the fused loss
    # adds them in float32: a few units in the last place of the largest term (tens to
    # thousands of nats here) apart, which the absolute tolerance allows when terms cancel
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-4)
    assert len(grads) == len(expected_grads)
    for grad, want in zip(grads, expected_grads, strict=True):
        # rounding in a sum reaches every entry alike, so the tolerance follows the largest
        atol = 1e-6 * float(want.abs().max()) + 1e-12
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=atol)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These nets are tiny: with two or more threads, OpenMP's hand-offs cost more than the
    arithmetic, and on a busy machine (other jobs on the cores) a test takes seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """Counts the calls of ``VAE.elbo_loss``, the fused route."""
    calls = []
    original = VAE.elbo_loss

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("analytic_kl"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VAE, "elbo_loss", counted)
    return calls


@pytest.fixture
def no_fused(monkeypatch) -> None:
    """Fails a test in which the fused route runs."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("the fused loss ran, where Pyro's ELBO should have")

    monkeypatch.setattr(VAE, "elbo_loss", refuse)


# ----------------------------------------------------------------- same estimator
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("latent", LATENTS)
def test_fused_loss_and_gradients_equal_pyros(latent, likelihood, shape, estimator, fused_calls):
    """For every latent x likelihood x architecture, under subsampling, a KL weight of 0.3
    and a temperature of 0.7: Pyro's ELBO, the fused ELBO class, and ``vae.elbo_loss``
    with the weight and temperature passed as tensors give one loss and one gradient."""
    vae = tiny_vae(**LATENTS[latent], **LIKELIHOODS[likelihood], **SHAPES[shape])
    x = data_for(vae)
    fused_elbo, pyro_elbo = ESTIMATORS[estimator]
    with vae.kl_weight(KL_WEIGHT):
        expected = loss_and_grads(
            vae, lambda: pyro_elbo().differentiable_loss(vae.model, vae.guide, x, num_data=NUM_DATA)
        )
        assert not fused_calls
        fused = loss_and_grads(
            vae,
            lambda: fused_elbo().differentiable_loss(vae.model, vae.guide, x, num_data=NUM_DATA),
        )
    assert fused_calls == [estimator == "meanfield"]
    assert_same(fused, expected)

    # the weight and temperature as tensors, as compiled code sees them; the defaults they
    # replace are set to other values, so the result shows that the tensors were used
    if vae.latent.relaxed:
        vae.latent.temperature = 1.0
    direct = loss_and_grads(
        vae,
        lambda: vae.elbo_loss(
            x,
            num_data=NUM_DATA,
            analytic_kl=estimator == "meanfield",
            kl_weight=torch.tensor(KL_WEIGHT),
            temperature=torch.tensor(TEMPERATURE),
        ),
    )
    assert_same(direct, expected)


@pytest.mark.mnist
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fused_equals_pyro_on_mnist_digits(mnist_test, estimator):
    """MNIST-sized images through the default MLP (narrower), scaled to 60,000 images."""
    vae = VAE(hidden=32, latent_dim=8).train()
    x = (mnist_test.images[:16].float() / 255 > 0.5).float()
    fused_elbo, pyro_elbo = ESTIMATORS[estimator]
    expected = loss_and_grads(
        vae, lambda: pyro_elbo().differentiable_loss(vae.model, vae.guide, x, num_data=60000)
    )
    fused = loss_and_grads(
        vae, lambda: fused_elbo().differentiable_loss(vae.model, vae.guide, x, num_data=60000)
    )
    assert_same(fused, expected)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("latent", LATENTS)
def test_loss_and_loss_and_grads_equal_pyros(latent, estimator, fused_calls):
    """``loss`` gives Pyro's float; ``loss_and_grads`` its float and its ``.grad``s."""
    vae = tiny_vae(**LATENTS[latent], likelihood="gaussian")
    x = data_for(vae)
    fused_elbo, pyro_elbo = ESTIMATORS[estimator]
    results = []
    for elbo in (pyro_elbo(), fused_elbo()):
        pyro.set_rng_seed(3)
        value = elbo.loss(vae.model, vae.guide, x, num_data=NUM_DATA)
        vae.zero_grad(set_to_none=True)
        pyro.set_rng_seed(3)
        stepped = elbo.loss_and_grads(vae.model, vae.guide, x, num_data=NUM_DATA)
        results.append((value, stepped, [p.grad.clone() for p in vae.parameters()]))
    assert len(fused_calls) == 2
    (value, stepped, grads), (want, want_stepped, want_grads) = results[1], results[0]
    assert isinstance(value, float) and isinstance(stepped, float)
    assert value == pytest.approx(want, rel=1e-6)
    assert stepped == pytest.approx(want_stepped, rel=1e-6)
    assert_same((torch.tensor(stepped), grads), (torch.tensor(want_stepped), want_grads))


def test_elbo_loss_uses_the_kl_weight_of_the_context_and_checks_its_input():
    vae = tiny_vae(image_shape=(1, 8, 8))
    x = data_for(vae)
    with vae.kl_weight(0.25):
        pyro.set_rng_seed(1)
        in_context = vae.elbo_loss(x, num_data=NUM_DATA)
    pyro.set_rng_seed(1)
    passed = vae.elbo_loss(x, num_data=NUM_DATA, kl_weight=0.25)
    pyro.set_rng_seed(1)
    unweighted = vae.elbo_loss(x, num_data=NUM_DATA)
    assert in_context == passed != unweighted
    with pytest.raises(ValueError, match="smaller than the batch"):
        vae.elbo_loss(x, num_data=BATCH - 1)
    with pytest.raises(DataError, match="expected images of shape"):
        vae.elbo_loss(x[:, 0])


def test_elbo_loss_refuses_a_relaxed_latent_in_eval_mode():
    """Eval-mode codes are exact one-hot draws: no reparameterized gradient to fuse."""
    vae = tiny_vae(latent="relaxed-categorical", image_shape=(1, 8, 8)).eval()
    with pytest.raises(UsageError, match="eval mode"):
        vae.elbo_loss(data_for(vae))


def test_eval_mode_gaussian_is_fused_too(fused_calls):
    vae = tiny_vae(image_shape=(1, 8, 8)).eval()
    x = data_for(vae)
    expected = loss_and_grads(
        vae, lambda: Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    )
    fused = loss_and_grads(
        vae, lambda: FusedTrace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    )
    assert len(fused_calls) == 1
    assert_same(fused, expected)


# ----------------------------------------------------------------- Pyro's route unchanged
class HalfLikelihood(VAE):
    """A subclass with a model of its own (a tempered likelihood)."""

    def model(self, x=None, *, num_data=None, batch_size=None):
        with poutine.scale(scale=0.5):
            return super().model(x, num_data=num_data, batch_size=batch_size)


class OwnBody(VAE):
    """A subclass that changes the sample statements the model runs."""

    def _model_body(self, x=None, *, num_data=None, batch_size=None):
        with poutine.scale(scale=2.0):
            return super()._model_body(x, num_data=num_data, batch_size=batch_size)


class OwnKLWeight(VAE):
    """A subclass whose KL-weight context does more than set the weight (here: doubles it)."""

    @contextlib.contextmanager
    def kl_weight(self, weight):
        with super().kl_weight(2 * weight):
            yield


def doubled(elbo_class: type) -> type:
    """``elbo_class`` with an objective of its own: twice its ELBO."""
    pyro_class = TraceMeanField_ELBO if issubclass(elbo_class, TraceMeanField_ELBO) else Trace_ELBO

    def particle(self, model_trace, guide_trace):
        loss, surrogate = pyro_class._differentiable_loss_particle(self, model_trace, guide_trace)
        return 2 * loss, 2 * surrogate

    return type(
        f"Doubled{elbo_class.__name__}", (elbo_class,), {"_differentiable_loss_particle": particle}
    )


@dataclass
class Program:
    """A call of an ELBO method: model, guide and their arguments, the ELBO's own
    arguments, the class it is (made from the estimator's fused or Pyro class), and a
    context to run in."""

    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict = field(default_factory=lambda: {"num_data": NUM_DATA})
    elbo_kwargs: dict = field(default_factory=dict)
    elbo_class: Callable[[type], type] = lambda cls: cls
    context: Callable = contextlib.nullcontext


def small_vae(cls: type = VAE, **kwargs) -> tuple[VAE, torch.Tensor]:
    vae = cls(hidden=16, latent_dim=3, image_shape=(1, 8, 8), **kwargs).train()
    return vae, data_for(vae)


def subclass_model() -> Program:
    vae, x = small_vae(HalfLikelihood)
    return Program(vae.model, vae.guide, (x,))


def subclass_body() -> Program:
    vae, x = small_vae(OwnBody)
    return Program(vae.model, vae.guide, (x,))


def subclass_kl_weight() -> Program:
    vae, x = small_vae(OwnKLWeight)
    return Program(vae.model, vae.guide, (x,), context=lambda: vae.kl_weight(KL_WEIGHT))


def wrapped_model() -> Program:
    vae, x = small_vae()
    return Program(poutine.scale(vae.model, scale=2.0), vae.guide, (x,))


def handler_around_the_call() -> Program:
    vae, x = small_vae()
    return Program(vae.model, vae.guide, (x,), context=lambda: poutine.scale(scale=2.0))


def two_particles() -> Program:
    vae, x = small_vae()
    return Program(vae.model, vae.guide, (x,), elbo_kwargs={"num_particles": 2})


def ssvae() -> Program:
    """M2 with labels observed (the labelled ELBO of ``fit_ssvae``)."""
    model = SSVAE(image_shape=(1, 8, 8), hidden=16, latent_dim=3).train()
    x, y = data_for(model), torch.arange(BATCH) % 10
    return Program(model.model, model.guide, (x, y))


def frozen() -> Program:
    vae, x = small_vae()
    return Program(vae.model, vae.guide, (x,), context=vae.frozen)


def relaxed_in_eval_mode() -> Program:
    vae, x = small_vae(latent="relaxed-categorical", groups=2, classes=3)
    vae.eval()
    return Program(vae.model, vae.guide, (x,))


def own_objective() -> Program:
    vae, x = small_vae()
    return Program(vae.model, vae.guide, (x,), elbo_class=doubled)


FALLBACKS = {
    f.__name__: f
    for f in (
        subclass_model,
        subclass_body,
        subclass_kl_weight,
        wrapped_model,
        handler_around_the_call,
        two_particles,
        ssvae,
        frozen,
        relaxed_in_eval_mode,
        own_objective,
    )
}


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("case", FALLBACKS)
def test_programs_it_does_not_recognise_run_through_pyro_unchanged(case, estimator, no_fused):
    """A subclass with its own model or body, a handler-wrapped model, a handler around
    the call, two particles, an SSVAE, a frozen VAE, a relaxed latent in eval mode, an ELBO
    with its own objective: the fused class does exactly what its Pyro parent does."""
    program = FALLBACKS[case]()
    outcomes = []
    for elbo_class in reversed(ESTIMATORS[estimator]):  # Pyro's first
        elbo = program.elbo_class(elbo_class)(**program.elbo_kwargs)
        pyro.set_rng_seed(5)
        try:
            with program.context():
                loss = elbo.differentiable_loss(
                    program.model, program.guide, *program.args, **program.kwargs
                )
            outcomes.append(loss.detach())
        except Exception as error:  # e.g. TraceMeanField_ELBO refuses exact (eval-mode) codes
            outcomes.append((type(error), str(error)))
    assert outcomes[1] == outcomes[0]


# ----------------------------------------------------------------- what the instance runs
class FactorDecoder(torch.nn.Module):
    """A decoder of your own with a ``pyro.factor`` statement: a penalty on its output."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.net = decoder

    def forward(self, z):
        params = self.net(z)
        pyro.factor("penalty", -params.pow(2).mean())
        return params


class ShiftedDecoder(PyroModule):
    """A Bayesian decoder: a shift of its output is a ``PyroSample``, a latent of the model
    that the guide does not sample (``TraceMeanField_ELBO`` refuses such a model)."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.net = decoder
        self.shift = PyroSample(pyro.distributions.Normal(0.0, 1.0).expand([1, 1, 1]).to_event(3))

    def forward(self, z):
        return self.net(z) + self.shift


class NoisyEncoder(torch.nn.Module):
    """An encoder with a ``pyro.sample`` statement of its own, in the guide."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.net = encoder

    def forward(self, x):
        return self.net(x) + 0.1 * pyro.sample("noise", pyro.distributions.Normal(0.0, 1.0))


class PenalizedLikelihood(BernoulliLikelihood):
    """A likelihood of your own (a subclass of the package's) with a ``pyro.factor``."""

    def distribution(self, params):
        pyro.factor("sharpness", -params.abs().mean())
        return super().distribution(params)


class PenalizedLatent(GaussianLatent):
    """A latent family of your own (a plain object, as the package's Gaussian one is) whose
    prior adds a ``pyro.factor``."""

    def prior(self, batch_shape, like):
        pyro.factor("prior_penalty", -like.new_ones(()))
        return super().prior(batch_shape, like)


class CheckedLatent(VAE):
    """A subclass that overrides a check the model runs (no method of the old list of
    program methods) and adds a factor there."""

    def _check_latent(self, z, batch):
        pyro.factor("vae.z_penalty", -z.pow(2).sum(-1))
        super()._check_latent(z, batch)


def own_decoder_factor() -> tuple[VAE, torch.Tensor]:
    vae, x = small_vae()
    vae.decoder = FactorDecoder(vae.decoder)
    return vae, x


def own_decoder_pyro_sample() -> tuple[VAE, torch.Tensor]:
    vae, x = small_vae()
    vae.decoder = ShiftedDecoder(vae.decoder)
    return vae, x


def own_encoder_sample() -> tuple[VAE, torch.Tensor]:
    vae, x = small_vae()
    vae.encoder = NoisyEncoder(vae.encoder)
    return vae, x


def own_likelihood_factor() -> tuple[VAE, torch.Tensor]:
    vae, x = small_vae()
    vae.likelihood = PenalizedLikelihood(event_dims=3)
    return vae, x


def own_latent_factor() -> tuple[VAE, torch.Tensor]:
    vae, x = small_vae()
    vae.latent = PenalizedLatent(vae.config.latent_dim)
    return vae, x


def forward_replaced_on_the_instance() -> tuple[VAE, torch.Tensor]:
    vae, x = small_vae()
    forward = vae.decoder.forward

    def penalized(z):
        params = forward(z)
        pyro.factor("penalty", -params.pow(2).mean())
        return params

    vae.decoder.forward = penalized
    return vae, x


def forward_hook_with_a_factor() -> tuple[VAE, torch.Tensor]:
    vae, x = small_vae()
    vae.decoder.register_forward_hook(
        lambda module, inputs, output: pyro.factor("penalty", -output.pow(2).mean())
    )
    return vae, x


def subclass_check() -> tuple[VAE, torch.Tensor]:
    return small_vae(CheckedLatent)


OWN_STATEMENTS = {
    f.__name__: f
    for f in (
        own_decoder_factor,
        own_decoder_pyro_sample,
        own_encoder_sample,
        own_likelihood_factor,
        own_latent_factor,
        forward_replaced_on_the_instance,
        forward_hook_with_a_factor,
        subclass_check,
    )
}


def outcome(elbo, vae: VAE, x: torch.Tensor, method: str = "differentiable_loss"):
    """What ``elbo.method(vae.model, vae.guide, x, num_data=...)`` does from a known random
    state: ``(loss, gradients)``, or the ``(type, message)`` of the error it raises; and
    the messages of the warnings it gives."""
    pyro.set_rng_seed(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loss = getattr(elbo, method)(vae.model, vae.guide, x, num_data=NUM_DATA)
            if method == "differentiable_loss":
                params = [p for p in vae.parameters() if p.requires_grad]
                result = (loss.detach(), torch.autograd.grad(loss, params))
            else:
                result = loss
        except Exception as error:
            result = (type(error), str(error))
    return result, sorted({str(w.message) for w in caught})


def assert_same_outcome(fused, pyro_route) -> None:
    """The same error and warnings, or equal losses and gradients and the same warnings."""
    (result, messages), (expected, expected_messages) = fused, pyro_route
    assert messages == expected_messages
    if isinstance(expected, tuple) and isinstance(expected[0], torch.Tensor):
        assert isinstance(result, tuple) and isinstance(result[0], torch.Tensor), result
        assert_same(result, expected)
    elif isinstance(expected, float):
        assert result == pytest.approx(expected, rel=1e-6)
    else:
        assert result == expected


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("case", OWN_STATEMENTS)
def test_a_vae_running_pyro_statements_of_its_own_is_computed_as_pyro_does(
    case, estimator, no_fused
):
    """A VAE instance whose decoder, encoder, likelihood or latent was replaced by one with
    its own ``pyro.sample``, ``PyroSample`` or ``pyro.factor``, whose decoder's forward was
    replaced on the instance or given a hook, or whose class overrides a check the model
    runs: the fused class leaves it to Pyro, so the loss, its gradients, its warnings and
    its errors (``TraceMeanField_ELBO`` refuses model-only latents) are Pyro's."""
    vae, x = OWN_STATEMENTS[case]()
    assert not vae.runs_own_program()
    fused_elbo, pyro_elbo = ESTIMATORS[estimator]
    expected = outcome(pyro_elbo(), vae, x)
    assert_same_outcome(outcome(fused_elbo(), vae, x), expected)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_plain_torch_module_in_place_of_a_network_is_still_fused(estimator, fused_calls):
    """A decoder replaced by ``torch.nn`` layers makes no Pyro statement: still fused, and
    still Pyro's loss and gradients."""
    vae, x = small_vae()
    vae.decoder = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Unflatten(1, (1, 8, 8)))
    assert vae.runs_own_program()
    fused_elbo, pyro_elbo = ESTIMATORS[estimator]
    expected = outcome(pyro_elbo(), vae, x)
    assert_same_outcome(outcome(fused_elbo(), vae, x), expected)
    assert len(fused_calls) == 1


def misshapen_encoder() -> tuple[VAE, torch.Tensor]:
    """An encoder whose output has an extra dimension: q(z | x) holds (batch, 1) points."""
    vae, x = small_vae()
    vae.encoder = torch.nn.Sequential(vae.encoder, torch.nn.Unflatten(1, (1, 6)))
    return vae, x


def misshapen_decoder() -> tuple[VAE, torch.Tensor]:
    """A decoder whose output has an extra dimension: p(x | z) holds (batch, 1) points."""
    vae, x = small_vae()
    vae.decoder = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Unflatten(1, (1, 1, 8, 8)))
    return vae, x


@pytest.mark.parametrize("validation", [True, False])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_network_that_changes_the_batch_shape_is_left_to_pyro(estimator, validation, fused_calls):
    """A ``torch.nn`` encoder or decoder that adds a dimension: Pyro broadcasts the site over
    the data plate, and under validation its site check refuses it; the fused class finds
    the shape (the encoder's before the draw of z, the decoder's after it) and hands the
    call to Pyro, which then raises its own error, or computes its own loss (from a later
    random draw, where the decoder's shape was found after the fused route drew z)."""
    fused_elbo, pyro_elbo = ESTIMATORS[estimator]
    with pyro.validation_enabled(validation):
        for make in (misshapen_encoder, misshapen_decoder):
            vae, x = make()
            assert vae.runs_own_program()  # plain torch modules: recognised, then refused
            with pytest.raises(SiteShapeError, match="batch shape"):
                vae.elbo_loss(x)
            expected = outcome(pyro_elbo(), vae, x)
            fused = outcome(fused_elbo(), vae, x)
            if validation or make is misshapen_encoder:
                assert_same_outcome(fused, expected)
            else:
                assert isinstance(fused[0][0], torch.Tensor) and fused[1] == expected[1]
            if validation:
                assert expected[0][0] is ValueError
    assert len(fused_calls) == 4  # two direct calls, and the fused route tried twice


@pytest.mark.parametrize("weight", [0.0, -0.5, float("nan")])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_kl_weight_that_pyro_refuses_is_refused_alike(weight, estimator, no_fused):
    """Pyro's scale handler accepts only weights > 0: ``vae.kl_weight(0.0)`` or a negative
    weight raises its ValueError on both routes (the fused class trained with them)."""
    vae, x = small_vae()
    fused_elbo, pyro_elbo = ESTIMATORS[estimator]
    with vae.kl_weight(weight):
        expected = outcome(pyro_elbo(), vae, x)
        assert expected[0][0] is ValueError and "Expected scale > 0" in expected[0][1]
        for method in ("differentiable_loss", "loss", "loss_and_grads"):
            assert_same_outcome(outcome(fused_elbo(), vae, x, method), expected)


def _store() -> list[tuple[str, int]]:
    """The param store's names, in order, with the identity of the tensor each holds."""
    return [(name, id(p)) for name, p in pyro.get_param_store().named_parameters()]


@pytest.mark.parametrize("method", ["differentiable_loss", "loss", "loss_and_grads"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_with_no_handler_active_the_param_store_ends_as_pyro_leaves_it(
    method, estimator, fused_calls
):
    """Called with no Pyro handler active, Pyro's ELBO registers the VAE's weights in the
    param store (its model and guide make ``pyro.module`` statements); so does the fused
    class: the same names, in the same order, holding the VAE's own tensors."""
    vae, x = small_vae(likelihood="gaussian")
    stores = []
    for elbo_class in reversed(ESTIMATORS[estimator]):
        pyro.clear_param_store()
        getattr(elbo_class(), method)(vae.model, vae.guide, x, num_data=NUM_DATA)
        stores.append(_store())
    assert len(fused_calls) == 1
    assert stores[1] == stores[0]
    assert {i for _, i in stores[0]} == {id(p) for p in vae.parameters()}
    # the next call finds every weight registered, and leaves the store as it is
    getattr(ESTIMATORS[estimator][0](), method)(vae.model, vae.guide, x, num_data=NUM_DATA)
    assert _store() == stores[0]


@pytest.mark.parametrize("method", ["differentiable_loss", "loss", "loss_and_grads"])
def test_with_no_handler_active_a_stale_model_of_the_same_name_is_replaced_with_a_warning(
    method, fused_calls
):
    """A second VAE named like a first one whose weights are in the param store: Pyro's
    route (the program's wrapper) points the names at the second VAE's weights, with a
    warning; so does the fused class, with no handler active too."""
    first = tiny_vae(image_shape=(1, 8, 8))
    x = data_for(first)
    Trace_ELBO().loss(first.model, first.guide, x)
    stale = _store()
    second = tiny_vae(image_shape=(1, 8, 8))
    with pytest.warns(UserWarning, match="param store held parameters of another model"):
        getattr(FusedTrace_ELBO(), method)(second.model, second.guide, x)
    assert fused_calls
    assert [name for name, _ in _store()] == [name for name, _ in stale]
    assert {i for _, i in _store()} == {id(p) for p in second.parameters()}


def test_a_weight_that_does_not_train_is_left_out_of_the_store_as_pyro_leaves_it(fused_calls):
    """``pyro.module`` registers only weights that train, and warns of the others while the
    module trains; with no handler active the fused class does the same."""
    vae, x = small_vae(likelihood="gaussian")
    vae.likelihood.raw_sigma.requires_grad_(False)
    results = []
    for elbo_class in (Trace_ELBO, FusedTrace_ELBO):
        pyro.clear_param_store()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            elbo_class().loss(vae.model, vae.guide, x)
        results.append((_store(), {str(w.message) for w in caught}))
    assert results[1] == results[0]
    assert any("requires_grad=False" in message for message in results[0][1])
    assert len(fused_calls) == 1


@pytest.mark.parametrize("validation", [True, False])
@pytest.mark.parametrize("nesting", [0, 1])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_max_plate_nesting_behaves_as_in_pyro(nesting, validation, estimator, fused_calls):
    """``max_plate_nesting=0`` leaves no room for the data plate: under validation Pyro's
    site check raises, and so does the fused class (Pyro's route computes it); with 1,
    the fused route computes Pyro's loss."""
    vae, x = small_vae()
    fused_elbo, pyro_elbo = ESTIMATORS[estimator]
    with pyro.validation_enabled(validation):
        expected = outcome(pyro_elbo(max_plate_nesting=nesting), vae, x)
        assert_same_outcome(outcome(fused_elbo(max_plate_nesting=nesting), vae, x), expected)
    if nesting == 0 and validation:
        assert expected[0][0] is ValueError and "plate stack overflow" in expected[0][1]
    assert len(fused_calls) == nesting


@pytest.mark.parametrize("method", ["differentiable_loss", "loss", "loss_and_grads"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_nan_loss_warns_as_pyro_warns_with_validation_off(method, estimator, fused_calls):
    """With validation off, Pyro's ELBO still warns of a NaN loss; so does the fused class."""
    vae, x = small_vae(likelihood="gaussian")
    x[0, 0, 0, 0] = float("nan")
    fused_elbo, pyro_elbo = ESTIMATORS[estimator]
    with pyro.validation_enabled(False):
        expected = outcome(pyro_elbo(), vae, x, method)
        fused = outcome(fused_elbo(), vae, x, method)
    assert "Encountered NaN: loss" in expected[1]
    assert fused[1] == expected[1]
    assert len(fused_calls) == 1


# ----------------------------------------------------------------- the VAE's public seams
@pytest.mark.parametrize("latent", LATENTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_configuration_runs_its_own_program(shape, latent):
    vae = tiny_vae(**LATENTS[latent], **SHAPES[shape], likelihood="gaussian")
    assert vae.runs_own_program() and vae.can_fuse()


def test_runs_own_program_looks_at_what_the_instance_runs():
    """Answers for the instance: PyroSample or PyroParam attributes, a callable set on a
    module, a hook for all modules, a Pyro module, each makes it False."""
    for change in (
        lambda vae: setattr(vae, "extra", PyroSample(pyro.distributions.Normal(0.0, 1.0))),
        lambda vae: setattr(vae, "offset", PyroParam(torch.zeros(()))),
        lambda vae: setattr(vae.likelihood, "distribution", lambda params: None),
        lambda vae: setattr(vae.latent, "prior", lambda *args: None),
        lambda vae: setattr(vae, "_model_body", lambda *args, **kwargs: None),
        lambda vae: setattr(vae.encoder, "net", PyroModule[torch.nn.Linear](64, 6)),
        lambda vae: vae.encoder.register_forward_pre_hook(lambda module, inputs: None),
    ):
        vae, _ = small_vae()
        assert vae.runs_own_program()
        change(vae)
        assert not vae.runs_own_program()
    vae, _ = small_vae()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not vae.runs_own_program()
    finally:
        handle.remove()
    assert vae.runs_own_program()


def test_can_fuse_and_fused_elbo_loss_say_why_not():
    """Frozen, a KL weight of 0, exact codes, a program of its own: ``can_fuse`` is False,
    and ``fused_elbo_loss`` raises a UsageError that says why."""
    vae, x = small_vae()
    with vae.frozen():
        assert not vae.can_fuse()
        with pytest.raises(UsageError, match="frozen"):
            vae.fused_elbo_loss(x)
    with vae.kl_weight(0.0):
        assert not vae.can_fuse()
        with pytest.raises(UsageError, match="KL weight is 0.0"):
            vae.fused_elbo_loss(x)
    discrete, x = small_vae(latent="relaxed-categorical", groups=2, classes=3)
    discrete.eval()
    with pytest.raises(UsageError, match="eval mode"):
        discrete.fused_elbo_loss(x)
    vae, x = own_decoder_factor()
    with pytest.raises(UsageError, match="code of their own"):
        vae.fused_elbo_loss(x)


def test_fused_elbo_loss_is_pyros_differentiable_loss():
    vae, x = small_vae(likelihood="gaussian")
    with vae.kl_weight(KL_WEIGHT):
        expected = loss_and_grads(
            vae, lambda: Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=50)
        )
        fused = loss_and_grads(vae, lambda: vae.fused_elbo_loss(x, num_data=50))
    assert_same(fused, expected)


# ----------------------------------------------------------------- SVI
def _svi_run(elbo, steps: int = 3):
    """A fresh VAE (the same initial weights every time), trained by SVI for ``steps``."""
    pyro.set_rng_seed(0)
    vae = VAE(hidden=16, latent_dim=3, image_shape=(1, 8, 8), likelihood="gaussian").train()
    x = data_for(vae)
    before = {name: p.detach().clone() for name, p in vae.named_parameters()}
    with pyro.get_param_store().scope():
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.01}), elbo)
        pyro.set_rng_seed(1)
        losses = [svi.step(x, num_data=NUM_DATA) for _ in range(steps)]
    return before, dict(vae.named_parameters()), losses


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_svi_with_the_fused_elbo_trains_every_parameter_as_pyro_does(estimator, fused_calls):
    """Three SVI steps (pyro.optim.Adam) from the same weights and seed: every parameter,
    the Gaussian likelihood's sigma included, moves, to where Pyro's ELBO takes it."""
    fused_elbo, pyro_elbo = ESTIMATORS[estimator]
    _, want, want_losses = _svi_run(pyro_elbo())
    before, after, losses = _svi_run(fused_elbo())
    assert len(fused_calls) == 3
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert set(after) == set(before) and "likelihood.raw_sigma" in after
    for name, value in after.items():
        assert not torch.equal(value, before[name]), f"{name} did not train"
        torch.testing.assert_close(value, want[name], rtol=1e-4, atol=1e-6)


def test_fused_svi_registers_the_same_parameters_as_pyro(fused_calls):
    """Under SVI's parameter-only trace, the fused route makes the param statements that
    model and guide make: the same names, the VAE's own tensors."""
    vae = tiny_vae(image_shape=(1, 8, 8), likelihood="gaussian")
    x = data_for(vae)
    sites = []
    for elbo in (Trace_ELBO(), FusedTrace_ELBO()):
        with poutine.trace(param_only=True) as capture:
            elbo.differentiable_loss(vae.model, vae.guide, x)
        sites.append({n: s["value"].unconstrained() for n, s in capture.trace.nodes.items()})
    assert len(fused_calls) == 1
    assert sites[1].keys() == sites[0].keys()
    own = {id(p) for p in vae.parameters()}
    assert {id(p) for p in sites[1].values()} == own


def test_fused_svi_claims_the_store_from_a_stale_model_of_the_same_name(fused_calls):
    """A second VAE named like a first one (a notebook cell run twice) trains its own
    weights under SVI with the fused ELBO, as it does with Pyro's."""
    first = tiny_vae(image_shape=(1, 8, 8))
    x = data_for(first)
    SVI(first.model, first.guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO()).step(x)
    stale = {name: p.detach().clone() for name, p in first.named_parameters()}
    second = tiny_vae(image_shape=(1, 8, 8))
    before = {name: p.detach().clone() for name, p in second.named_parameters()}
    svi = SVI(second.model, second.guide, pyro.optim.Adam({"lr": 0.01}), FusedTrace_ELBO())
    with pytest.warns(UserWarning, match="param store held parameters of another model"):
        svi.step(x)
    assert fused_calls
    for name, p in second.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not train"
    for name, p in first.named_parameters():
        assert torch.equal(p, stale[name]), f"the stale model's {name} moved"


def test_a_frozen_vae_is_not_trained_by_svi_with_the_fused_elbo(no_fused):
    """Inside ``frozen()`` the fused class leaves the VAE to Pyro, where its weights make no
    param statements: the VAE's own parameters never reach the optimizer."""
    vae = tiny_vae(image_shape=(1, 8, 8))
    x = data_for(vae)
    before = {name: p.detach().clone() for name, p in vae.named_parameters()}

    def model(x):
        loc = pyro.param("shift", torch.zeros(()))
        with vae.frozen():
            vae.model(x + 0 * loc)
        pyro.sample("extra", pyro.distributions.Normal(loc, 1.0), obs=torch.ones(()))

    def guide(x):
        with vae.frozen():
            vae.guide(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), FusedTrace_ELBO()).step(x)
    assert pyro.param("shift").item() != 0.0
    for name, p in vae.named_parameters():
        assert torch.equal(p, before[name])


# ----------------------------------------------------------------- compiled
def _compile_unavailable() -> str | None:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        importlib.import_module("torch._inductor.config")  # imports torch._dynamo too
    except ImportError as error:
        return f"torch.compile's inductor backend cannot be imported: {error}"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) is not supported on this Python or platform"
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        return "inductor compiles C++ on the CPU, and no C compiler (gcc, cc) is on the PATH"
    return None


def test_compiled_fused_loss_equals_eager_and_takes_weight_and_temperature_as_inputs():
    """``torch.compile`` of a step calling ``vae.elbo_loss`` with the KL weight and the
    temperature as tensors: the loss of eager code at three settings of both, from one
    compilation. Inductor draws its own random numbers unless ``fallback_random`` asks it
    to call torch's, which eager code uses too."""
    unavailable = _compile_unavailable()  # asked here, so collection need not import inductor
    if unavailable:
        pytest.skip(unavailable)
    from torch._dynamo.testing import CompileCounterWithBackend

    vae = tiny_vae(latent="relaxed-categorical", straight_through=True, image_shape=(1, 8, 8))
    x = data_for(vae)

    def step(x, kl_weight, temperature):
        return vae.elbo_loss(x, num_data=NUM_DATA, kl_weight=kl_weight, temperature=temperature)

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter)
    patch = torch._inductor.config.patch(fallback_random=True, compile_threads=1)
    with patch, pyro.validation_enabled(False):
        losses = set()
        for weight, temperature in ((0.3, 0.7), (0.6, 0.4), (1.0, 2.0)):
            inputs = x, torch.tensor(weight), torch.tensor(temperature)
            pyro.set_rng_seed(11)
            eager = step(*inputs)
            pyro.set_rng_seed(11)
            torch.testing.assert_close(compiled(*inputs), eager, rtol=1e-5, atol=0.0)
            losses.add(eager.item())
    assert len(losses) == 3  # the inputs changed the loss ...
    assert counter.frame_count == 1  # ... and compiled code took them without recompiling


def test_fits_compiled_elbo_module_equals_eager_through_the_schedules():
    """What fit(compile=True) runs: ELBOLoss with compile, its KL weight and temperature
    set by the schedules between steps, against the same module eager."""
    unavailable = _compile_unavailable()
    if unavailable:
        pytest.skip(unavailable)
    from pyro_vae.train import ELBOLoss

    vae = tiny_vae(latent="relaxed-categorical", image_shape=(1, 8, 8))
    x = data_for(vae)
    eager, compiled = ELBOLoss(vae, "trace", NUM_DATA), ELBOLoss(vae, "trace", NUM_DATA, True)
    patch = torch._inductor.config.patch(fallback_random=True, compile_threads=1)
    with patch, pyro.validation_enabled(False):
        for weight, temperature in ((0.2, 1.5), (0.9, 0.5)):
            for module in (eager, compiled):
                module.weight = weight
            vae.latent.temperature = temperature
            pyro.set_rng_seed(3)
            expected = eager(x)
            pyro.set_rng_seed(3)
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=0.0)


# ----------------------------------------------------------------- the cheap building blocks
def test_total_log_prob_is_the_sum_of_log_prob_in_value_and_gradient():
    """total_log_prob sums a distribution's log-densities in fewer operations (through a
    plain Independent to its base; BernoulliImage in one reduction): the same number and
    the same gradient as log_prob(value).sum(), broadcasting included."""
    from pyro_vae.latents import DiagonalNormal, RelaxedCategorical
    from pyro_vae.likelihoods import BernoulliImage, total_log_prob

    torch.manual_seed(0)
    params = torch.randn(4, 1, 3, 3, requires_grad=True)
    binary = torch.rand(4, 1, 3, 3).round()
    scale = torch.nn.functional.softplus(params[:, 0, 0]) + 0.1
    normal = DiagonalNormal(params[:, 0, 1], scale).to_event(1)
    relaxed = RelaxedCategorical(torch.tensor(0.7), logits=params[:, 0]).to_event(1)
    cases = {
        "bernoulli image": (BernoulliImage(params, 3), binary),
        "bernoulli image, broadcast value": (BernoulliImage(params[:1], 3), binary),
        "normal, its own draw": (normal, normal.rsample()),
        "normal, another value": (normal, params[:, 0, 2].detach()),
        "relaxed categorical": (relaxed, relaxed.rsample()),
        "continuous bernoulli": (
            pyro.distributions.ContinuousBernoulli(logits=params).to_event(3),
            binary * 0.5 + 0.2,
        ),
    }
    for name, (d, value) in cases.items():
        expected = d.log_prob(value).sum()
        total = total_log_prob(d, value)
        torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-5, msg=name)
        want = torch.autograd.grad(expected, params, retain_graph=True)[0]
        got = torch.autograd.grad(total, params, retain_graph=True)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_a_straight_through_code_keeps_the_relaxed_sample_it_was_quantized_from():
    """``relaxed_sample`` finds the relaxed draw behind a straight-through code, which its
    density scores; any other tensor is its own relaxed sample."""
    from pyro_vae.latents import RelaxedCategoricalStraightThrough, relaxed_sample

    torch.manual_seed(0)
    q = RelaxedCategoricalStraightThrough(torch.tensor(0.5), logits=torch.randn(4, 3))
    code = q.rsample()
    soft = relaxed_sample(code)
    assert soft is not code and ((soft > 0) & (soft < 1)).all()
    assert torch.equal(code, torch.nn.functional.one_hot(soft.argmax(-1), 3).to(code.dtype))
    assert torch.equal(q.log_prob(code), q.log_prob(soft))
    assert relaxed_sample(soft) is soft


def test_the_quickly_built_distributions_behave_as_torchs():
    """The latent's Normals and the Bernoulli image skip broadcasting in their constructors;
    they still expand, sample, broadcast and describe themselves as torch's do."""
    from pyro_vae.latents import DiagonalNormal, StandardNormal
    from pyro_vae.likelihoods import BernoulliImage

    loc, scale = torch.randn(4, 3), torch.rand(4, 3) + 0.1
    for cls in (DiagonalNormal, StandardNormal):
        ours, theirs = cls(loc, scale), torch.distributions.Normal(loc, scale)
        assert ours.batch_shape == theirs.batch_shape == (4, 3)
        expanded = ours.expand((2, 4, 3))
        assert type(expanded) is cls and expanded.sample().shape == (2, 4, 3)
        torch.testing.assert_close(expanded.mean, theirs.expand((2, 4, 3)).mean)
        torch.testing.assert_close(ours.entropy(), theirs.entropy())
        broadcast = cls(loc, 2.0)  # a number for the scale: built as any Normal
        torch.testing.assert_close(broadcast.scale, torch.full((4, 3), 2.0))
    logits = torch.randn(4, 1, 2, 2)
    image = BernoulliImage(logits, 3)
    reference = torch.distributions.Bernoulli(logits=logits)
    torch.testing.assert_close(image.mean, reference.mean)
    torch.testing.assert_close(image.base_dist.probs, reference.probs)
    assert image.sample((5,)).shape == (5, 4, 1, 2, 2)
    assert image.expand((3, 4)).sample().shape == (3, 4, 1, 2, 2)
    x = torch.rand(4, 1, 2, 2).round()
    torch.testing.assert_close(image.log_prob(x), reference.log_prob(x).sum((1, 2, 3)))


def test_fits_elbo_module_sends_a_subclass_with_its_own_model_through_pyro(no_fused):
    """ELBOLoss, what fit trains, computes a subclass with a model of its own with Pyro's
    Trace_ELBO, KL weight included."""
    from pyro_vae.train import ELBOLoss

    class OwnModel(VAE):
        def model(self, x=None, **kwargs):
            return super().model(x, **kwargs)

    vae = OwnModel(hidden=16, latent_dim=3, image_shape=(1, 8, 8))
    x = data_for(vae)
    module = ELBOLoss(vae, "trace", NUM_DATA)
    module.weight = KL_WEIGHT
    with pyro.validation_enabled(False):
        pyro.set_rng_seed(5)
        loss = module(x)  # the no_fused fixture fails the test if elbo_loss runs
        pyro.set_rng_seed(5)
        with vae.kl_weight(KL_WEIGHT):
            expected = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=NUM_DATA)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-4)


def test_compile_needs_a_fused_elbo():
    """compile=True compiles the fused loss, so it refuses Pyro's own classes ("-pyro"),
    which the user asked for by name, instead of compiling the fused loss in their place."""
    from pyro_vae import Run, fit

    x = torch.rand(8, 1, 8, 8).round()
    run = Run(epochs=1, compile=True, progress=False, accelerator="cpu")
    for elbo in ("trace-pyro", "meanfield-pyro", "jit"):
        with pytest.raises(UsageError, match="compile"):
            fit(tiny_vae(image_shape=(1, 8, 8)), x, elbo=elbo, run=run)


@pytest.mark.parametrize("name", ["trace", "meanfield"])
def test_fits_elbo_module_equals_the_fused_elbo_class(name, fused_calls):
    from pyro_vae.train import ELBOLoss

    elbo = {"trace": FusedTrace_ELBO, "meanfield": FusedTraceMeanField_ELBO}[name]()
    vae = tiny_vae(image_shape=(1, 8, 8))
    x = data_for(vae)
    module = ELBOLoss(vae, name, NUM_DATA)
    module.weight = KL_WEIGHT

    def through_the_class():
        with vae.kl_weight(KL_WEIGHT):
            return elbo.differentiable_loss(vae.model, vae.guide, x, num_data=NUM_DATA)

    with pyro.validation_enabled(False):
        fused, via_class = (
            loss_and_grads(vae, lambda: module(x)),
            loss_and_grads(vae, through_the_class),
        )
    torch.testing.assert_close(fused[0], via_class[0], rtol=0, atol=0)
    for a, b in zip(fused[1], via_class[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fused_calls == [name == "meanfield"] * 2
    assert module._direct  # the direct route, not the class's, made the first loss


def test_fits_elbo_module_under_a_pyro_handler_takes_the_elbo_classes_route():
    """The direct route is for calls with no Pyro handler active; under one (here a scale),
    ELBOLoss goes through the ELBO class, which hands the call to Pyro's Trace_ELBO."""
    from pyro_vae.train import ELBOLoss

    vae = tiny_vae(image_shape=(1, 8, 8))
    x = data_for(vae)
    module = ELBOLoss(vae, "trace", NUM_DATA)
    with pyro.validation_enabled(False):
        module(x)  # the first call, with no handler, picks the direct route
        assert module._direct
        pyro.set_rng_seed(5)
        with poutine.scale(scale=2.0):
            scaled = module(x)
        pyro.set_rng_seed(5)
        with poutine.scale(scale=2.0):
            expected = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=NUM_DATA)
    torch.testing.assert_close(scaled, expected, rtol=1e-6, atol=1e-4)
