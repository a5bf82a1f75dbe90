"""A fitted decoder as a learned prior over images: inpainting, denoising, super-resolution.

The inverse problem is a small Pyro program of its own (:func:`restoration_model`)::

    for each image n in the plate "<name>.data":
        z_n ~ p(z)                                     # the VAE's latent site "<name>.z"
        m_n = decoder mean of z_n                      # recorded as "<name>.image"
        a_n = A m_n                                    # "<name>.low_res" when factor > 1
        y_n ~ p(y | a_n), known pixels only            # observed site "<name>.observed"

``A`` is the forward operator: the identity for inpainting and denoising, and for
super-resolution by a factor ``f`` the average over each ``f x f`` block of pixels
(:func:`downsample`). ``p(y | a)`` is the VAE's own likelihood (inpainting of clean
pixels) or ``Normal(a_n, noise)`` (a noisy or low-resolution image). Hidden pixels are
*masked out* of the likelihood, so their values never enter the posterior; they are not
filled in with zeros or anything else the model would then believe. The posterior over z
is inferred afresh, with the decoder frozen: by SVI with a new
:class:`~pyro.infer.autoguide.AutoNormal` guide (:func:`infer_svi`) or by NUTS
(:func:`infer_nuts`). The amortized encoder is not used: it was trained on whole, sharp
images and has no notion of a missing pixel or a blurred one.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam

from .errors import UsageError

#: the mask kinds :func:`make_mask` understands; "random:P" hides a fraction P of pixels.
MASKS = ("left-half", "top-half", "random:P")


def make_mask(
    kind: str, image_shape: tuple[int, int, int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """A boolean ``(C, H, W)`` mask of the *observed* pixels (True = known).

    :param kind: "left-half" (the right half is hidden), "top-half" (the bottom half is
        hidden) or "random:P" (each pixel hidden with probability P, 0 < P < 1).
    """
    c, h, w = image_shape
    mask = torch.ones(image_shape, dtype=torch.bool)
    if kind == "left-half":
        mask[:, :, w // 2 :] = False
    elif kind == "top-half":
        mask[:, h // 2 :, :] = False
    elif kind.startswith("random:"):
        try:
            hidden = float(kind.split(":", 1)[1])
        except ValueError:
            hidden = -1.0
        if not 0 < hidden < 1:
            raise UsageError(
                f"mask {kind!r}: 'random:P' needs a fraction 0 < P < 1 of hidden pixels"
            )
        mask = torch.rand(image_shape, generator=generator) >= hidden
    else:
        raise UsageError(f"unknown mask {kind!r}; choose one of: {', '.join(MASKS)}")
    return mask


def image_site(vae) -> str:
    """Name of the deterministic site holding each draw's decoder mean image."""
    return f"{vae.config.name}.image"


def low_res_site(vae) -> str:
    """Name of the deterministic site holding each draw's downsampled mean image (the
    prediction of the observed low-resolution image; recorded when ``factor > 1``)."""
    return f"{vae.config.name}.low_res"


def observed_site(vae) -> str:
    """Name of the observed site of :func:`restoration_model`."""
    return f"{vae.config.name}.observed"


def _check_factor(factor: int, height: int, width: int) -> None:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise UsageError(f"factor must be a positive integer, got {factor!r}")
    if height % factor or width % factor:
        divisors = [d for d in range(2, min(height, width) + 1) if not height % d + width % d]
        choices = ", ".join(map(str, divisors)) or "only 1: these images cannot be downsampled"
        raise UsageError(
            f"factor {factor} does not divide the image size {height} x {width}; choose a "
            f"divisor of both ({choices})"
        )


def downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Average ``(..., C, H, W)`` images over ``factor x factor`` blocks of pixels.

    The forward operator of super-resolution: what a camera with ``factor`` times coarser
    pixels would record. Any leading dimensions (draws, batch) are kept.
    """
    if images.dim() < 3:
        raise UsageError(f"expected images (..., C, H, W), got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    _check_factor(factor, height, width)
    if factor == 1:
        return images
    # (..., C, H, W) -> (..., C, H/f, f, W/f, f), then the mean over each block's f x f
    blocks = images.unflatten(-1, (width // factor, factor))
    return blocks.unflatten(-3, (height // factor, factor)).mean((-3, -1))


def _check_problem(
    vae, observed: torch.Tensor, mask: torch.Tensor | None, noise: float | None, factor: int
) -> None:
    """Raise :class:`UsageError` for a restoration problem that cannot be posed."""
    c, h, w = vae.config.image_shape
    _check_factor(factor, h, w)
    want = (c, h // factor, w // factor)
    if observed.dim() != 4 or tuple(observed.shape[1:]) != want:
        what = "images" if factor == 1 else f"low-resolution images (factor {factor})"
        raise UsageError(
            f"expected {what} of shape (batch, {', '.join(map(str, want))}), "
            f"got {tuple(observed.shape)}"
        )
    if noise is not None and not noise > 0:
        raise UsageError(f"noise must be a positive standard deviation, got {noise}")
    if factor > 1 and noise is None:
        raise UsageError(
            "super-resolution needs noise, the standard deviation of the Gaussian noise on "
            "the low-resolution pixels (e.g. noise=0.05)"
        )
    if mask is not None:
        try:
            fits = torch.broadcast_shapes(mask.shape, observed.shape) == observed.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise UsageError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to the observed images "
                f"{tuple(observed.shape)}; make it with make_mask(kind, observed.shape[1:])"
            )


def restoration_model(
    vae,
    observed: torch.Tensor,
    mask: torch.Tensor | None = None,
    noise: float | None = None,
    *,
    factor: int = 1,
) -> torch.Tensor:
    """The Pyro model of a damaged image: the VAE's prior and decoder, the forward
    operator, and a likelihood over the pixels in ``mask``. Returns the decoder mean images.

    One model serves inpainting (``mask``), denoising (``noise``) and super-resolution
    (``factor`` and ``noise``), and any combination of them.

    :param vae: a fitted :class:`~pyro_vae.VAE`; its decoder is used as it is.
    :param observed: ``(B, C, H / factor, W / factor)`` images; values at hidden pixels
        are ignored (they may be anything, NaN included).
    :param mask: boolean, broadcastable to ``observed``: True where a pixel is known
        (a low-resolution pixel when ``factor > 1``). ``None`` observes every pixel.
    :param noise: standard deviation of Gaussian noise on the known pixels; ``None``
        scores them with the VAE's own likelihood (clean data, e.g. binary pixels).
        Required when ``factor > 1``.
    :param factor: the observation is the image averaged over ``factor x factor``
        blocks (:func:`downsample`); 1 observes the pixels themselves.
    """
    _check_problem(vae, observed, mask, noise, factor)
    if mask is not None:
        mask = mask.to(observed.device).bool()
        # Hidden pixels are masked out of the log-density below; this only keeps their
        # stored values inside the support, so a NaN or grey value cannot poison it.
        observed = torch.where(mask, observed, observed.new_zeros(()))
    with pyro.plate(vae.data_site, observed.shape[0], dim=-1, device=observed.device):
        z = pyro.sample(vae.z_site, vae.latent.prior(observed.shape[:1], observed))
        params = vae.decoder(z)
        mean = pyro.deterministic(image_site(vae), vae.likelihood.mean(params), event_dim=3)
        if noise is None:
            pixels = vae.likelihood.distribution(params).base_dist
        else:
            predicted = mean
            if factor > 1:
                predicted = pyro.deterministic(
                    low_res_site(vae), downsample(mean, factor), event_dim=3
                )
            scale = torch.as_tensor(noise, dtype=mean.dtype, device=mean.device)
            pixels = dist.Normal(predicted, scale)
        if mask is not None:
            pixels = pixels.mask(mask)
        pyro.sample(observed_site(vae), pixels.to_event(3), obs=observed)
    return mean


@dataclass
class Restoration:
    """Posterior draws for a batch of damaged images."""

    #: ``(S, B, latent_dim)`` draws of z.
    z: torch.Tensor
    #: ``(S, B, C, H, W)`` decoder mean image of each draw.
    images: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """The posterior mean image ``(B, C, H, W)``: the restoration."""
        return self.images.mean(0)

    @property
    def std(self) -> torch.Tensor:
        """Per-pixel standard deviation of the draws ``(B, C, H, W)``: the uncertainty."""
        return self.images.std(0)


@torch.no_grad()
def _restoration(vae, z: torch.Tensor) -> Restoration:
    return Restoration(z, vae.decode(z))


def infer_svi(
    vae,
    observed: torch.Tensor,
    mask: torch.Tensor | None = None,
    noise: float | None = None,
    *,
    factor: int = 1,
    num_steps: int = 500,
    lr: float = 0.05,
    num_samples: int = 64,
) -> Restoration:
    """Fit a fresh ``AutoNormal`` guide over z by SVI and draw ``num_samples`` from it.

    The arguments up to ``factor`` pose the problem as in :func:`restoration_model`.
    The guide's parameters live in a private scope of Pyro's param store, so nothing
    of other programs is read or overwritten.
    """
    _check_problem(vae, observed, mask, noise, factor)  # one-line errors, before Pyro's

    def model() -> torch.Tensor:
        return restoration_model(vae, observed, mask, noise, factor=factor)

    with pyro.get_param_store().scope(), vae.frozen():
        guide = AutoNormal(model)
        svi = SVI(model, guide, Adam({"lr": lr}), Trace_ELBO())
        for _ in range(num_steps):
            svi.step()
        with torch.no_grad(), pyro.plate("_draws", num_samples, dim=-2):
            z = guide()[vae.z_site]
    return _restoration(vae, z)


def infer_nuts(
    vae,
    observed: torch.Tensor,
    mask: torch.Tensor | None = None,
    noise: float | None = None,
    *,
    factor: int = 1,
    num_samples: int = 100,
    warmup_steps: int = 100,
) -> Restoration:
    """Draw z from the exact posterior by NUTS, the decoder held fixed; the problem is
    posed as in :func:`restoration_model`."""
    _check_problem(vae, observed, mask, noise, factor)
    with vae.frozen():
        kernel = NUTS(
            lambda: restoration_model(vae, observed, mask, noise, factor=factor),
            max_plate_nesting=1,
            jit_compile=False,
        )
        mcmc = MCMC(
            kernel, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=True
        )
        mcmc.run()
    return _restoration(vae, mcmc.get_samples()[vae.z_site])
