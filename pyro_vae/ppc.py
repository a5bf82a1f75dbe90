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

The data may be images ``(N, C, H, W)`` or vectors ``(N, D)`` (``VAE(image_shape=(D,))``).
Vectors get the statistics that mean something for any D numbers: each dimension's mean
and spread over the data set, and the log-likelihood discrepancy. Statistics about pixels
(intensity, lit pixels, the mean image) are computed for images only.

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
#: a test statistic: a function of data, with any leading (draw) dimensions kept.
Statistic = Callable[[torch.Tensor], torch.Tensor]
#: per-image statistics: name -> (what it measures, function of images (..., C, H, W)).
IMAGE_STATISTICS: dict[str, tuple[str, Statistic]] = {
    "mean_intensity": ("mean pixel value of an image", lambda x: x.flatten(-3).mean(-1)),
    "lit_fraction": (
        f"fraction of an image's pixels above {LIT_THRESHOLD}",
        lambda x: (x > LIT_THRESHOLD).flatten(-3).to(x.dtype).mean(-1),
    ),
}
#: per-dimension statistics of a set of vectors: name -> (what it measures, function of
#: vectors (..., N, D) giving (..., D)). Each is taken over the N vectors of one data set
#: (the real one, or one replicated set), so it needs no meaning shared by the dimensions:
#: a column of a table keeps its own units. The spread divides by N, not N - 1, so that a
#: single vector has spread 0 rather than NaN (real and replicated sets alike).
VECTOR_STATISTICS: dict[str, tuple[str, Statistic]] = {
    "dim_mean": ("mean over the vectors of each dimension", lambda x: x.mean(-2)),
    "dim_std": (
        "standard deviation over the vectors of each dimension",
        lambda x: x.std(-2, correction=0),
    ),
}


def data_kind(data: torch.Tensor) -> str:
    """What ``data`` holds: "images" when it is ``(N, C, H, W)``, "vectors" when ``(N, D)``;
    any other layout has no statistics here and raises :class:`UsageError`."""
    kinds = {4: "images", 2: "vectors"}
    if data.dim() not in kinds:
        raise UsageError(
            "posterior predictive checks take (N, C, H, W) images or (N, D) vectors, got data "
            f"of shape {tuple(data.shape)}"
        )
    return kinds[data.dim()]


@dataclass(frozen=True)
class Replicates:
    """Draws from a fitted VAE for ``N`` held-out images, ``S`` draws each.

    Shapes: images are ``(N, C, H, W)``, or vectors ``(N, D)``; replicates have the draws
    in front, ``(S, N, C, H, W)`` or ``(S, N, D)``; latent draws ``(S, N, *latent)`` (a
    vector per image, or one-hot codes).
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
    #: T of the observed data: ``(N,)`` per image, ``(C, H, W)`` per pixel, ``(D,)`` per
    #: dimension of vectors, or ``(S, N)`` for a discrepancy that depends on the draw of z,
    #: like the log-likelihood.
    observed: torch.Tensor
    #: T of the replicates, one per draw: ``(S, N)``, ``(S, C, H, W)`` or ``(S, D)``.
    replicated: torch.Tensor
    #: the p-value of every image (pixel, dimension): P(T(x_rep) > T(x)), ties counting
    #: one half.
    p_values: torch.Tensor
    #: the p-value of the statistic's mean over all images (pixels, dimensions) of the set.
    p_value: float

    def extreme_fraction(self, tail: float = 0.025) -> float:
        """Share of images (pixels, dimensions) whose p-value is below ``tail`` or above
        ``1 - tail``."""
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
        dequantization) or ready floating-point data; ``(N, D)`` for a VAE of vectors.
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


def _set_check(name: str, description: str, t_obs: torch.Tensor, t_rep: torch.Tensor):
    """A statistic with one value per pixel or dimension of a whole data set: ``t_obs`` of
    the real set, ``t_rep`` ``(S, ...)`` of each replicated one; the set's p-value is that
    of the mean over the pixels (dimensions)."""
    return StatisticCheck(
        name,
        description,
        t_obs,
        t_rep,
        mid_p_value(t_obs, t_rep),
        mid_p_value(t_obs.mean(), t_rep.flatten(1).mean(-1)).item(),
    )


def check(replicates: Replicates) -> dict[str, StatisticCheck]:
    """Every test statistic on real vs replicated data, and its p-values.

    Images: mean intensity, fraction of lit pixels, per-pixel marginal means. Vectors:
    the mean and the standard deviation of each dimension over the vectors (one p-value
    per dimension: which of them the model gets wrong). Both: each data point's
    log-likelihood, compared draw by draw with its replicate's.
    """
    obs, rep = replicates.observed, replicates.replicated
    checks = {}
    if data_kind(obs) == "images":
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
        checks["pixel_mean"] = _set_check(
            "pixel_mean",
            "mean over the images of each pixel (the marginal mean image)",
            obs.mean(0),
            rep.mean(1),
        )
    else:
        for name, (description, statistic) in VECTOR_STATISTICS.items():
            checks[name] = _set_check(name, description, statistic(obs), statistic(rep))
    # The log-likelihood is a discrepancy T(x, z): it is compared draw by draw, x against
    # x_rep under the same z (Gelman et al., Bayesian Data Analysis, ch. 6).
    ll_obs, ll_rep = replicates.log_lik_observed, replicates.log_lik_replicated
    checks["log_likelihood"] = StatisticCheck(
        "log_likelihood",
        "log p(x | z) of a data point under the z drawn for it (nats)",
        ll_obs,
        ll_rep,
        ((ll_rep > ll_obs).float() + (ll_rep == ll_obs).float() / 2).mean(0),
        mid_p_value(ll_obs.sum(-1), ll_rep.sum(-1)).item(),
    )
    return checks


def to_inference_data(replicates: Replicates, vae=None) -> az.InferenceData:
    """An ArviZ ``InferenceData`` of the draws, one chain of S draws.

    Groups: ``posterior`` (z), ``posterior_predictive`` and ``prior_predictive`` (the
    replicated data ``x`` and its statistics), ``prior`` (z), ``observed_data`` (x and the
    same statistics), ``log_likelihood`` (log p(x_n | z) of each observed data point, per
    draw).

    Images have the per-image statistics of :data:`IMAGE_STATISTICS` and ``pixel_mean``,
    and dimensions ``chain``, ``draw``, ``image``, ``channel``, ``row``, ``col`` and
    ``z_dim_<i>``. Vectors have the per-dimension statistics of
    :data:`VECTOR_STATISTICS`, and dimensions ``chain``, ``draw``, ``vector``, ``dim`` and
    ``z_dim_<i>``. ``attrs["data"]`` says which ("images" or "vectors").
    """
    obs = replicates.observed
    kind = data_kind(obs)
    latent_dims = [f"z_dim_{i}" for i in range(replicates.z.dim() - 2)]

    def per_draw(value: torch.Tensor) -> np.ndarray:
        return value.detach().cpu().numpy()[None]  # one chain

    # each statistic works on the real data (N, ...) and on the replicates (S, N, ...) alike
    if kind == "images":
        item, data_dims = "image", ["channel", "row", "col"]
        computed = {name: stat for name, (_, stat) in IMAGE_STATISTICS.items()}
        computed["pixel_mean"] = lambda images: images.mean(-4)  # over the images
        statistic_dims = {"pixel_mean": data_dims, **{name: [item] for name in IMAGE_STATISTICS}}
    else:
        item, data_dims = "vector", ["dim"]
        computed = {name: stat for name, (_, stat) in VECTOR_STATISTICS.items()}
        statistic_dims = {name: data_dims for name in VECTOR_STATISTICS}

    def statistics(data: torch.Tensor, draws: bool) -> dict[str, np.ndarray]:
        values = {**{name: stat(data) for name, stat in computed.items()}, "x": data}
        return {k: per_draw(v) if draws else v.detach().cpu().numpy() for k, v in values.items()}

    dims = {"z": [item, *latent_dims], "x": [item, *data_dims], **statistic_dims}
    attrs = {"source": "pyro_vae.ppc", "data": kind, f"num_{kind}": obs.shape[0]}
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
    """ArviZ's ``plot_ppc`` of the statistics in ``idata``: for images the per-image
    statistics and the pixel means, for vectors each dimension's mean and spread. Each
    panel draws the density of the observed values (black) against that of each of
    ``num_pp_samples`` replicated sets.

    A statistic that is constant in the real images or in any replicated set (no pixel lit
    in a set of dark images, say) has no density; its panel shows empirical CDFs instead,
    which exist for any data, so the check draws whatever the model was fitted on.

    :param group: "posterior" or "prior" (replicates drawn from the prior predictive).
    """
    from .plots import pyplot  # matplotlib only when a figure is asked for

    known = [*IMAGE_STATISTICS, "pixel_mean", *VECTOR_STATISTICS]
    names = [name for name in known if name in idata.observed_data]
    if not names:
        raise UsageError(
            "the InferenceData holds none of the statistics of pyro_vae.ppc "
            f"({', '.join(known)}): make it with ppc.to_inference_data"
        )
    predictive = idata[f"{group}_predictive"]
    sets = predictive.sizes["chain"] * predictive.sizes["draw"]
    fig, axes = pyplot().subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
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
