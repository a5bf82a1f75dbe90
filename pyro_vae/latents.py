"""Latent families: the prior p(z), and the amortized posterior q(z | x) built from an encoding.

A family also says how wide the encoder's output and the decoder's input are, so the
networks are sized from it rather than from the latent dimension directly.

Some draws carry what scoring them cheaply and exactly needs (their noise, their log,
the relaxed sample behind a straight-through code) as attributes of the tensor, each
named ``pyro_vae_*`` so that it cannot collide with torch's or Pyro's own.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.relaxed_straight_through import QuantizeCategorical
from torch import nn
from torch.distributions import Distribution, kl_divergence, register_kl

from . import internals
from .config import VAEConfig
from .errors import UsageError
from .likelihoods import full_precision

#: the smallest posterior standard deviation: softplus alone underflows to exactly 0.
MIN_SCALE = 1e-5


#: log of the standard normal density's normalizer, sqrt(2 pi).
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class _SameShapeNormal(dist.Normal):
    """A Normal built without ``broadcast_all`` when ``loc`` and ``scale`` are tensors of
    one shape, as the latent's always are: nothing to broadcast, and a training step
    builds two of these. Otherwise it is built as any Normal."""

    def __init__(self, loc, scale, validate_args: bool | None = None):
        if isinstance(loc, torch.Tensor) and isinstance(scale, torch.Tensor):
            if loc.shape == scale.shape:
                self.loc, self.scale = loc, scale
                Distribution.__init__(self, loc.shape, validate_args=validate_args)
                return
        super().__init__(loc, scale, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(type(self), _instance)
        return super().expand(batch_shape, _instance=new)


class StandardNormal(_SameShapeNormal):
    """N(0, 1) (``loc`` 0 and ``scale`` 1, broadcast to a batch shape) whose log-density is
    ``-z^2 / 2 - log sqrt(2 pi)``: two operations where the general Normal's takes seven,
    the same value and gradient. The prior of :class:`GaussianLatent`."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_density = (value * value).mul(-0.5).sub(HALF_LOG_2PI)
        batch = self.batch_shape
        if value.shape[value.dim() - len(batch) :] == batch:
            return log_density  # the usual case; broadcast_shapes is slow in Python
        return log_density.expand(torch.broadcast_shapes(value.shape, batch))


class DiagonalNormal(_SameShapeNormal):
    """A Normal whose reparameterized draws ``z = loc + scale * eps`` carry their noise
    ``eps``, so that the log-density of such a draw, *under the distribution that drew
    it*, is ``-eps^2 / 2 - log scale - log sqrt(2 pi)``. That is the general formula with
    ``(z - loc) / scale = eps`` substituted: the same value, and the same gradient (the
    pathwise terms of the general formula cancel exactly), in three operations instead of
    seven. Any other value, or a draw scored by another distribution, takes the general
    formula. The posterior of :class:`GaussianLatent`."""

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = internals.standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device)
        value = self.loc + eps * self.scale
        # the version counter tells if the draw was changed in place since
        value.pyro_vae_noise = (self, eps, internals.version(value))
        return value

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        owner, eps, version = getattr(value, "pyro_vae_noise", (None, None, None))
        if owner is not self or self._validate_args or version != internals.version(value):
            return super().log_prob(value)
        return (eps * eps).mul(-0.5) - self.scale.log() - HALF_LOG_2PI


class GaussianLatent:
    """z ~ N(0, I) in ``dim`` dimensions, with a diagonal Normal posterior.

    The encoder emits ``2 * dim`` numbers: the mean, and a raw scale mapped through
    softplus (plus :data:`MIN_SCALE`), so the posterior scale is positive and never 0.
    """

    def __init__(self, dim: int):
        self.dim = dim
        #: the codes are a vector, not a spatial grid, so the usual networks apply.
        self.spatial = False
        self.encoder_features = 2 * dim
        self.decoder_features = dim
        #: shape of one data point's z.
        self.event_shape = (dim,)
        #: trained through a relaxation that only training mode uses (see CategoricalLatent).
        self.relaxed = False

    def prior(self, batch_shape: torch.Size, like: torch.Tensor) -> dist.TorchDistribution:
        """N(0, I) for ``batch_shape`` data points, on the device and dtype of ``like``."""
        shape = (*batch_shape, self.dim)
        return StandardNormal(
            like.new_zeros(()).expand(shape), like.new_ones(()).expand(shape)
        ).to_event(1)

    def posterior(self, encoded: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x) from the encoder output ``(..., 2 * dim)``."""
        loc, raw_scale = full_precision(encoded).split(self.dim, dim=-1)
        return DiagonalNormal(loc, F.softplus(raw_scale) + MIN_SCALE).to_event(1)

    def code(self, encoded: torch.Tensor) -> torch.Tensor:
        """The single most representative z for an input: the posterior mean."""
        return encoded[..., : self.dim]


class RelaxedCategorical(dist.RelaxedOneHotCategorical):
    """:class:`~pyro.distributions.RelaxedOneHotCategorical` whose log-density stays finite
    at any temperature in float32, and whose KL is that of the categorical it relaxes.

    A relaxed one-hot sample is ``y = exp(x)`` with ``x`` a log-space Concrete draw. At a
    low temperature ``x`` reaches -100 and below, ``exp(x)`` underflows to 0 in float32,
    and torch's ``log_prob(y)`` takes ``log(0)``: -inf, then NaN. Here each sample keeps
    its exact log as an attribute, and the density of ``y`` is computed from ``log y``
    (the ExpConcrete density of Maddison et al., 2017, plus the Jacobian of ``exp``). A
    value that does not carry its log (one not drawn here) is clamped to the smallest
    positive float first: still finite, and no change that a float could represent.

    ``kl_divergence`` between two of these is the KL between the *categorical*
    distributions with their logits, i.e. between the discrete codes that the relaxed
    samples stand for, not between the relaxed densities. ``TraceMeanField_ELBO`` then
    trains with Jang et al.'s objective (relaxed reconstruction, exact categorical KL);
    ``Trace_ELBO`` scores samples with the relaxed densities (Maddison et al.'s).
    """

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        log_y = self.base_dist.rsample(sample_shape)
        y = log_y.exp()
        y.pyro_vae_log = log_y
        return y

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        log_y = getattr(value, "pyro_vae_log", None)
        if log_y is None:
            log_y = value.clamp(min=torch.finfo(value.dtype).tiny).log()
        # ExpConcrete density of log y, plus the log-Jacobian of y = exp(x)
        return self.base_dist.log_prob(log_y) - log_y.sum(-1)


class RelaxedCategoricalStraightThrough(
    RelaxedCategorical, dist.RelaxedOneHotCategoricalStraightThrough
):
    """Straight-through Gumbel-softmax: samples are exact one-hot codes, gradients flow
    through the relaxed sample, and ``log_prob`` scores the relaxed sample that the code
    was quantized from. Scoring needs that very tensor (not a clone), in the guide and in
    the model alike, so both sides must use this class."""

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        soft = super().rsample(sample_shape)
        hard = QuantizeCategorical.apply(soft)
        hard.pyro_vae_relaxed = soft
        return hard

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return super().log_prob(relaxed_sample(value))


def relaxed_sample(code: torch.Tensor) -> torch.Tensor:
    """The relaxed sample that a straight-through ``code`` was quantized from
    (:class:`RelaxedCategoricalStraightThrough` keeps it with the code), or ``code`` itself
    for any other tensor: what the relaxed densities score."""
    return getattr(code, "pyro_vae_relaxed", code)


@register_kl(RelaxedCategorical, RelaxedCategorical)
def _categorical_kl(p: RelaxedCategorical, q: RelaxedCategorical) -> torch.Tensor:
    return kl_divergence(
        dist.Categorical(logits=p.base_dist.logits), dist.Categorical(logits=q.base_dist.logits)
    )


class CategoricalLatent(nn.Module):
    """Discrete codes: ``code_shape`` independent categorical variables of ``classes`` each,
    under a uniform prior, with a factorized categorical posterior.

    ``code_shape`` is ``(groups,)`` for an MLP, or ``(height, width)``: a spatial grid of
    codes for convolutional networks. A code is stored one-hot, so z has shape
    ``(..., *code_shape, classes)``.

    In training mode (``vae.train()``) the codes are relaxed: the guide draws from a
    Concrete / Gumbel-softmax distribution at :attr:`temperature`, scored by the relaxed
    uniform prior of the same class and temperature, so ``Trace_ELBO`` reparameterizes
    through the sample (Jang et al., 2017; Maddison et al., 2017). In evaluation mode
    (``vae.eval()``) the model is the discrete one: exact one-hot codes from the
    categorical posterior, scored by the uniform categorical prior, so ELBOs and
    importance weights are bounds on the log-likelihood of the discrete model.

    It is an ``nn.Module`` without parameters only so that it follows its VAE's
    train/eval mode.

    :param straight_through: draw exact one-hot codes in training too, with gradients of
        the relaxed sample (the straight-through estimator).
    """

    def __init__(self, code_shape: tuple[int, ...], classes: int, straight_through: bool):
        super().__init__()
        self.code_shape = tuple(code_shape)
        self.classes = classes
        self.straight_through = straight_through
        #: a grid of codes needs fully convolutional networks that keep its layout.
        self.spatial = len(self.code_shape) == 2
        self.encoder_features = (*self.code_shape, classes)
        self.decoder_features = (*self.code_shape, classes)
        #: shape of one data point's z: a one-hot vector per code.
        self.event_shape = (*self.code_shape, classes)
        #: training mode relaxes the codes; eval mode's exact codes have no pathwise gradient.
        self.relaxed = True
        #: Concrete temperature of training-mode draws; set by the training loop's schedule.
        self.temperature = 1.0

    @property
    def codebook_size(self) -> int:
        """Number of distinct values each code takes (K)."""
        return self.classes

    def _relaxed(
        self, logits: torch.Tensor, temperature: torch.Tensor | float | None = None
    ) -> dist.TorchDistribution:
        family = RelaxedCategoricalStraightThrough if self.straight_through else RelaxedCategorical
        if temperature is None:
            temperature = self.temperature
        # a tensor passes through as it is (no copy), so compiled code sees it as an input
        temperature = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
        return family(temperature, logits=logits).to_event(len(self.code_shape))

    def prior(
        self,
        batch_shape: torch.Size,
        like: torch.Tensor,
        temperature: torch.Tensor | float | None = None,
    ) -> dist.TorchDistribution:
        """Uniform over the K classes of every code, for ``batch_shape`` data points.

        :param temperature: of the relaxation in training mode; :attr:`temperature` if None.
        """
        logits = like.new_zeros(()).expand((*batch_shape, *self.code_shape, self.classes))
        if self.training:
            return self._relaxed(logits, temperature)
        return dist.OneHotCategorical(logits=logits).to_event(len(self.code_shape))

    def posterior(
        self, encoded: torch.Tensor, temperature: torch.Tensor | float | None = None
    ) -> dist.TorchDistribution:
        """q(z | x) from the encoder's logits ``(..., *code_shape, classes)``.

        :param temperature: of the relaxation in training mode; :attr:`temperature` if None.
        """
        encoded = full_precision(encoded)
        if self.training:
            return self._relaxed(encoded, temperature)
        return dist.OneHotCategorical(logits=encoded).to_event(len(self.code_shape))

    def code(self, encoded: torch.Tensor) -> torch.Tensor:
        """The single most representative z for an input: the one-hot most likely code."""
        return self.one_hot(self.tokens(encoded))

    def tokens(self, encoded: torch.Tensor) -> torch.Tensor:
        """The most likely class of every code, ``(..., *code_shape)`` integers."""
        return encoded.argmax(-1)

    def draw_tokens(
        self, encoded: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A draw of every code from the exact categorical posterior, ``(..., *code_shape)``
        integers (Gumbel-max, so that a ``generator`` makes it reproducible)."""
        logits = full_precision(encoded)
        uniform = torch.rand(
            logits.shape, generator=generator, dtype=logits.dtype, device=logits.device
        )
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(logits.dtype).tiny)))
        return (logits + gumbel).argmax(-1)

    def one_hot(self, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decoder input for integer ``tokens`` of shape ``(..., *code_shape)``."""
        shape = tuple(tokens.shape[tokens.dim() - len(self.code_shape) :])
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or shape != self.code_shape:
            want = ", ".join(map(str, self.code_shape))
            raise UsageError(
                f"tokens must be an integer tensor of shape (batch, {want}), "
                f"got {tokens.dtype} of shape {tuple(tokens.shape)}"
            )
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.classes):
            raise UsageError(
                f"tokens must lie in 0..{self.classes - 1} (the codebook size is "
                f"{self.classes}); got values in {tokens.min().item()}..{tokens.max().item()}"
            )
        return F.one_hot(tokens.long(), self.classes).to(dtype)


def make_latent(config: VAEConfig) -> GaussianLatent | CategoricalLatent:
    """The latent family named by ``config.latent``."""
    if config.latent == "relaxed-categorical":
        if config.arch == "conv":
            # two stride-2 convolutions: one code per 4 x 4 patch of the image
            code_shape = (config.image_shape[1] // 4, config.image_shape[2] // 4)
        else:
            code_shape = (config.groups,)
        return CategoricalLatent(code_shape, config.classes, config.straight_through)
    return GaussianLatent(config.latent_dim)
