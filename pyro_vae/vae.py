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
from collections.abc import Iterator

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule, pyro_method

from .config import VAEConfig
from .latents import CategoricalLatent, make_latent
from .likelihoods import make_likelihood
from .nets import (
    ConvDecoder,
    ConvEncoder,
    ConvGridDecoder,
    ConvGridEncoder,
    MLPDecoder,
    MLPEncoder,
)


class NamedSites:
    """Public site names, each prefixed by ``config.name`` so that two models can share one
    Pyro program, and the plate over images; shared by the package's image models."""

    config: VAEConfig
    decoder: torch.nn.Module

    def _data_plate(self, batch: int, device: torch.device, num_data: int | None) -> pyro.plate:
        """The plate over ``batch`` images, a subsample of ``num_data`` when that is given."""
        size = batch if num_data is None else int(num_data)
        if size < batch:
            raise ValueError(f"num_data={size} is smaller than the batch of {batch} images")
        # An explicit subsample keeps the plate from drawing a random permutation of the
        # whole data set on every step; the batch already is the subsample.
        subsample = None if size == batch else torch.arange(batch, device=device)
        return pyro.plate(self.data_site, size, subsample=subsample, dim=-1, device=device)

    def _a_parameter(self) -> torch.Tensor:
        """A parameter, whose device and dtype new tensors follow when there is no input."""
        return next(self.decoder.parameters())

    @property
    def data_site(self) -> str:
        """Name of the plate over images."""
        return f"{self.config.name}.data"

    @property
    def z_site(self) -> str:
        """Name of the latent sample site."""
        return f"{self.config.name}.z"

    @property
    def x_site(self) -> str:
        """Name of the observed image site."""
        return f"{self.config.name}.x"


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
    @pyro_method
    def model(
        self,
        x: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """p(z) p(x | z). With ``x`` given it is observed; with ``x=None`` the model draws
        ``batch_size`` new images. Returns the decoder's mean image for each z.
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
            params = self.decoder(z)
            pyro.sample(self.x_site, self.likelihood.distribution(params), obs=x)
        return params

    @pyro_method
    def guide(
        self,
        x: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """q(z | x), amortized by the encoder. Returns the sampled z."""
        if x is None:
            raise ValueError(
                "the guide encodes observed images, so it needs x; to generate new images "
                "run the model alone, e.g. vae.model(batch_size=16)"
            )
        with self._plate(x, num_data, batch_size), self._latent_scale():
            return pyro.sample(self.z_site, self.latent.posterior(self.encoder(x)))

    def _plate(
        self, x: torch.Tensor | None, num_data: int | None, batch_size: int | None
    ) -> pyro.plate:
        if x is None:
            if batch_size is None:
                raise ValueError("with x=None the model needs batch_size: how many images to draw")
            batch = int(batch_size)
            device = self._a_parameter().device
        else:
            if tuple(x.shape[-3:]) != self.config.image_shape or x.dim() != 4:
                want = ", ".join(map(str, self.config.image_shape))
                raise ValueError(f"expected images of shape (batch, {want}), got {tuple(x.shape)}")
            batch, device = x.shape[0], x.device
            if batch_size is not None and batch_size != batch:
                raise ValueError(f"batch_size={batch_size} but x holds {batch} images")
        return self._data_plate(batch, device, num_data)

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
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of images: the posterior's most likely class of every code,
        ``(batch, groups)`` for an MLP or ``(batch, H/4, W/4)`` for a conv grid."""
        return self._categorical("tokenize").tokens(self.encoder(x))

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's mean image for each grid or row of integer ``tokens``."""
        latent = self._categorical("detokenize")
        like = self._a_parameter()
        return self.decode(latent.one_hot(tokens.to(like.device), like.dtype))

    def _categorical(self, what: str) -> CategoricalLatent:
        if not isinstance(self.latent, CategoricalLatent):
            raise ValueError(
                f"{what} needs discrete codes, but this VAE has latent {self.config.latent!r}; "
                "train one with latent 'relaxed-categorical'"
            )
        return self.latent
