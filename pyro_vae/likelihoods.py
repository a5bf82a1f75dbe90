"""Observation models p(x | z): decoder output -> a Pyro distribution over whole images.

A decoder emits one raw number per pixel (``params``, shape ``(..., C, H, W)``). A
likelihood turns those into a distribution whose event is the whole image
(``.to_event(3)``), so one image is one draw and log-densities come per image.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent
from torch.distributions.utils import broadcast_all

from .config import VAEConfig
from .errors import DataError


class Likelihood(nn.Module):
    """Base class. ``preprocessing`` says how 8-bit images are made into data for it.

    :param event_dims: dimensions of one data point: 3 for an image ``(C, H, W)``, 1 for
        a vector ``(D,)``.
    """

    #: "binarize" (a Bernoulli draw per pixel) or "dequantize" (uniform noise within a level).
    preprocessing: str = "dequantize"

    def __init__(self, event_dims: int = 3):
        super().__init__()
        self.event_dims = event_dims

    def distribution(self, params: torch.Tensor) -> dist.TorchDistribution:
        """The distribution over data points (images or vectors) given the decoder's raw output."""
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The expected image: what reconstructions and samples show."""
        return self.distribution(params).mean

    def check_data(self, x: torch.Tensor) -> None:
        """Raise :class:`DataError` if ``x`` is outside this likelihood's support."""
        if not x.is_floating_point():
            raise DataError(f"data must be a floating-point tensor, got dtype {x.dtype}")
        bad = ~torch.isfinite(x)
        if bad.any():
            first = int(bad.reshape(len(x), -1).any(1).nonzero()[0]) if x.dim() else 0
            raise DataError(
                f"the data hold {int(bad.sum())} NaN or infinite value(s), the first in data "
                f"point {first}; remove or impute them before fitting or scoring"
            )


class _LogitBernoulli(dist.Bernoulli):
    """``Bernoulli(logits=logits)`` for a logits tensor, built without the broadcasting and
    argument sorting of the general constructor (one is built every training step)."""

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None):
        self.logits = self._param = logits
        Distribution.__init__(self, logits.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> _LogitBernoulli:
        new = self._get_checked_instance(_LogitBernoulli, _instance)
        return super().expand(batch_shape, _instance=new)


class BernoulliImage(dist.Independent):
    """``Bernoulli(logits=...).to_event(n)`` whose log-density is summed over each image's
    pixels before it is negated.

    The values are torch's; the saving is one full pass over the pixels, forward and
    backward: torch negates the per-pixel cross-entropy, here only the per-image sums
    are negated. On MNIST at batch 256 that is about half a millisecond of a training
    step on the CPU (see ``docs/benchmarks.md``).
    """

    def __init__(self, logits: torch.Tensor, event_dims: int, validate_args: bool | None = None):
        super().__init__(_LogitBernoulli(logits), event_dims, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> BernoulliImage:
        new = self._get_checked_instance(BernoulliImage, _instance)
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = self.base_dist.logits
        if logits.shape != value.shape:
            logits, value = broadcast_all(logits, value)
        pixels = F.binary_cross_entropy_with_logits(logits, value, reduction="none")
        return -pixels.sum(tuple(range(-self.reinterpreted_batch_ndims, 0)))

    def total_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``log_prob(value).sum()`` in one reduction over all pixels of all images: no
        per-image sums and their full-size intermediate (30-45 us a call at batch 256 on
        the CPU, forward and backward; ``benchmarks/step_parts.py``)."""
        if self._validate_args:
            self._validate_sample(value)
        logits = self.base_dist.logits
        if logits.shape != value.shape:
            return self.log_prob(value).sum()
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="sum")


def total_log_prob(d: Distribution, value: torch.Tensor) -> torch.Tensor:
    """``d.log_prob(value).sum()``: the log-density of every data point in ``value`` at once,
    in as few operations as ``d`` allows. The same terms, summed in another order.

    An ``Independent`` that does not override ``log_prob`` only sums its base's
    log-densities over its event dimensions, so the total is the total of the base's; a
    distribution with a ``total_log_prob`` method (:class:`BernoulliImage`) computes it
    itself. The fused ELBO (:meth:`~pyro_vae.VAE.elbo_loss`) sums every site this way.
    """
    while True:
        own = getattr(d, "total_log_prob", None)
        if own is not None:
            return own(value)
        if not (isinstance(d, Independent) and type(d).log_prob is Independent.log_prob):
            return d.log_prob(value).sum()
        d = d.base_dist


class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli pixels with logits from the decoder; data must be 0 or 1."""

    preprocessing = "binarize"

    def distribution(self, params: torch.Tensor) -> dist.TorchDistribution:
        return BernoulliImage(full_precision(params), self.event_dims)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def check_data(self, x: torch.Tensor) -> None:
        super().check_data(x)
        if not ((x == 0) | (x == 1)).all():
            raise DataError(
                "the bernoulli likelihood needs binary pixels (0 or 1) but the data has grey "
                "values; binarize it, or choose likelihood 'continuous-bernoulli' or 'gaussian'"
            )


class ContinuousBernoulliLikelihood(Likelihood):
    """The normalized continuous Bernoulli on [0, 1] (Loaiza-Ganem & Cunningham, 2019)."""

    def distribution(self, params: torch.Tensor) -> dist.TorchDistribution:
        return dist.ContinuousBernoulli(logits=full_precision(params)).to_event(self.event_dims)

    def check_data(self, x: torch.Tensor) -> None:
        super().check_data(x)
        if (x < 0).any() or (x > 1).any():
            raise DataError(
                "the continuous-bernoulli likelihood needs pixels in [0, 1]; "
                f"the data ranges over [{x.min().item():.3g}, {x.max().item():.3g}]"
            )


class GaussianLikelihood(Likelihood):
    """Normal(mean, sigma) pixels: the decoder gives the mean, sigma is fixed or learned.

    A learned sigma (one shared value, or one per pixel) is bounded below by
    ``floor``: ``sigma = floor + softplus(raw)``, never zero, so the density stays finite.
    ``image_shape`` is the event shape: an image ``(C, H, W)``, or ``(D,)`` for vectors.
    """

    def __init__(
        self,
        image_shape: tuple[int, ...],
        sigma: str = "shared",
        init: float = 0.1,
        floor: float = 1e-3,
    ):
        super().__init__(len(image_shape))
        self.floor = floor
        if sigma == "fixed":
            self.register_buffer("raw_sigma", torch.tensor(_inverse_softplus(init - floor)))
        else:
            shape = image_shape if sigma == "pixel" else ()
            raw = torch.full(shape, _inverse_softplus(init - floor))
            self.raw_sigma = nn.Parameter(raw)

    @property
    def learned(self) -> bool:
        """Whether training changes sigma (it does unless it is "fixed")."""
        return isinstance(self.raw_sigma, nn.Parameter)

    @property
    def sigma(self) -> torch.Tensor:
        """The standard deviation in the data's units (a scalar, or one per pixel or entry)."""
        return self.floor + F.softplus(self.raw_sigma)

    def distribution(self, params: torch.Tensor) -> dist.TorchDistribution:
        params = full_precision(params)
        return dist.Normal(params, self.sigma.to(params.dtype)).to_event(self.event_dims)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params


def full_precision(params: torch.Tensor) -> torch.Tensor:
    """Half-precision network outputs (under mixed-precision autocast) as float32, so that
    log-densities and KL terms are summed over hundreds of pixels in float32; other
    dtypes pass as they are."""
    if params.dtype in (torch.float16, torch.bfloat16):
        return params.float()
    return params


def _inverse_softplus(y: float) -> float:
    """x with softplus(x) = y; y == 0 would need x = -inf, so it is clamped to a tiny value."""
    y = max(y, 1e-12)
    return y + math.log(-math.expm1(-y))


def make_likelihood(config: VAEConfig) -> Likelihood:
    """The likelihood named by ``config.likelihood``."""
    if config.likelihood == "bernoulli":
        return BernoulliLikelihood(len(config.image_shape))
    if config.likelihood == "continuous-bernoulli":
        return ContinuousBernoulliLikelihood(len(config.image_shape))
    return GaussianLikelihood(
        config.image_shape, config.gaussian_sigma, config.sigma_init, config.sigma_floor
    )
