"""Posterior predictive checks: does data drawn from the fitted model look like real data?

For each held-out image x_n, z is drawn from the guide q(z | x_n) and a *replicate*
x_rep ~ p(x | z) from the model with the observation unconditioned
(``poutine.uncondition``): ``Predictive`` on the model as it stands would hand the
observed images back unchanged. Prior predictive draws (z ~ p(z), x ~ p(x | z)) show
what the model believes before it sees an image.

A test statistic T is computed on the real and on the replicated images; its posterior
predictive p-value (Gelman, Meng & Stern, 1996) is ``P(T(x_rep) > T(x) | x)``, with ties
counted as one half (a mid-p-value, since binary images make ties common). Values near
0 or 1 mean the model rarely produces data like the real data in that respect.

Everything is also packed into an ArviZ ``InferenceData`` (posterior z, posterior and
prior predictive, observed data, pointwise log-likelihood), so ArviZ's own plots and
``to_netcdf`` work on it. This is the only module of pyro_vae that imports ArviZ.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Predictive

with warnings.catch_warnings():
    # ArviZ announces an upcoming refactor on import; it is not about this code.
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

from .errors import DataError, UsageError
from .evaluate import prepare_held_out

#: pixels brighter than this count as lit (the grey level halfway between black and white).
LIT_THRESHOLD = 0.5
#: per-image statistics: name -> (what it measures, function of images (..., C, H, W)).
IMAGE_STATISTICS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "mean_intensity": ("mean pixel value of an image", lambda x: x.flatten(-3).mean(-1)),
    "lit_fraction": (
        f"fraction of an image's pixels above {LIT_THRESHOLD}",
        lambda x: (x > LIT_THRESHOLD).flatten(-3).to(x.dtype).mean(-1),
    ),
}


@dataclass(frozen=True)
class Replicates:
    """Draws from a fitted VAE for ``N`` held-out images, ``S`` draws each.

    Shapes: images are ``(N, C, H, W)``; replicates ``(S, N, C, H, W)``; latent draws
    ``(S, N, *latent)`` (a vector per image, or one-hot codes).
    """

    observed: torch.Tensor
    #: z ~ q(z | x_n), and x_rep ~ p(x | z): the posterior predictive draws.
    z: torch.Tensor
    replicated: torch.Tensor
    #: log p(x_n | z) and log p(x_rep | z) for each draw: ``(S, N)``.
    log_lik_observed: torch.Tensor
    log_lik_replicated: torch.Tensor
    #: z ~ p(z), x ~ p(x | z): the prior predictive draws, N images per draw.
    prior_z: torch.Tensor
    prior_replicated: torch.Tensor

    @property
    def num_draws(self) -> int:
        return self.replicated.shape[0]


@dataclass(frozen=True)
class StatisticCheck:
    """One test statistic on real vs replicated data, with its p-values."""

    name: str
    description: str
    #: T of the observed data: ``(N,)`` per image, ``(C, H, W)`` per pixel, or ``(S, N)``
    #: for a discrepancy that depends on the draw of z, like the log-likelihood.
    observed: torch.Tensor
    #: T of the replicates, one per draw: ``(S, N)`` or ``(S, C, H, W)``.
    replicated: torch.Tensor
    #: the p-value of every image (or pixel): P(T(x_rep) > T(x)), ties counting one half.
    p_values: torch.Tensor
    #: the p-value of the statistic's mean over all images (or pixels) of the set.
    p_value: float

    def extreme_fraction(self, tail: float = 0.025) -> float:
        """Share of images (or pixels) whose p-value is below ``tail`` or above ``1 - tail``."""
        p = self.p_values
        return ((p < tail) | (p > 1 - tail)).float().mean().item()

    def summary(self) -> dict:
        """JSON-ready numbers: the set's p-value and how the per-item p-values spread."""
        return {
            "description": self.description,
            "observed_mean": self.observed.float().mean().item(),
            "replicated_mean": self.replicated.float().mean().item(),
            "p_value": self.p_value,
            "median_p_value": self.p_values.float().median().item(),
            "extreme_fraction": self.extreme_fraction(),
        }


def mid_p_value(observed: torch.Tensor, replicated: torch.Tensor) -> torch.Tensor:
    """P(T_rep > T_obs) + P(T_rep == T_obs) / 2 over the leading (draw) dimension."""
    greater = (replicated > observed).float().mean(0)
    ties = (replicated == observed).float().mean(0)
    return greater + ties / 2


@torch.no_grad()
def replicate(
    vae,
    images: torch.Tensor,
    num_draws: int = 100,
    *,
    batch_size: int = 100,
    seed: int = 0,
) -> Replicates:
    """Posterior and prior predictive draws for held-out ``images``, reproducibly.

    :param images: ``(N, C, H, W)`` uint8 images (given one fixed, seeded binarization or
        dequantization) or ready floating-point data.
    :param num_draws: S, the draws of z (and of a replicate) per image.
    :param batch_size: images per vectorized pass; memory holds ``S * batch_size`` images.
    :param seed: seeds every draw; the caller's random state is restored afterwards.
    """
    if num_draws < 1 or batch_size < 1:
        raise UsageError(f"num_draws and batch_size must be >= 1, got {num_draws}, {batch_size}")
    if images.shape[0] == 0:
        raise DataError("no images to check: the held-out set is empty")
    device = next(vae.parameters()).device
    x, _ = prepare_held_out(vae, images.to(device))
    posterior = Predictive(
        poutine.uncondition(vae.model), guide=vae.guide, num_samples=num_draws, parallel=True
    )
    prior = Predictive(vae.model, num_samples=num_draws, parallel=True)
    parts: list[tuple[torch.Tensor, ...]] = []
    devices = [device] if device.type == "cuda" else []
    # a private param store scope: checking a model must not register its parameters in
    # the user's global store
    with torch.random.fork_rng(devices=devices), pyro.get_param_store().scope():
        torch.manual_seed(seed)
        for start in range(0, x.shape[0], batch_size):
            batch = x[start : start + batch_size]
            trace = posterior.get_vectorized_trace(batch)
            z, obs = trace.nodes[vae.z_site], trace.nodes[vae.x_site]
            x_rep = obs["value"]
            like = obs["fn"]
            prior_trace = prior.get_vectorized_trace(batch_size=batch.shape[0])
            parts.append(
                (
                    z["value"],
                    x_rep,
                    like.log_prob(batch),
                    like.log_prob(x_rep),
                    prior_trace.nodes[vae.z_site]["value"],
                    prior_trace.nodes[vae.x_site]["value"],
                )
            )
    # every value is (S, batch, ...): the draws lead, then Predictive's image plate
    joined = [torch.cat([part[i] for part in parts], dim=1) for i in range(6)]
    return Replicates(x, *joined)


def check(replicates: Replicates) -> dict[str, StatisticCheck]:
    """Every test statistic on real vs replicated images: mean intensity, fraction of lit
    pixels, per-pixel marginal means, and each image's log-likelihood."""
    obs, rep = replicates.observed, replicates.replicated
    checks = {}
    for name, (description, statistic) in IMAGE_STATISTICS.items():
        t_obs, t_rep = statistic(obs), statistic(rep)
        checks[name] = StatisticCheck(
            name,
            description,
            t_obs,
            t_rep,
            mid_p_value(t_obs, t_rep),
            mid_p_value(t_obs.mean(), t_rep.mean(-1)).item(),
        )
    pix_obs, pix_rep = obs.mean(0), rep.mean(1)
    checks["pixel_mean"] = StatisticCheck(
        "pixel_mean",
        "mean over the images of each pixel (the marginal mean image)",
        pix_obs,
        pix_rep,
        mid_p_value(pix_obs, pix_rep),
        mid_p_value(pix_obs.mean(), pix_rep.flatten(1).mean(-1)).item(),
    )
    # The log-likelihood is a discrepancy T(x, z): it is compared draw by draw, x against
    # x_rep under the same z (Gelman et al., Bayesian Data Analysis, ch. 6).
    ll_obs, ll_rep = replicates.log_lik_observed, replicates.log_lik_replicated
    checks["log_likelihood"] = StatisticCheck(
        "log_likelihood",
        "log p(x | z) of an image under the z drawn for it (nats)",
        ll_obs,
        ll_rep,
        ((ll_rep > ll_obs).float() + (ll_rep == ll_obs).float() / 2).mean(0),
        mid_p_value(ll_obs.sum(-1), ll_rep.sum(-1)).item(),
    )
    return checks


def to_inference_data(replicates: Replicates, vae=None) -> az.InferenceData:
    """An ArviZ ``InferenceData`` of the draws, one chain of S draws.

    Groups: ``posterior`` (z), ``posterior_predictive`` and ``prior_predictive`` (the
    replicated images ``x`` and the per-image statistics of :data:`IMAGE_STATISTICS` and
    ``pixel_mean``), ``prior`` (z), ``observed_data`` (x and the same statistics),
    ``log_likelihood`` (log p(x_n | z) of each observed image, per draw). Dimensions are
    ``chain``, ``draw``, ``image``, ``channel``, ``row``, ``col`` and ``z_dim_<i>``.
    """
    obs = replicates.observed
    latent_dims = [f"z_dim_{i}" for i in range(replicates.z.dim() - 2)]
    image_dims = ["channel", "row", "col"]

    def per_draw(value: torch.Tensor) -> np.ndarray:
        return value.detach().cpu().numpy()[None]  # one chain

    def statistics(images: torch.Tensor, draws: bool) -> dict[str, np.ndarray]:
        values = {name: stat(images) for name, (_, stat) in IMAGE_STATISTICS.items()}
        values["pixel_mean"] = images.mean(1 if draws else 0)
        values["x"] = images
        return {k: per_draw(v) if draws else v.cpu().numpy() for k, v in values.items()}

    dims = {
        "z": ["image", *latent_dims],
        "x": ["image", *image_dims],
        "pixel_mean": image_dims,
        **{name: ["image"] for name in IMAGE_STATISTICS},
    }
    attrs = {"source": "pyro_vae.ppc", "num_images": obs.shape[0]}
    if vae is not None:
        attrs.update(
            likelihood=vae.config.likelihood,
            latent=vae.config.latent,
            z_site=vae.z_site,
            x_site=vae.x_site,
        )
    return az.from_dict(
        posterior={"z": per_draw(replicates.z)},
        posterior_predictive=statistics(replicates.replicated, True),
        prior={"z": per_draw(replicates.prior_z)},
        prior_predictive=statistics(replicates.prior_replicated, True),
        observed_data=statistics(obs, False),
        log_likelihood={"x": per_draw(replicates.log_lik_observed)},
        dims=dims,
        attrs=attrs,
    )


def _has_density(values: np.ndarray, sets: int) -> bool:
    """Whether each of ``sets`` data sets in ``values`` holds two distinct finite numbers:
    what a kernel density estimate needs. ArviZ's ``kde`` returns a 2-point placeholder for
    a constant set, and ``plot_ppc`` then fails stacking it with the 512-point curves."""
    values = values.reshape(sets, -1)
    finite = np.isfinite(values)
    high = np.where(finite, values, -np.inf).max(-1)
    low = np.where(finite, values, np.inf).min(-1)
    return bool((high > low).all())


def plot_statistics(idata: az.InferenceData, group: str = "posterior", num_pp_samples: int = 50):
    """ArviZ's ``plot_ppc`` of the per-image statistics and the pixel means: the density of
    the observed values (black) against that of each of ``num_pp_samples`` replicated sets.

    A statistic that is constant in the real images or in any replicated set (no pixel lit
    in a set of dark images, say) has no density; its panel shows empirical CDFs instead,
    which exist for any data, so the check draws whatever the model was fitted on.

    :param group: "posterior" or "prior" (replicates drawn from the prior predictive).
    """
    from .plots import _plt  # matplotlib only when a figure is asked for

    names = [*IMAGE_STATISTICS, "pixel_mean"]
    predictive = idata[f"{group}_predictive"]
    sets = predictive.sizes["chain"] * predictive.sizes["draw"]
    fig, axes = _plt().subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for name, ax in zip(names, axes[0], strict=True):
        smooth = _has_density(idata.observed_data[name].values, 1) and _has_density(
            predictive[name].values, sets
        )
        az.plot_ppc(
            idata,
            var_names=[name],
            group=group,
            kind="kde" if smooth else "cumulative",
            observed=True,  # ArviZ leaves the data out of prior checks unless asked
            num_pp_samples=min(num_pp_samples, predictive.sizes["draw"]),
            random_seed=0,
            ax=ax,
        )
        if not smooth:
            ax.set_title("constant in some data set: empirical CDFs", fontsize="medium")
    fig.suptitle(f"{group} predictive check: observed (black) vs replicated data sets")
    fig.tight_layout()
    return fig
