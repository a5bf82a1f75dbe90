"""The VAE as a Pyro model and guide.

Generative story (the model)::

    for each image n in the data plate:
        z_n ~ p(z)                       # latent site  "<name>.z"
        x_n ~ p(x | decoder(z_n))        # observed site "<name>.x"

and the amortized guide ``z_n ~ q(z | encoder(x_n))``. The plate is "<name>.data".
With ``num_data`` given, a batch is a subsample of a data set of that size, and every
log-density in the plate is scaled by ``num_data / batch``, so the ELBO of a batch is
an unbiased estimate of the ELBO of the whole data set.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule, pyro_method
from pyro.poutine.condition_messenger import ConditionMessenger
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.poutine.util import is_validation_enabled as poutine_validation_enabled
from torch.distributions import kl_divergence

from . import internals
from .config import VAEConfig, check_fields
from .errors import DataError, UsageError
from .latents import CategoricalLatent, GaussianLatent, make_latent
from .likelihoods import make_likelihood, total_log_prob
from .nets import (
    ConvDecoder,
    ConvEncoder,
    ConvGridDecoder,
    ConvGridEncoder,
    MLPDecoder,
    MLPEncoder,
)
from .sites import NamedSites, pyro_program


class SiteShapeError(UsageError):
    """A site of the VAE's program would hold another batch of data points than the batch
    (a network of your own that adds or drops a dimension of its output):
    :meth:`VAE.elbo_loss` computes only the batch shape the package's networks give, where
    Pyro's ELBO would broadcast the site over the data plate, or, under validation,
    refuse it. The fused ELBO classes leave such a program to Pyro."""


class VAE(NamedSites, PyroModule):
    """A variational autoencoder whose ``model`` and ``guide`` are ordinary Pyro programs.

    :param config: the architecture; keyword arguments build one when it is omitted,
        e.g. ``VAE(likelihood="gaussian", arch="conv")``.

    Site names are public: :attr:`data_site`, :attr:`z_site`, :attr:`x_site`, each
    prefixed by ``config.name`` so that two VAEs can live in one Pyro program. Parameter
    names in Pyro's param store carry the same prefix.
    """

    def __init__(self, config: VAEConfig | None = None, **kwargs):
        if config is None:
            check_fields(VAEConfig, kwargs, error=TypeError)  # a mistyped keyword, named
            config = VAEConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a VAEConfig or keyword arguments, not both")
        super().__init__(name=config.name)
        self.config = config
        self.latent = make_latent(config)
        if config.arch == "mlp":
            self.encoder = MLPEncoder(
                config.image_shape, config.hidden, self.latent.encoder_features, config.depth
            )
            self.decoder = MLPDecoder(
                self.latent.decoder_features, config.hidden, config.image_shape, config.depth
            )
        elif self.latent.spatial:
            self.encoder = ConvGridEncoder(config.image_shape, config.channels, config.classes)
            self.decoder = ConvGridDecoder(config.classes, config.channels, config.image_shape)
        else:
            self.encoder = ConvEncoder(
                config.image_shape, config.channels, config.hidden, self.latent.encoder_features
            )
            self.decoder = ConvDecoder(
                self.latent.decoder_features, config.channels, config.hidden, config.image_shape
            )
        self.likelihood = make_likelihood(config)
        self._kl_weight = 1.0

    @contextlib.contextmanager
    def kl_weight(self, weight: float) -> Iterator[None]:
        """Scale the latent site by ``weight`` (beta) in both model and guide while inside.

        Scaling log p(z) and log q(z | x) alike multiplies the KL term of the ELBO and
        leaves the reconstruction term alone, as a beta-VAE or a KL warm-up needs.
        """
        previous, self._kl_weight = self._kl_weight, float(weight)
        try:
            yield
        finally:
            self._kl_weight = previous

    # ----------------------------------------------------------------- Pyro programs
    def _program(self, name: str) -> Callable:
        if name == "model" and type(self).model is VAE.model:
            # the ELBO ignores the model's return value: skip computing the mean image
            return functools.partial(VAE._model_body, self)
        return super()._program(name)

    @pyro_program
    def model(
        self,
        x: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """p(z) p(x | z). With ``x`` given it is observed; with ``x=None`` the model draws
        ``batch_size`` new images, or as many as a conditioned z holds
        (``poutine.condition(vae.model, data={vae.z_site: z})()``). Returns the decoder's
        mean image for each z.
        """
        return self.likelihood.mean(self._model_body(x, num_data=num_data, batch_size=batch_size))

    def _model_body(
        self,
        x: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """The sample statements of :meth:`model`; returns the decoder's raw output. The
        ELBO ignores a model's return value, so ``fit`` runs this and skips the mean."""
        like = x if x is not None else self._a_parameter()
        with self._plate(x, num_data, batch_size) as index:
            with self._latent_scale():
                z = pyro.sample(self.z_site, self.latent.prior(index.shape, like))
            self._check_latent(z, index.shape[0])
            params = self.decoder(z)
            pyro.sample(self.x_site, self.likelihood.distribution(params), obs=x)
        return params

    @pyro_program
    def guide(
        self,
        x: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """q(z | x), amortized by the encoder. Returns the sampled z."""
        if x is None:
            raise UsageError(
                "the guide encodes observed images, so it needs x; to generate new images "
                "run the model alone, e.g. vae.model(batch_size=16)"
            )
        if self._exact_codes and self._trains_encoder():
            raise UsageError(
                "this relaxed-categorical VAE is in eval mode, where its codes are exact "
                "one-hot draws with no reparameterized gradient, so SVI would fail or fall "
                "back to a noisy score-function estimator; call vae.train() before training "
                "it (load_vae returns a model in eval mode; fit() switches modes itself)"
            )
        with self._plate(x, num_data, batch_size), self._latent_scale():
            return pyro.sample(self.z_site, self.latent.posterior(self.encoder(x)))

    @property
    def _exact_codes(self) -> bool:
        """Whether z is drawn as exact one-hot codes, which have no reparameterized
        gradient: a relaxed-categorical latent in eval mode (a latent family of your own
        without a ``relaxed`` attribute has none)."""
        return getattr(self.latent, "relaxed", False) and not self.training

    def _trains_encoder(self) -> bool:
        """Whether an SVI step is running that would train the encoder: gradients are on
        for its weights and ``SVI.step`` is collecting parameters (a param-only trace)."""
        if not torch.is_grad_enabled() or not any(
            p.requires_grad for p in self.encoder.parameters()
        ):
            return False
        return any(
            isinstance(handler, TraceMessenger) and handler.param_only
            for handler in internals.pyro_handlers()
        )

    def _plate(
        self, x: torch.Tensor | None, num_data: int | None, batch_size: int | None
    ) -> pyro.plate:
        """The data plate, after checking what the caller passed: model and guide check
        their images here, each (a model may run without its guide)."""
        if x is None:
            if batch_size is None:
                batch_size = self._conditioned_batch()
            batch = int(batch_size)
            device = self._a_parameter().device
        else:
            self._check_images(x)
            batch, device = x.shape[0], x.device
            if batch_size is not None and batch_size != batch:
                raise UsageError(f"batch_size={batch_size} but x holds {batch} images")
        return self._data_plate(batch, device, num_data)

    def _check_images(self, x: torch.Tensor) -> None:
        """Shape and dtype always; support and finiteness while Pyro's validation is on
        (the default; ``fit`` checks its data once and turns validation off per step)."""
        shape = self.config.image_shape
        if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            want = ", ".join(map(str, shape))
            kind = "images" if len(shape) == 3 else "vectors"
            raise DataError(f"expected {kind} of shape (batch, {want}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise DataError(
                f"x is {x.dtype}, but the model observes data made for its likelihood: pass "
                f"pyro_vae.data.preprocess(x, vae.likelihood.preprocessing) (a fresh "
                f"{self.likelihood.preprocessing} of 8-bit images), or x.float() / 255"
            )
        weights = self._a_parameter().dtype
        if x.dtype != weights:
            raise DataError(
                f"x is {x.dtype} but the model's weights are {weights}: pass x.to({weights}) "
                f"or convert the model (vae.to({x.dtype}))"
            )
        if poutine_validation_enabled():
            self.likelihood.check_data(x)

    def _conditioned_batch(self) -> int:
        """How many images a z given by ``poutine.condition`` or ``replay`` holds."""
        for handler in reversed(internals.pyro_handlers()):
            value = None
            if isinstance(handler, ConditionMessenger):
                data = handler.data
                if isinstance(data, poutine.Trace):
                    node = data.nodes.get(self.z_site)
                    value = None if node is None else node["value"]
                else:
                    value = data.get(self.z_site)
            elif isinstance(handler, ReplayMessenger) and self.z_site in handler.trace.nodes:
                value = handler.trace.nodes[self.z_site]["value"]
            if value is not None:
                return self._latent_batch(torch.as_tensor(value), None)
        raise UsageError(
            "with x=None the model needs batch_size (how many images to draw), or a z "
            f"conditioned at {self.z_site!r}"
        )

    @property
    def _z_shape(self) -> tuple[int, ...]:
        """The shape of one data point's z (asked of the prior for a latent that does not
        say it itself)."""
        shape = getattr(self.latent, "event_shape", None)
        if shape is None:
            shape = tuple(self.latent.prior((1,), self._a_parameter()).event_shape)
        return tuple(shape)

    def _latent_batch(self, z: torch.Tensor, batch: int | None) -> int:
        """The batch size of a z of shape ``(..., batch, *latent_shape)``, checked."""
        shape = self._z_shape
        if z.dim() <= len(shape) or tuple(z.shape[z.dim() - len(shape) :]) != shape:
            want = ", ".join(map(str, shape))
            raise UsageError(
                f"{self.z_site} holds a tensor of shape {tuple(z.shape)}, but the model's z has "
                f"shape (batch, {want}), with optional leading sample dimensions; for one "
                f"image use z.unsqueeze(0)"
            )
        found = z.shape[z.dim() - len(shape) - 1]
        if batch is not None and found != batch:
            raise UsageError(
                f"{self.z_site} holds {found} images ({tuple(z.shape)}) but the model was "
                f"called with batch_size={batch}"
            )
        return found

    def _check_latent(self, z: torch.Tensor, batch: int) -> None:
        # the usual case, a z of exactly (batch, *z_shape), needs no more than a comparison
        if tuple(z.shape) == (batch, *self._z_shape):
            return
        self._latent_batch(z, batch)

    def _latent_scale(self) -> contextlib.AbstractContextManager:
        if self._kl_weight == 1.0:
            return contextlib.nullcontext()
        return poutine.scale(scale=self._kl_weight)

    # ----------------------------------------------------------------- plain helpers
    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x) for a batch of images."""
        return self.latent.posterior(self.encoder(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """One code per image: the posterior mean."""
        return self.latent.code(self.encoder(x))

    def decoder_distribution(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z): the model's likelihood for each code, as a Pyro distribution whose event
        is one image (the learned Gaussian sigma included). Use it inside your own model, in
        :meth:`frozen` to keep the fitted decoder fixed. ``z`` is ``(..., batch, *z_shape)``."""
        self._latent_batch(z, None)
        return self.likelihood.distribution(self.decoder(z))

    def elbo_loss(
        self,
        x: torch.Tensor,
        *,
        num_data: int | None = None,
        analytic_kl: bool = False,
        kl_weight: torch.Tensor | float | None = None,
        temperature: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """The negative ELBO estimate of a batch, differentiable, computed straight from the
        distributions that :meth:`guide` and :meth:`model` sample and score, with no Pyro
        tracing: the loss that ``Trace_ELBO().differentiable_loss(vae.model, vae.guide, x,
        num_data=num_data)`` returns (``TraceMeanField_ELBO``'s with ``analytic_kl``), in
        value and gradient, from the same random draw, for a VAE that :meth:`can_fuse`
        (for any other, Pyro's loss is another one). :mod:`pyro_vae.fused` offers it to
        ``SVI`` as an ELBO class, through :meth:`fused_elbo_loss`, which also makes the
        model's and guide's param statements; a training loop that optimizes
        ``vae.parameters()`` itself may call it directly.

        As Pyro does, it draws one ``z ~ q(z | x)`` (the guide, run first), then scores it
        under the prior and ``x`` under the decoder's likelihood (the model, which draws
        nothing); every log-density of the batch is scaled by ``num_data / batch`` (the data
        plate), and those of z by the KL weight too (the scale of the latent site). Tracing
        a model and a guide costs a fixed amount of Python per step, which dominates a step
        on a GPU; here only the networks and the densities run.

        :param x: a batch of observed images (or vectors), as for :meth:`model`.
        :param num_data: size of the data set the batch is a subsample of (default: the batch).
        :param analytic_kl: subtract the KL divergence of q(z | x) from p(z) in closed form
            instead of the single-sample log-density ratio (``TraceMeanField_ELBO``'s
            estimator); for the relaxed-categorical latent this is the KL of the categorical
            codes (:class:`~pyro_vae.latents.RelaxedCategorical`).
        :param kl_weight: scale of the latent terms (beta, warm-up); by default the weight
            set by :meth:`kl_weight`. Pass a tensor under ``torch.compile``: a Python float
            that changes from step to step would be compiled in as a constant, again and again.
        :param temperature: Concrete temperature of a relaxed-categorical latent; by default
            ``vae.latent.temperature``; a tensor under ``torch.compile``, as ``kl_weight``.
            Ignored by latents without one.
        :raises UsageError: for a relaxed-categorical VAE in eval mode, whose exact one-hot
            codes have no reparameterized gradient: call ``vae.train()`` first, or score the
            discrete model through Pyro (:func:`pyro_vae.elbo`).
        """
        self._check_images(x)
        latent = self.latent
        if self._exact_codes:
            raise UsageError(
                "elbo_loss reparameterizes through z, but this relaxed-categorical VAE is in "
                "eval mode, where its codes are exact one-hot draws; call vae.train() to "
                "train it, or score the discrete model with Pyro (pyro_vae.elbo, Trace_ELBO)"
            )
        batch = x.shape[0]
        size = self._plate_size(batch, num_data)
        weight = self._kl_weight if kl_weight is None else kl_weight
        # Each site's scale as Pyro builds it: the latent scale, then the plate's size / batch
        # (multiplied in that order, so that Python floats round alike). Pyro scales each
        # data point's log-density and sums; the sum is scaled here, which is the same
        # number up to float rounding and two operations fewer per site.
        z_scale = weight * size / batch
        x_scale = 1.0 * size / batch
        relax = {}
        if temperature is not None and hasattr(latent, "temperature"):
            relax["temperature"] = temperature
        q = latent.posterior(self.encoder(x), **relax)
        _check_site(self.z_site, q, batch)  # before the draw
        # the one draw of a step, as the guide's sample statement makes it. Scoring must see
        # this very tensor: a straight-through code carries the relaxed sample it came from.
        z = q.rsample()
        p = latent.prior(torch.Size((batch,)), x, **relax)
        likelihood = self.likelihood.distribution(self.decoder(z))
        _check_site(self.x_site, likelihood, batch)
        log_lik = total_log_prob(likelihood, x)
        if analytic_kl:
            latent_terms = -kl_divergence(q, p).sum()
        else:
            latent_terms = total_log_prob(p, z) - total_log_prob(q, z)
        return -(_scaled(latent_terms, z_scale) + _scaled(log_lik, x_scale))

    # ----------------------------------------------------------------- the fused ELBO
    def runs_own_program(self) -> bool:
        """Whether calling this instance's :meth:`model` and :meth:`guide` runs the
        package's own program and nothing else, so that :meth:`elbo_loss` computes what
        Pyro's ELBO computes of them.

        It asks what the *instance* will run, not only what its class defines: the class
        overrides nothing of :class:`VAE` (it may add methods); no method or other callable
        is replaced on the instance or on any of its modules; every submodule is a plain
        (not Pyro) module of a class from ``torch.nn`` or of the package's networks,
        likelihoods and latents, with no forward hook, and no forward hook is registered
        for all modules; the VAE holds no ``PyroSample`` or ``PyroParam`` attribute; the
        latent family is the package's own. A module of your own might hold a
        ``pyro.sample``, ``PyroSample`` or ``pyro.factor`` statement, which the fused loss
        would not see, so any of them answers False, and the fused ELBO leaves the program
        to Pyro. It walks the modules on every call, since any of them may change between
        two steps: about 15 microseconds for the default networks on a CPU.
        """
        if not _keeps_program(type(self)):
            return False
        if internals.has_pyro_attributes(self) or _has_callable_attribute(self):
            return False
        latent = vars(self).get("latent")  # a plain latent family; a module one is a child
        if latent is not None and (type(latent) not in _LATENTS or _has_callable_attribute(latent)):
            return False
        if internals.has_global_forward_hooks():
            return False
        for module in self.modules():
            if module is not self and (
                not _plain_module_class(type(module))
                or internals.has_forward_hooks(module)
                or _has_callable_attribute(module)
            ):
                return False
        return True

    def can_fuse(self) -> bool:
        """Whether :meth:`fused_elbo_loss` may compute this VAE's ELBO now: it runs its own
        program (:meth:`runs_own_program`), it is not :meth:`frozen`, its KL weight is
        positive (Pyro's scale handler refuses 0 and negative weights, and so must the
        fused loss) and its codes are reparameterized (not a relaxed-categorical latent in
        eval mode). :mod:`pyro_vae.fused` asks this before every loss."""
        return self._fusion_obstacle() is None

    def _fusion_obstacle(self) -> str | None:
        """Why :meth:`can_fuse` is False (None when it is True); the cheap checks first."""
        if self._frozen:
            return "the VAE is frozen, so its weights make no param statements"
        if not self._kl_weight > 0:  # NaN too
            return (
                f"its KL weight is {self._kl_weight}, and Pyro's scale handler accepts only "
                "weights > 0"
            )
        if self._exact_codes:
            return "its relaxed-categorical latent is in eval mode, drawing exact codes"
        if not self.runs_own_program():
            return (
                "its model and guide run code of their own (a subclass's method, a module, "
                "latent or likelihood of your own, a PyroSample, a replaced method or a hook)"
            )
        return None

    def fused_elbo_loss(
        self,
        x: torch.Tensor,
        *,
        num_data: int | None = None,
        analytic_kl: bool = False,
        check: bool = True,
    ) -> torch.Tensor:
        """What Pyro's ``Trace_ELBO().differentiable_loss(vae.model, vae.guide, x,
        num_data=num_data)`` (``TraceMeanField_ELBO``'s with ``analytic_kl``) computes, with
        its effects on Pyro's param store: the loss of :meth:`elbo_loss`, at the weight of
        :meth:`kl_weight`, computed as :meth:`model` and :meth:`guide` run.

        As their Pyro-program wrapper does, it first claims the VAE's parameter names in
        Pyro's param store (replacing a stale model's tensors of the same names, with a
        warning), then runs inside the module's Pyro context, where reading each submodule
        makes a ``pyro.module`` statement: with no handler active that registers the
        weights in the param store, under ``SVI``'s parameter-only trace it records them,
        as the model and guide would. What :mod:`pyro_vae.fused` computes.

        :param check: ask :meth:`can_fuse` first; False only for a caller that has just
            asked it (:mod:`pyro_vae.fused` does, to choose its route): a walk over the
            modules, some microseconds, saved on each step.
        :raises UsageError: where :meth:`can_fuse` is False, saying why; Pyro's ELBO
            computes (or refuses) such a VAE itself.
        """
        return self._as_program(
            lambda: self.elbo_loss(x, num_data=num_data, analytic_kl=analytic_kl), check
        )

    def _as_program(self, loss: Callable, check: bool):
        """``loss()`` with the param-store effects of :meth:`model` and :meth:`guide` (see
        :meth:`fused_elbo_loss`), after asking :meth:`can_fuse` if ``check``."""
        obstacle = self._fusion_obstacle() if check else None
        if obstacle is not None:
            raise UsageError(
                f"the fused ELBO cannot stand in for Pyro's here: {obstacle}; compute the loss "
                "with Pyro's Trace_ELBO (or TraceMeanField_ELBO) of vae.model and vae.guide"
            )
        registered = self._claim_param_store()
        if registered and not internals.pyro_handlers():
            # nothing would record the param statements, and the store holds every weight
            # already: running them (a few hundred microseconds) would change nothing
            return loss()
        return self._with_param_statements(loss)

    @pyro_method
    def _with_param_statements(self, loss: Callable):
        """``loss()`` in the module's Pyro context, as ``pyro_method`` runs model and guide:
        there, reading a submodule makes its ``pyro.module`` statement."""
        return loss()

    def iwae_loss(
        self,
        x: torch.Tensor,
        *,
        num_data: int | None = None,
        num_particles: int = 5,
        estimator: str = "iwae",
        kl_weight: torch.Tensor | float | None = None,
        temperature: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, surrogate)`` of the per-image importance-weighted bound with
        ``num_particles`` particles, computed straight from the distributions of
        :meth:`guide` and :meth:`model`, with no Pyro tracing: what
        :class:`~pyro_vae.objectives.IWAE_ELBO` computes for ``vae.model`` and
        ``vae.guide``, in value and gradient, from the same random draws. The loss is
        ``-sum_n L_k(x_n)`` scaled by ``num_data / batch``; the surrogate's gradient is
        the ``estimator``'s ("iwae", "dreg", "stl"; see :mod:`pyro_vae.objectives`).

        :param kl_weight: weight of the latent terms inside each log weight (default:
            :meth:`kl_weight`'s); 1 is the bound.
        """
        from .objectives import ESTIMATORS, bound_and_surrogate

        if estimator not in ESTIMATORS:
            raise UsageError(f"unknown estimator {estimator!r}; choose one of: {ESTIMATORS}")
        self._check_images(x)
        if self._exact_codes:
            raise UsageError(
                "iwae_loss reparameterizes through z, but this relaxed-categorical VAE is in "
                "eval mode, where its codes are exact one-hot draws; call vae.train() first"
            )
        latent, batch = self.latent, x.shape[0]
        relax = {}
        if temperature is not None and hasattr(latent, "temperature"):
            relax["temperature"] = temperature
        encoded = self.encoder(x)
        q = latent.posterior(encoded, **relax)
        z = q.rsample((num_particles,))  # (k, batch, *z_shape)
        if estimator != "iwae":  # the guide's parameters held fixed in log q
            q = latent.posterior(encoded.detach(), **relax)
        p = latent.prior(torch.Size((batch,)), x, **relax)
        log_lik = self.likelihood.distribution(self.decoder(z)).log_prob(x)
        weight = self._kl_weight if kl_weight is None else kl_weight
        log_w = log_lik + _scaled(p.log_prob(z) - q.log_prob(z), weight)
        scale = self._plate_size(batch, num_data) / batch
        return bound_and_surrogate(log_w, scale, estimator, [(z, 0, 1)])

    def fused_iwae_loss(
        self,
        x: torch.Tensor,
        *,
        num_data: int | None = None,
        num_particles: int = 5,
        estimator: str = "iwae",
        check: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`iwae_loss` with the param-store effects of running :meth:`model` and
        :meth:`guide`, as :meth:`fused_elbo_loss` has them: what
        :class:`~pyro_vae.objectives.IWAE_ELBO` computes for this VAE.

        :param check: ask :meth:`can_fuse` first (see :meth:`fused_elbo_loss`).
        """
        return self._as_program(
            lambda: self.iwae_loss(
                x, num_data=num_data, num_particles=num_particles, estimator=estimator
            ),
            check,
        )

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's mean image for each code; any leading dimensions are kept."""
        return self.likelihood.mean(self.decoder(z))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)): the mean image of each input's most likely code."""
        return self.decode(self.encode(x))

    def sample(self, num_images: int) -> torch.Tensor:
        """Mean images decoded from ``num_images`` draws of the prior."""
        like = self._a_parameter()
        return self.decode(self.latent.prior((num_images,), like).sample())

    # ----------------------------------------------------------------- discrete codes
    def tokenize(
        self, x: torch.Tensor, draw: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Integer codes of images: the posterior's most likely class of every code,
        ``(batch, groups)`` for an MLP or ``(batch, H/4, W/4)`` for a conv grid.

        :param draw: a draw from the categorical posterior q(z | x) instead of its most
            likely class (what a prior fitted to maximize the ELBO must model: see
            :func:`pyro_vae.tokenizer.tokenize_images`).
        :param generator: of the draw, for reproducible codes.
        """
        latent = self._categorical("tokenize")
        encoded = self.encoder(x)
        return latent.draw_tokens(encoded, generator) if draw else latent.tokens(encoded)

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's mean image for each grid or row of integer ``tokens``."""
        latent = self._categorical("detokenize")
        like = self._a_parameter()
        return self.decode(latent.one_hot(tokens.to(like.device), like.dtype))

    def with_prior(self, prior) -> VAE:
        """This discrete VAE with a learned prior over its codes in place of the uniform
        one: a new VAE with a copy of these weights, whose latent site's prior is
        ``prior`` (a fitted :class:`~pyro_vae.prior.TokenPrior`, shared, not copied), in
        eval mode. Its :meth:`model`, ``Predictive``, :mod:`pyro_vae.evaluate` (ELBO and
        IWAE bounds of the discrete model) and :mod:`pyro_vae.ppc` work as for any VAE;
        a conditional prior's caption is marginalized (uniform over its classes). It is
        for evaluation and generation: training mode is refused.
        """
        from .prior import PriorLatent

        latent = self._categorical("with_prior")
        config = prior.config
        if config.vocab_size != latent.codebook_size or config.length != math.prod(
            latent.code_shape
        ):
            raise UsageError(
                f"the prior models {config.length} tokens of {config.vocab_size} values, but "
                f"this VAE's codes are {math.prod(latent.code_shape)} of "
                f"{latent.codebook_size}; fit the prior on this VAE's tokens"
            )
        weight = self._a_parameter()
        combined = type(self)(self.config).to(device=weight.device, dtype=weight.dtype)
        combined.load_state_dict(self.state_dict())
        combined.latent = PriorLatent(combined.latent, prior)
        return combined.eval()

    def _categorical(self, what: str):
        if getattr(self.latent, "codebook_size", None) is None:
            raise UsageError(
                f"{what} needs discrete codes, but this VAE has latent {self.config.latent!r}; "
                "train one with latent 'relaxed-categorical'"
            )
        return self.latent


#: the package's latent families, whose densities elbo_loss reproduces
_LATENTS = (GaussianLatent, CategoricalLatent)
#: the package's modules whose classes hold no Pyro statements (networks, likelihoods,
#: latent families); with torch.nn's, what a VAE's submodules may be for the fused loss
_PLAIN_PACKAGE_MODULES = ("pyro_vae.nets", "pyro_vae.likelihoods", "pyro_vae.latents")
#: class attributes that describe a class rather than make up its program: a subclass of
#: VAE has its own, and its own __init__ (what it builds is checked on the instance)
_CLASS_METADATA = frozenset(
    {
        "__init__",
        "__doc__",
        "__module__",
        "__qualname__",
        "__dict__",
        "__weakref__",
        "__annotations__",
        "__firstlineno__",
        "__static_attributes__",
        "__parameters__",
        "__orig_bases__",
        "__abstractmethods__",
        "__slotnames__",  # copyreg caches it on a class that is deep-copied
        "_abc_impl",
    }
)
_MISSING = object()


def _class_attribute(cls: type, name: str) -> object:
    """What ``cls`` defines as ``name`` (the raw function, property or value, unbound), as
    attribute lookup finds it along the MRO."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return vars(klass)[name]
    return _MISSING


@functools.cache
def _keeps_program(cls: type) -> bool:
    """Whether ``cls``, a subclass of VAE, leaves every attribute that VAE and its bases
    define as they are: overriding any method (model, guide, a check, a context manager,
    attribute access itself) may change what model and guide do. New methods are fine.
    A question about the class, answered once."""
    if cls is VAE:
        return True
    names = {name for klass in VAE.__mro__[:-1] for name in vars(klass)} - _CLASS_METADATA
    return all(_class_attribute(cls, name) is _class_attribute(VAE, name) for name in names)


@functools.cache
def _plain_module_class(cls: type) -> bool:
    """Whether modules of class ``cls`` make no Pyro statements: a class of ``torch.nn`` or
    of the package's networks, likelihoods and latents, and not a Pyro module (whose
    ``PyroSample`` attributes sample when they are read)."""
    where = cls.__module__
    plain = where == "torch.nn" or where.startswith("torch.nn.") or where in _PLAIN_PACKAGE_MODULES
    return plain and not issubclass(cls, PyroModule)


def _has_callable_attribute(obj: object) -> bool:
    """Whether ``obj`` holds a function (or other callable) in its own ``__dict__``: a method
    replaced on the instance (``decoder.forward = ...``), or a function it would call. The
    package's modules and torch's keep none there."""
    return any(map(callable, vars(obj).values()))


def _check_site(name: str, distribution: dist.TorchDistribution, batch: int) -> None:
    """Raise :class:`SiteShapeError` unless ``distribution`` holds one data point per image
    of the batch, as the sites of the package's program do."""
    if distribution.batch_shape != (batch,):
        raise SiteShapeError(
            f"site {name!r} has batch shape {tuple(distribution.batch_shape)}, but the batch "
            f"holds {batch} data points (a network of your own returns outputs of another "
            "shape than the package's): elbo_loss computes only the package's shapes; "
            "Pyro's Trace_ELBO broadcasts the site over the data plate or refuses it"
        )


def _scaled(log_density: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``log_density * scale``, skipping the product for a scale of exactly 1 as Pyro does."""
    if not isinstance(scale, torch.Tensor) and scale == 1.0:
        return log_density
    return log_density * scale
