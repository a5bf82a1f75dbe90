"""Per-image evidence bounds: the ELBO and the importance-weighted bound (IWAE).

Both come from the same log importance weights
``log w_k = log p(x, z_k) - log q(z_k | x)``, ``z_k ~ q(z | x)``, computed per image from
Pyro traces of the model replayed against the guide. The ELBO is their mean; the
IWAE bound ``log (1/K) sum_k w_k`` (Burda et al., 2016) is a logsumexp taken *per image*,
never across the data plate, and tightens towards log p(x) as K grows.

:func:`evaluate_vae` gathers everything a held-out evaluation reports into one
:class:`Evaluation`: those two bounds, the KL per latent unit, the active units of
Burda et al. and the reconstruction error.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import pyro
import torch
from pyro import poutine
from torch.distributions import kl_divergence
from tqdm.auto import tqdm

from .data import TEST_SEED, held_out_data
from .errors import DataError, UsageError

#: name of the vectorized particle plate; leading underscore keeps it out of user names.
PARTICLE_PLATE = "_pyro_vae_particles"


@torch.no_grad()
def log_weights(
    vae, x: torch.Tensor, num_particles: int = 1, analytic_kl: bool = False
) -> torch.Tensor:
    """``(num_particles, batch)`` log importance weights, particles vectorized in a plate.

    :param analytic_kl: return ``log p(x | z_k) - KL(q(z | x) || p(z))`` with the KL in
        closed form instead: not importance weights, but terms whose mean is the ELBO
        with an exact KL (less noisy, e.g. for discrete codes).
    """
    # a private param store scope: evaluating must not register parameters in the user's
    with (
        pyro.get_param_store().scope(),
        pyro.plate(PARTICLE_PLATE, num_particles, dim=-2, device=x.device),
    ):
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    z, obs = model_trace.nodes[vae.z_site], model_trace.nodes[vae.x_site]
    if analytic_kl:
        kl = kl_divergence(guide_trace.nodes[vae.z_site]["fn"], z["fn"])
        return obs["unscaled_log_prob"] - kl
    log_q = guide_trace.nodes[vae.z_site]["unscaled_log_prob"]
    return z["unscaled_log_prob"] + obs["unscaled_log_prob"] - log_q


def _batched(
    fn, data: torch.Tensor, batch_size: int, progress: bool = False, desc: str | None = None
) -> torch.Tensor:
    starts = range(0, data.shape[0], batch_size)
    bar = tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch")
    return torch.cat([fn(data[i : i + batch_size]) for i in bar])


def elbo(
    vae,
    data: torch.Tensor,
    batch_size: int = 1000,
    num_particles: int = 1,
    analytic_kl: bool = False,
) -> torch.Tensor:
    """Per-image ELBO in nats (a ``(N,)`` tensor), averaged over ``num_particles`` draws;
    with ``analytic_kl`` the KL term is exact and only the reconstruction is sampled."""
    return _batched(
        lambda x: log_weights(vae, x, num_particles, analytic_kl).mean(0), data, batch_size
    )


def iwae_log_likelihood(
    vae,
    data: torch.Tensor,
    num_particles: int = 5000,
    batch_size: int = 100,
    particle_chunk: int = 500,
    progress: bool = False,
) -> torch.Tensor:
    """Per-image importance-weighted lower bound on log p(x), in nats (``(N,)``).

    Particles are drawn ``particle_chunk`` at a time and combined with a running
    logsumexp, so memory is bounded by ``batch_size * particle_chunk`` decoded images.
    ``progress`` shows a progress bar over the batches of images.
    """

    def bound(x: torch.Tensor) -> torch.Tensor:
        total = None
        for start in range(0, num_particles, particle_chunk):
            k = min(particle_chunk, num_particles - start)
            chunk = torch.logsumexp(log_weights(vae, x, k), dim=0)
            total = chunk if total is None else torch.logaddexp(total, chunk)
        return total - math.log(num_particles)

    return _batched(bound, data, batch_size, progress, f"IWAE bound, K={num_particles}")


def bits_per_dim(nats_per_image: float, num_pixels: int) -> float:
    """Negative log-likelihood of 8-bit images, in bits per pixel, from a density on
    dequantized data in [0, 1): the density on [0, 256) is 256^-D times smaller."""
    return (nats_per_image + num_pixels * math.log(256.0)) / (num_pixels * math.log(2.0))


# ---------------------------------------------------------------------------- the summary
#: Burda et al.'s threshold on Cov_x(E_q[z_u]) above which a latent unit counts as active.
ACTIVE_THRESHOLD = 0.01


def _units(d: torch.distributions.Distribution) -> torch.distributions.Distribution:
    """Strip ``.to_event`` wrappers: the batch shape of the result is (images, *units), one
    unit per latent coordinate (Gaussian) or per code (one-hot categorical)."""
    while isinstance(d, torch.distributions.Independent):
        d = d.base_dist
    return d


@torch.no_grad()
def kl_per_unit(vae, data: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """``(N, *units)``: the closed-form KL(q(z_u | x) || p(z_u)) of every latent unit, nats.

    Summed over units it is the KL term of the ELBO; a unit whose KL is ~0 for every image
    carries no information about x (posterior collapse).
    """

    def kl(x: torch.Tensor) -> torch.Tensor:
        q, p = _unit_pair(vae, x)
        try:
            return torch.distributions.kl_divergence(q, p)
        except NotImplementedError:
            if vae.training:
                fix = "evaluate the model in eval mode (vae.eval()), where codes are exact"
            else:  # e.g. a learned prior over a discrete VAE's codes, which couples them
                fix = "this prior has no KL per unit; estimate the whole KL with kl_monte_carlo"
            raise UsageError(
                f"no closed-form KL between {type(q).__name__} and {type(p).__name__}: {fix}"
            ) from None

    return _batched(kl, data, batch_size)


@torch.no_grad()
def kl_monte_carlo(
    vae, data: torch.Tensor, num_particles: int = 10, batch_size: int = 1000
) -> torch.Tensor:
    """``(N,)``: KL(q(z | x) || p(z)) of every image estimated as the mean of
    ``log q(z | x) - log p(z)`` over ``num_particles`` draws z ~ q(z | x): for priors
    without a closed-form KL, such as a learned prior over a discrete VAE's codes."""

    def kl(x: torch.Tensor) -> torch.Tensor:
        q = vae.posterior(x)
        z = q.sample((num_particles,))
        return (q.log_prob(z) - vae.latent.prior(x.shape[:1], x).log_prob(z)).mean(0)

    return _batched(kl, data, batch_size)


def _unit_pair(vae, x: torch.Tensor):
    """q(z_u | x) and p(z_u) of every unit, batch shape ``(N, *units)``."""
    return _units(vae.posterior(x)), _units(vae.latent.prior(x.shape[:1], x))


@torch.no_grad()
def has_unit_kl(vae, x: torch.Tensor) -> bool:
    """Whether :func:`kl_per_unit` has a closed form for this VAE (not for a learned prior
    over a discrete VAE's codes, :meth:`~pyro_vae.VAE.with_prior`)."""
    q, p = _unit_pair(vae, x[:1])
    try:
        torch.distributions.kl_divergence(q, p)
    except NotImplementedError:
        return False
    return True


@torch.no_grad()
def unit_activity(vae, data: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """``(*units)``: Cov_x(E_q[z_u | x]), the variance over the data of each unit's posterior
    mean (summed over the classes of a one-hot code) -- Burda et al.'s activity statistic."""
    event_dims = len(_units(vae.posterior(data[:1])).event_shape)
    means = _batched(lambda x: _units(vae.posterior(x)).mean, data, batch_size)
    variance = means.var(dim=0)
    return variance.sum(dim=tuple(range(-event_dims, 0))) if event_dims else variance


@torch.no_grad()
def reconstruction_log_likelihood(
    vae, data: torch.Tensor, batch_size: int = 1000, num_particles: int = 1
) -> torch.Tensor:
    """``(N,)``: E_q[log p(x | z)], the reconstruction term of the ELBO, in nats per image."""

    def term(x: torch.Tensor) -> torch.Tensor:
        z = vae.posterior(x).sample((num_particles,))
        return vae.likelihood.distribution(vae.decoder(z)).log_prob(x).mean(0)

    return _batched(term, data, batch_size)


@dataclass(frozen=True)
class Evaluation:
    """Held-out numbers of a fitted VAE; log-likelihoods are nats per image (mean over
    images, with the standard error of that mean)."""

    #: images evaluated, and importance samples (K) per image for the IWAE bound.
    num_images: int
    num_particles: int
    seed: int
    likelihood: str
    #: how 8-bit images became data: "binarized" or "dequantized" (fixed seed), or "as given".
    data: str
    #: the ELBO, a lower bound on log p(x) (Monte Carlo, ``elbo_particles`` draws per image).
    elbo: float
    elbo_se: float
    #: the importance-weighted bound with K particles: the held-out log-likelihood.
    log_likelihood: float
    log_likelihood_se: float
    #: E_q[-log p(x | z)]: what the model loses in reconstructing x from its code.
    reconstruction_nll: float
    #: squared error of the decoder mean at the posterior code, per pixel.
    reconstruction_mse: float
    #: KL(q(z | x) || p(z)) in closed form, and per latent unit (mean over images); for a
    #: prior without a KL per unit (a learned prior over codes), a Monte Carlo estimate
    #: (:func:`kl_monte_carlo`, ``elbo_particles`` draws) and None.
    kl: float
    kl_per_unit: list[float] | None
    #: Cov_x(E_q[z_u]) per unit, and how many units exceed :data:`ACTIVE_THRESHOLD`.
    activity: list[float]
    active_units: int
    #: for continuous likelihoods on dequantized 8-bit data: bounds in bits per dimension.
    bits_per_dim: float | None
    elbo_bits_per_dim: float | None
    #: wall-clock seconds the evaluation took.
    seconds: float

    @property
    def nll(self) -> float:
        """Negative held-out log-likelihood (the number papers report, lower is better)."""
        return -self.log_likelihood

    def to_dict(self) -> dict:
        """JSON-ready values, with the unit of the log-likelihoods spelled out."""
        return {**asdict(self), "nll": self.nll, "unit": "nats per image"}

    def table(self) -> str:
        """The numbers as an aligned, human-readable table."""
        rows = [
            ("images", f"{self.num_images} ({self.data})"),
            ("likelihood", self.likelihood),
            (
                f"log p(x) >= IWAE, K={self.num_particles}",
                f"{self.log_likelihood:.2f} +- {self.log_likelihood_se:.2f} nats",
            ),
            ("negative log-likelihood", f"{self.nll:.2f} nats"),
            ("ELBO", f"{self.elbo:.2f} +- {self.elbo_se:.2f} nats"),
            ("reconstruction  E_q[-log p(x|z)]", f"{self.reconstruction_nll:.2f} nats"),
            ("KL(q(z|x) || p(z))", f"{self.kl:.2f} nats"),
            ("reconstruction MSE per pixel", f"{self.reconstruction_mse:.5f}"),
            (
                f"active units (Cov > {ACTIVE_THRESHOLD:g})",
                f"{self.active_units} of {len(self.activity)}",
            ),
        ]
        if self.bits_per_dim is not None:
            rows.append(
                ("bits/dim (IWAE, ELBO)", f"{self.bits_per_dim:.4f}, {self.elbo_bits_per_dim:.4f}")
            )
        rows.append(("seconds", f"{self.seconds:.1f}"))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def prepare_held_out(vae, images: torch.Tensor, seed: int = TEST_SEED) -> tuple[torch.Tensor, str]:
    """Data for the likelihood from held-out images, and a word for what was done: uint8
    images get one fixed, seeded binarization or dequantization; floats pass unchanged."""
    how = "as given" if images.is_floating_point() else f"{vae.likelihood.preprocessing}d"
    return held_out_data(images, vae.config.image_shape, vae.likelihood, seed=seed), how


def evaluate_vae(
    vae,
    images: torch.Tensor,
    *,
    num_particles: int = 5000,
    batch_size: int = 100,
    particle_chunk: int = 500,
    elbo_particles: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> Evaluation:
    """Every held-out number of :class:`Evaluation` for ``images``, reproducibly.

    :param images: ``(N, C, H, W)`` uint8 images (prepared by :func:`prepare_held_out`)
        or ready floating-point data.
    :param num_particles: K of the IWAE bound; 5000 is the literature's protocol.
    :param batch_size: images per batch; ``batch_size * particle_chunk`` decoded images
        must fit in memory.
    :param seed: seeds every draw; the caller's random state is restored afterwards.
    """
    if num_particles < 1 or batch_size < 1 or particle_chunk < 1 or elbo_particles < 1:
        raise UsageError(
            "num_particles, batch_size, particle_chunk and elbo_particles must be >= 1"
        )
    if images.shape[0] == 0:
        raise DataError("no images to evaluate")
    start = time.perf_counter()
    device = next(vae.parameters()).device
    x, how = prepare_held_out(vae, images.to(device))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        bound = elbo(vae, x, batch_size * 10, elbo_particles)
        iwae = iwae_log_likelihood(vae, x, num_particles, batch_size, particle_chunk, progress)
        recon = reconstruction_log_likelihood(vae, x, batch_size * 10, elbo_particles)
        if has_unit_kl(vae, x):
            kl_units = kl_per_unit(vae, x).flatten(1).mean(0)
            kl, kl_units = kl_units.sum().item(), kl_units.tolist()
        else:
            kl = kl_monte_carlo(vae, x, elbo_particles, batch_size * 10).mean().item()
            kl_units = None
    activity = unit_activity(vae, x).flatten()
    mse = _batched(lambda b: (vae.reconstruct(b) - b).pow(2).flatten(1).mean(1), x, batch_size)
    pixels = vae.config.num_pixels
    dequantized = how == "dequantized"
    return Evaluation(
        num_images=x.shape[0],
        num_particles=num_particles,
        seed=seed,
        likelihood=vae.config.likelihood,
        data=how,
        elbo=bound.mean().item(),
        elbo_se=_standard_error(bound),
        log_likelihood=iwae.mean().item(),
        log_likelihood_se=_standard_error(iwae),
        reconstruction_nll=-recon.mean().item(),
        reconstruction_mse=mse.mean().item(),
        kl=kl,
        kl_per_unit=kl_units,
        activity=activity.tolist(),
        active_units=int((activity > ACTIVE_THRESHOLD).sum()),
        bits_per_dim=bits_per_dim(-iwae.mean().item(), pixels) if dequantized else None,
        elbo_bits_per_dim=bits_per_dim(-bound.mean().item(), pixels) if dequantized else None,
        seconds=time.perf_counter() - start,
    )


def _standard_error(values: torch.Tensor) -> float:
    n = values.numel()
    return values.std().item() / math.sqrt(n) if n > 1 else float("nan")
