"""Importance-weighted training: the per-data-point IWAE bound as a Pyro ELBO.

For each data point ``n`` of a plate, with ``k`` particles ``z_1..z_k ~ q(z | x_n)``,

    L_k(x_n) = log (1/k) sum_i p(x_n, z_i) / q(z_i | x_n)

is a lower bound on ``log p(x_n)`` that grows with ``k`` (Burda et al., 2016). The loss
of a batch is ``-sum_n L_k(x_n)``, scaled by the plate's subsampling factor *outside*
the log-sum-exp, so a mini-batch estimates the bound of the whole data set. (Pyro's
``RenyiELBO(alpha=0)`` applies that factor to the log weights inside the log-sum-exp,
which overstates the bound of a subsampled batch; ``tests/test_objectives.py`` shows the
difference.)

Three gradient estimators, chosen by ``estimator``:

- ``"iwae"``: the gradient of ``L_k`` itself, as autograd gives it through the
  reparameterized particles (Burda et al., 2016);
- ``"dreg"``: the doubly-reparameterized gradient for the guide's parameters (Tucker et
  al., 2019): the score term of ``log q`` is dropped (its parameters are held fixed in
  ``log q``) and each particle's path gradient is weighted by its squared normalized
  weight; the model's parameters get the IWAE gradient. Unlike the IWAE estimator, its
  signal-to-noise ratio for the guide does not fall as ``k`` grows (Rainforth et al.,
  2018);
- ``"stl"``: "sticking the landing" (Roeder et al., 2017): the score term dropped, path
  gradients weighted by the normalized weights; for ``k = 1`` the ELBO's path-only
  estimator.

"Path gradient" means the whole path: in a hierarchical guide (``z1 ~ q(z1 | z2, x)``)
the log weight depends on z2 through ``q(z1 | z2)``'s parameters too, and each path from
the guide's parameters to a log weight is weighted once (tested: at the exact posterior of
a two-level model the DReG and STL gradients are zero for every draw, and DReG has the
IWAE gradient's expectation).

Scales. The factor outside the log-sum-exp is the data plate's subsampling factor times
any scale that every site of model and guide shares (``poutine.scale(c)`` around the
whole program gives ``c`` times the bound). A scale on some sites only (a KL weight
``beta`` on the latents, set with ``poutine.scale`` as :meth:`~pyro_vae.VAE.kl_weight`
does, a tempered likelihood, or an inner plate's subsampling) multiplies its site's
log-density inside the log weight:
``log w = log p(x | z) + beta (log p(z) - log q(z | x))``, an annealed bound that is the
IWAE bound at ``beta = 1``. ``pyro.deterministic`` sites have no density and are skipped.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import detach, scale_and_mask
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, warn_if_nan

from .errors import UsageError

#: the gradient estimators of :class:`IWAE_ELBO`.
ESTIMATORS = ("iwae", "dreg", "stl")
#: the name of the particle plate the objective wraps model and guide in.
PARTICLES = "_pyro_vae_iwae_particles"


class IWAE_ELBO(ELBO):
    """The per-data-point importance-weighted bound (IWAE) with ``num_particles``
    particles, as a Pyro ELBO: ``SVI(model, guide, optim, IWAE_ELBO(5, "dreg"))``.

    It handles any model and guide whose sample sites all lie in one plate of data
    points (other plates nested inside it are summed per data point) and whose guide
    sites are reparameterizable; it refuses, naming the site, a global latent (a site
    outside that plate), a guide site without ``rsample`` and an enumerated site. The
    particles are vectorized in a plate outside the model's plates, so the model must
    broadcast over a leading sample dimension (``pyro.plate`` does that for its sites).

    :param num_particles: ``k``, the particles per data point (1 gives the ELBO).
    :param estimator: "iwae", "dreg" or "stl" (see :mod:`pyro_vae.objectives`).
    :param max_plate_nesting: the model's plate nesting; guessed once when not given.
    """

    def __init__(
        self,
        num_particles: int = 5,
        estimator: str = "iwae",
        max_plate_nesting: float = float("inf"),
    ):
        if estimator not in ESTIMATORS:
            raise UsageError(
                f"unknown estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}"
            )
        if isinstance(num_particles, bool) or not isinstance(num_particles, int):
            raise UsageError(f"num_particles must be an integer, got {num_particles!r}")
        if num_particles < 1:
            raise UsageError(f"num_particles must be at least 1, got {num_particles}")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.estimator = estimator

    def __repr__(self) -> str:
        return f"IWAE_ELBO(num_particles={self.num_particles}, estimator={self.estimator!r})"

    # ------------------------------------------------------------------ Pyro's interface
    def loss(self, model, guide, *args, **kwargs) -> float:
        """The negative bound of the batch (scaled to the data set) as a float."""
        with torch.no_grad():
            value = torch_item(self._loss_and_surrogate(model, guide, args, kwargs)[0])
        return warn_if_nan(value, "loss")

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative bound as a tensor whose gradient is the chosen estimator's."""
        loss, surrogate = self._loss_and_surrogate(model, guide, args, kwargs)
        warn_if_nan(loss, "loss")
        return loss.detach() + (surrogate - surrogate.detach())

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss as a float, after adding the estimator's gradient to every trainable
        parameter's ``.grad`` (what ``SVI.step`` calls)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("IWAE_ELBO weighs all particles at once; see log_weights")

    # ------------------------------------------------------------------ the computation
    def _loss_and_surrogate(self, model, guide, args, kwargs):
        fused = _fused_route(self, model, guide, args, kwargs)
        if fused is not None:
            return fused()
        weights = self.log_weights(model, guide, args, kwargs)
        return bound_and_surrogate(
            weights.log_w, weights.scale, self.estimator, weights.values, weights.fixed_z_log_p
        )

    def log_weights(self, model, guide, args: tuple, kwargs: dict) -> LogWeights:
        """The ``(k, batch)`` log weights of one draw of particles, and what the chosen
        estimator's surrogate needs beside them (:class:`LogWeights`).

        Under "dreg" and "stl" the guide's log-density is taken with its parameters held
        fixed and the sampled values live. A guide with one sample site gets that from a
        copy of its distribution with detached parameters, and DReG's squared weights from
        a gradient hook on the site's value. A guide with several sites (a hierarchy,
        ``z1 ~ q(z1 | z2, x)``) needs the log-density's dependence on the *other* sites'
        values too, and a hook on each value would weigh a path through two sites twice: it
        gets the fixed-parameter log-density as the full one minus its score (the guide
        replayed on the values, detached) and DReG's weights from the surrogate
        :func:`bound_and_surrogate` builds with the model's log-density at detached
        values (the model replayed once more, with the random state of its first run, so
        that dropout draws the same masks). Both cost one more pass of each program, and
        run side effects (BatchNorm's running statistics) once more; not under
        ``torch.no_grad()`` (as in :meth:`loss`), where no gradient is wanted. A guide that
        draws randomness outside ``pyro.sample`` cannot be replayed alike (its sites draw no
        numbers on replay): the mismatch is found and refused by name.
        """
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        nesting = int(self.max_plate_nesting)
        particles = pyro.plate(PARTICLES, self.num_particles, dim=-(nesting + 1))
        guide_trace = poutine.trace(particles(guide)).get_trace(*args, **kwargs)
        # only a gradient needs log q with the parameters held fixed, and then a guide of
        # several sites needs replays (see the docstring)
        fixed_q = self.estimator in ("dreg", "stl") and torch.is_grad_enabled()
        several = fixed_q and len(_sample_sites(prune_subsample_sites(guide_trace))) > 1
        rng = _rng_states() if several else None  # the model's dropout, to replay it alike
        model_trace = poutine.trace(poutine.replay(particles(model), trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, nesting + 1)
        replays = {}
        if several:
            replays = self._replays(particles, model, guide, guide_trace, rng, args, kwargs)
        model_trace = prune_subsample_sites(model_trace)
        guide_trace = prune_subsample_sites(guide_trace)
        plate = _data_plate(model_trace, guide_trace)
        scale = _outer_scale((model_trace, guide_trace), plate)

        def per_point(site: dict, log_p: torch.Tensor) -> torch.Tensor:
            return _site_weight(site, scale) * _per_point(site, log_p, nesting + 1, plate.dim)

        def log_joint(trace) -> torch.Tensor:
            return sum(per_point(s, s["fn"].log_prob(s["value"])) for s in _sample_sites(trace))

        log_q, values = 0.0, []
        for site in _sample_sites(guide_trace):
            _check_guide_site(site)
            if not fixed_q:
                log_q = log_q + per_point(site, site["fn"].log_prob(site["value"]))
            elif replays:  # the full log-density minus its score term
                full = site["fn"].log_prob(site["value"])
                again = replays["guide"].nodes[site["name"]]
                score = _fixed_log_prob(again, self.estimator)
                _check_replay(f"guide site {site['name']!r}", full, score, self.estimator)
                log_q = log_q + per_point(site, full - score + score.detach())
            else:
                log_q = log_q + per_point(site, _fixed_log_prob(site, self.estimator, detach))
                right = site["value"].dim() - site["fn"].event_dim  # batch dims end here
                values.append((site["value"], right - nesting - 1, right + plate.dim))
        log_p = log_joint(model_trace)
        fixed_z = None
        if "model" in replays:
            fixed_z = log_joint(replays["model"])
            _check_replay("the model", log_p, fixed_z, self.estimator)
        return LogWeights(log_p - log_q, scale, values, fixed_z)

    def _replays(self, particles, model, guide, guide_trace, rng, args, kwargs) -> dict:
        """The guide replayed on its values, detached (its score term), and under "dreg"
        the model too, with the random state its first run had (dropout draws alike)."""
        frozen = _detached(guide_trace)

        def replay(program):
            traced = poutine.trace(poutine.replay(particles(program), trace=frozen))
            return prune_subsample_sites(traced.get_trace(*args, **kwargs))

        replays = {"guide": replay(guide)}
        if self.estimator == "dreg":
            with _rewound(rng):
                replays["model"] = replay(model)
        return replays


class LogWeights(NamedTuple):
    """One draw of ``k`` particles for every data point of a batch, as
    :meth:`IWAE_ELBO.log_weights` computes it."""

    #: ``(k, batch)``: log p(x, z_i) - log q(z_i | x), each site at its own scale; the
    #: guide's parameters held fixed under "dreg" and "stl".
    log_w: torch.Tensor
    #: the factor outside the log-sum-exp (the plate's subsampling, a shared scale).
    scale: float
    #: "dreg" with one guide site: its values, with the index of their particle and data
    #: dimensions, whose gradients :func:`bound_and_surrogate` reweighs.
    values: list
    #: "dreg" with several guide sites: ``(k, batch)`` log p(x, z_i) at the same but
    #: detached values (gradients to the model's parameters only), else None.
    fixed_z_log_p: torch.Tensor | None = None


def bound_and_surrogate(
    log_w: torch.Tensor,
    scale: float | torch.Tensor,
    estimator: str,
    values=(),
    fixed_z_log_p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss ``-scale * sum_n L_k(x_n)`` from ``(k, batch)`` log weights, and a
    surrogate whose gradient is ``estimator``'s (see :mod:`pyro_vae.objectives`).

    DReG gives the guide's parameters the normalized weights squared and the model's the
    weights themselves, in one of two ways. :param values: the guide's sampled values,
    each with the index of its particle dimension and of its data dimension; the gradient
    that reaches them is reweighted (right when no value depends on another).
    :param fixed_z_log_p: the model's log-density at the detached values: the surrogate
    is ``sum w^2 log_w + (w - w^2) log p(x, z)``, for any guide.
    """
    k = log_w.shape[0]
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)  # (batch,)
    loss = -scale * bound.sum()
    if estimator == "iwae":
        return loss, loss
    weights = torch.softmax(log_w.detach(), dim=0)  # normalized, (k, batch)
    if estimator == "dreg" and fixed_z_log_p is not None:
        squared = weights.square()
        terms = squared * log_w + (weights - squared) * fixed_z_log_p
        return loss, -scale * terms.sum()
    if estimator == "dreg":
        for value, particle_index, data_index in values:
            _reweight_gradient(value, weights, particle_index, data_index)
    surrogate = -scale * (weights * log_w).sum()
    return loss, surrogate


def _reweight_gradient(value: torch.Tensor, weights, particle_index: int, data_index: int):
    """Multiply the gradient that reaches ``value`` (a guide site's particles) by each
    particle's normalized weight: with the surrogate's own weight, its square (DReG)."""
    if not value.requires_grad:
        return
    shape = [1] * value.dim()
    shape[particle_index] = weights.shape[0]
    shape[data_index] = weights.shape[1]
    value.register_hook(lambda grad: grad * weights.reshape(shape).to(grad.dtype))


def _fixed_log_prob(site: dict, estimator: str, detach_fn=None) -> torch.Tensor:
    """The site's log-density at its value, with ``detach_fn`` applied to its distribution
    first; a distribution that cannot evaluate a value it did not draw itself (a flow
    with a non-invertible transform, e.g. Planar) is refused by name."""
    fn = detach_fn(site["fn"]) if detach_fn is not None else site["fn"]
    try:
        return fn.log_prob(site["value"])
    except (KeyError, NotImplementedError) as error:
        raise UsageError(
            f"IWAE_ELBO(estimator={estimator!r}) evaluates log q of guide site "
            f"{site['name']!r} with the guide's parameters held fixed, which its "
            f"{type(site['fn']).__name__} cannot do ({type(error).__name__}: {error}); a "
            "flow with a non-invertible transform (Planar, Radial) needs estimator='iwae'"
        ) from error


def _check_replay(what: str, first: torch.Tensor, again: torch.Tensor, estimator: str) -> None:
    """A replay on the same values must give the same log-density; it does not when the
    program draws randomness outside ``pyro.sample`` (dropout in a guide), and then the
    estimator's gradient would be wrong."""
    if not torch.allclose(first.detach(), again.detach(), rtol=1e-4, atol=1e-3):
        raise UsageError(
            f"IWAE_ELBO(estimator={estimator!r}) replays a guide of several sites on the "
            f"values it drew, but the replay gave {what} another log-density: the program "
            "draws randomness outside pyro.sample (dropout, say). Make it deterministic "
            "given x and its sample sites (e.g. module.eval()), or use estimator='iwae'"
        )


def _rng_states() -> tuple:
    """The CPU's and (if in use) every CUDA device's random state."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None


@contextlib.contextmanager
def _rewound(states: tuple) -> Iterator[None]:
    """Run with the random states ``states``, and leave the current ones as they were."""
    cpu, cuda = states
    with torch.random.fork_rng(devices=list(range(len(cuda))) if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        yield


def _detached(trace) -> Trace:
    """A copy of ``trace`` whose sample sites hold their values detached (to replay)."""
    copy = Trace()
    for name, site in trace.nodes.items():
        value = site.get("value")
        if site["type"] == "sample" and isinstance(value, torch.Tensor):
            site = {**site, "value": value.detach()}
        copy.add_node(name, **site)
    return copy


def _sample_sites(trace) -> list[dict]:
    """The sites with a density (``pyro.deterministic`` records a value and has none)."""
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site["infer"].get("_deterministic")
    ]


def _outer_scale(traces, plate) -> float:
    """The factor outside the log-sum-exp: the data plate's subsampling factor, times a
    scale that *every* site of model and guide shares beyond its plates' subsampling
    (``poutine.scale`` around the whole program, as a user normalising the loss applies
    it). A scale on some sites only (a KL weight on the latents, a tempered likelihood, an
    inner plate's subsampling) weighs those sites inside the log weights, as Pyro's
    per-site scales do."""
    scales = [
        _scalar(site["scale"]) / _subsampling(site["cond_indep_stack"])
        for trace in traces
        for site in _sample_sites(trace)
    ]
    same = (
        scales
        and all(isinstance(s, float) for s in scales)  # a tensor of scales: _site_weight refuses
        and all(math.isclose(s, scales[0], rel_tol=1e-6) for s in scales)
    )
    return (scales[0] if same else 1.0) * _subsampling([plate])


def _subsampling(frames) -> float:
    """The product of the subsampling factors (full size over batch) of ``frames``,
    vectorized or sequential plates alike."""
    factor = 1.0
    for frame in frames:
        if frame.full_size is not None and frame.size:
            factor *= frame.full_size / frame.size
    return factor


def _scalar(scale):
    """A site's scale as a float, unless it is a tensor of several."""
    if isinstance(scale, torch.Tensor):
        return scale.item() if scale.numel() == 1 else scale
    return float(scale)


def _data_plate(model_trace, guide_trace):
    """The one plate of data points that every sample site lies in."""
    common, plates = None, {}
    for trace in (model_trace, guide_trace):
        for site in _sample_sites(trace):
            frames = {f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLES}
            plates[site["name"]] = sorted(f.name for f in frames)
            if not frames:
                packed = site["name"].startswith("_Auto")  # AutoDiagonalNormal and kin
                raise UsageError(
                    f"IWAE_ELBO bounds each data point of a plate, but site {site['name']!r} is "
                    "outside every plate (a global latent or observation), where a per-point "
                    "bound is not defined; use Trace_ELBO, or RenyiELBO for a batch-level bound"
                    + (
                        " (this autoguide packs all latents into one vector outside the "
                        "plates; AutoNormal keeps each latent in its plate)"
                        if packed
                        else ""
                    )
                )
            common = frames if common is None else common & frames
    if not common:
        where = "; ".join(f"{name!r} in {', '.join(names)}" for name, names in plates.items())
        raise UsageError(
            "IWAE_ELBO needs every sample site inside one plate of data points, and no plate "
            f"holds them all ({where}); put them in one plate"
        )
    # of the plates every site shares, the outermost is the data plate
    return min(common, key=lambda frame: frame.dim)


def _check_guide_site(site: dict) -> None:
    name = site["name"]
    if site["infer"].get("enumerate"):
        raise UsageError(f"IWAE_ELBO cannot enumerate guide site {name!r}; sample it instead")
    if not getattr(site["fn"], "has_rsample", False):
        raise UsageError(
            f"IWAE_ELBO needs reparameterized guide sites, but {name!r} "
            f"({type(site['fn']).__name__}) has no rsample; relax it (e.g. "
            "RelaxedOneHotCategorical) or train it with TraceGraph_ELBO"
        )


def _per_point(site: dict, log_p: torch.Tensor, particle_dims: int, data_dim: int):
    """A site's log-density as ``(k, batch)``: summed over every dimension but the
    particle and data ones (plates nested inside the data plate), masked as the site is."""
    log_p = scale_and_mask(log_p, 1.0, site["mask"])  # a masked -inf or nan stays out
    log_p = log_p.reshape((1,) * max(0, particle_dims - log_p.dim()) + log_p.shape)
    keep = (log_p.dim() - particle_dims, log_p.dim() + data_dim)
    others = [d for d in range(log_p.dim()) if d not in keep]
    if others:
        log_p = log_p.sum(others, keepdim=True)
    return log_p.reshape(log_p.shape[keep[0]], log_p.shape[keep[1]])


def _site_weight(site: dict, outer_scale: float):
    """The site's own scale, the factor outside the log-sum-exp taken out (1 but for a
    KL weight or another ``poutine.scale`` on some of the sites)."""
    weight = site["scale"] / outer_scale
    if isinstance(weight, torch.Tensor) and weight.dim() > 0:
        raise UsageError(
            f"IWAE_ELBO takes one scale per site, but site {site['name']!r} has a scale of "
            f"shape {tuple(weight.shape)}"
        )
    return weight


def _fused_route(elbo: IWAE_ELBO, model, guide, args, kwargs) -> Callable | None:
    """The package's VAE computes its bound without tracing (see :mod:`pyro_vae.fused`)."""
    from .fused import recognise

    recognised = recognise(model, guide, args, kwargs)
    if recognised is None:
        return None
    vae, x, num_data = recognised
    return lambda: vae.fused_iwae_loss(
        x,
        num_data=num_data,
        num_particles=elbo.num_particles,
        estimator=elbo.estimator,
        check=False,  # recognise() has just asked can_fuse()
    )
