"""Pyro ELBOs that compute the package's own VAE without tracing it.

:class:`FusedTrace_ELBO` and :class:`FusedTraceMeanField_ELBO` are Pyro's ``Trace_ELBO``
and ``TraceMeanField_ELBO``, so ``SVI`` and any Pyro code take them as such. When the
model and guide they are given are ``vae.model`` and ``vae.guide`` of one
:class:`~pyro_vae.VAE` that runs the package's own program, they compute the loss with
:meth:`~pyro_vae.VAE.fused_elbo_loss`: the same distributions, the same single draw of z,
the same scaling, the same param statements, but no trace of the model and guide, no
messages, no per-site bookkeeping. That fixed Python cost is what dominates a training
step on a GPU. Every other program (a handler-wrapped model, an ``SSVAE``, a subclass with
its own ``model``, a VAE with a module of your own, your own model) runs through Pyro's
code unchanged, and so does any call whose outcome Pyro's code decides otherwise (an
error it raises, a check it makes). ``tests/test_fused.py`` checks that both routes give
equal losses, gradients, errors, warnings and param stores from the same random state.

Example::

    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), FusedTrace_ELBO())
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import torch_item
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.util import warn_if_nan

from .internals import pyro_handlers
from .vae import VAE, SiteShapeError

#: methods of Pyro's ELBO that make up its estimator; an ELBO subclass that overrides one
#: (a custom objective) computes something else than the fused loss.
_ESTIMATOR = ("_get_trace", "_get_traces", "_differentiable_loss_particle")


def fused_loss(
    elbo: Trace_ELBO, model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> Callable[[], torch.Tensor] | None:
    """The fused form of ``elbo``'s differentiable loss of ``model`` and ``guide`` called
    with ``args`` and ``kwargs``, as a function of no arguments, or None when the call is
    not one it computes exactly like Pyro does.

    Recognised: ``vae.model`` and ``vae.guide`` of the same :class:`~pyro_vae.VAE` for
    which :meth:`~pyro_vae.VAE.can_fuse` holds (it runs its own program, judged by what
    the instance will run; not frozen; a KL weight > 0; reparameterized codes); called
    with a batch ``x`` and optionally ``num_data``; ``elbo`` of a class that keeps its
    Pyro class's estimator, with one particle, not vectorized, and room for the data
    plate (``max_plate_nesting`` >= 1: with less, Pyro's shape check refuses the program
    under validation); no Pyro handler active but the parameter-only traces that
    ``SVI.step`` runs, so nothing else can change a site. The loss makes the param
    statements the model and guide make (:meth:`~pyro_vae.VAE.fused_elbo_loss`), so the
    param store ends up as Pyro's route leaves it, with or without a handler. A
    ``torch.nn`` network that gives a site another batch shape than the batch is found
    only while the loss is computed (:class:`~pyro_vae.vae.SiteShapeError`); the ELBO
    methods then hand the call to Pyro, which broadcasts or refuses the site itself.

    :param elbo: a Pyro ``Trace_ELBO``; a ``TraceMeanField_ELBO`` asks for analytic KL.
    """
    if not _keeps_estimator(type(elbo)):
        return None
    if elbo.num_particles != 1 or elbo.vectorize_particles:
        return None
    if not elbo.max_plate_nesting >= 1:  # the data plate is at dim -1
        return None
    recognised = recognise(model, guide, args, kwargs)
    if recognised is None:
        return None
    vae, x, num_data = recognised
    analytic_kl = isinstance(elbo, TraceMeanField_ELBO)
    # can_fuse() was asked just now: the loss need not ask again
    return functools.partial(
        vae.fused_elbo_loss, x, num_data=num_data, analytic_kl=analytic_kl, check=False
    )


def recognise(
    model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> tuple[VAE, torch.Tensor, int | None] | None:
    """``(vae, x, num_data)`` when ``model`` and ``guide`` are ``vae.model`` and
    ``vae.guide`` of one VAE that can compute its own loss (:meth:`~pyro_vae.VAE.can_fuse`),
    called with a batch ``x`` (and optionally ``num_data``), and no Pyro handler is active
    but ``SVI``'s parameter-only traces; else None. What every fused objective asks
    first (:func:`fused_loss`, :class:`~pyro_vae.objectives.IWAE_ELBO`)."""
    vae = getattr(model, "__self__", None)
    if not isinstance(vae, VAE) or getattr(guide, "__self__", None) is not vae:
        return None
    if getattr(model, "__func__", None) is not VAE.model:
        return None
    if getattr(guide, "__func__", None) is not VAE.guide:
        return None
    batch = _batch(args, kwargs)
    if batch is None:
        return None
    if not all(
        type(handler) is TraceMessenger and handler.param_only for handler in pyro_handlers()
    ):
        return None
    if not vae.can_fuse():
        return None
    return vae, *batch


@functools.cache
def _keeps_estimator(elbo_class: type) -> bool:
    """Whether ``elbo_class`` keeps its Pyro class's estimator: a question about a class,
    answered once (not on every step)."""
    pyro_elbo = TraceMeanField_ELBO if issubclass(elbo_class, TraceMeanField_ELBO) else Trace_ELBO
    return all(getattr(elbo_class, name) is getattr(pyro_elbo, name) for name in _ESTIMATOR)


def _batch(args: tuple, kwargs: dict) -> tuple[torch.Tensor, int | None] | None:
    """``(x, num_data)`` of a call ``(x)``, ``(x, num_data=n)`` or ``(x=x, ...)``; None for
    any other call (``batch_size``, ``x=None``), which Pyro's own route then handles."""
    kwargs = dict(kwargs)
    if len(args) == 1 and "x" not in kwargs:
        x = args[0]
    elif not args and "x" in kwargs:
        x = kwargs.pop("x")
    else:
        return None
    num_data = kwargs.pop("num_data", None)
    if kwargs or not isinstance(x, torch.Tensor):
        return None
    return x, num_data


class _Fused:
    """The ELBO methods, each taking the fused route where :func:`fused_loss` allows it
    and Pyro's own (the next class in the MRO) otherwise."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """Pyro's differentiable loss of ``model`` and ``guide``, fused for a VAE.

        The fused route returns the surrogate loss itself. As Pyro's does, it warns when
        the loss is NaN, validation on or off, which reads the value from the device.
        """
        loss = fused_loss(self, model, guide, args, kwargs)
        if loss is not None:
            try:
                return warn_if_nan(loss(), "loss")
            except SiteShapeError:
                pass  # a network of the user's that changes shapes: Pyro decides
        return super().differentiable_loss(model, guide, *args, **kwargs)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The loss (negative ELBO estimate) as a float, fused for a VAE."""
        loss = fused_loss(self, model, guide, args, kwargs)
        if loss is not None:
            try:
                with torch.no_grad():
                    value = torch_item(loss())
            except SiteShapeError:
                pass  # a network of the user's that changes shapes: Pyro decides
            else:
                return warn_if_nan(value, "loss")
        return super().loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss as a float, after adding its gradient to every trainable parameter's
        ``.grad``, as ``SVI.step`` asks; fused for a VAE."""
        loss = fused_loss(self, model, guide, args, kwargs)
        if loss is None:
            return super().loss_and_grads(model, guide, *args, **kwargs)
        try:
            value = loss()
        except SiteShapeError:  # a network of the user's that changes shapes: Pyro decides
            return super().loss_and_grads(model, guide, *args, **kwargs)
        vae = model.__self__
        # Pyro differentiates only when the program has trainable parameters
        if value.requires_grad and any(p.requires_grad for p in vae.parameters()):
            value.backward(retain_graph=self.retain_graph)
        value = torch_item(value)
        warn_if_nan(value, "loss")
        return value


class FusedTrace_ELBO(_Fused, Trace_ELBO):
    """``Trace_ELBO`` (the single-sample log-density ratio, Wingate & Weber, 2013;
    Ranganath et al., 2014) that computes the package's own VAE with
    :meth:`~pyro_vae.VAE.fused_elbo_loss` instead of tracing its model and guide; equal in
    value and gradient, from the same random state. See :func:`fused_loss` for the
    programs it recognises; all others go through ``Trace_ELBO`` unchanged.

    Takes ``Trace_ELBO``'s arguments.
    """


class FusedTraceMeanField_ELBO(_Fused, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` (analytic KL where it exists) that computes the package's own
    VAE with ``vae.fused_elbo_loss(..., analytic_kl=True)`` instead of tracing its model and
    guide; equal in value and gradient, from the same random state. See
    :func:`fused_loss` for the programs it recognises; all others go through
    ``TraceMeanField_ELBO`` unchanged.

    Takes ``TraceMeanField_ELBO``'s arguments.
    """
