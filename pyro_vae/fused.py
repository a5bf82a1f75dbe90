"""Pyro ELBOs that compute the package's own VAE without tracing it.

:class:`FusedTrace_ELBO` and :class:`FusedTraceMeanField_ELBO` are Pyro's ``Trace_ELBO``
and ``TraceMeanField_ELBO``, so ``SVI`` and any Pyro code take them as such. When the
model and guide they are given are ``vae.model`` and ``vae.guide`` of one unmodified
:class:`~pyro_vae.VAE`, they compute the loss with :meth:`~pyro_vae.VAE.elbo_loss`: the
same distributions, the same single draw of z, the same scaling, but no trace of the
model and guide, no messages, no per-site bookkeeping. That fixed Python cost is what
dominates a training step on a GPU. Every other program (a handler-wrapped model, an
``SSVAE``, a subclass with its own ``model``, your own model) runs through Pyro's code
unchanged. ``tests/test_fused.py`` checks that both routes give equal losses and
gradients from the same random state, for every configuration of the VAE.

Example::

    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), FusedTrace_ELBO())
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from pyro.util import warn_if_nan

from .vae import VAE

#: methods that make up the Pyro program of a VAE; a subclass that overrides any of them
#: has a program of its own, which only Pyro's ELBO computes faithfully. A method that
#: model, guide or elbo_loss comes to call belongs here too.
_PROGRAM = (
    "model",
    "guide",
    "_model_body",
    "_plate",
    "_data_plate",
    "_plate_size",
    "_latent_scale",
    "kl_weight",
    "elbo_loss",
)
#: methods of Pyro's ELBO that make up its estimator; an ELBO subclass that overrides one
#: (a custom objective) computes something else than the fused loss.
_ESTIMATOR = ("_get_trace", "_get_traces", "_differentiable_loss_particle")


def fused_loss(
    elbo: Trace_ELBO, model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> Callable[[], torch.Tensor] | None:
    """The fused form of ``elbo``'s differentiable loss of ``model`` and ``guide`` called
    with ``args`` and ``kwargs``, as a function of no arguments, or None when the call is
    not one it computes exactly like Pyro does.

    Recognised: ``vae.model`` and ``vae.guide`` of the same :class:`~pyro_vae.VAE`, whose
    class overrides none of the methods of its program; called with a batch ``x`` and
    optionally ``num_data``; ``elbo`` of a class that keeps its Pyro class's estimator,
    with one particle, not vectorized; the VAE not frozen (its weights must not train),
    with a reparameterizable latent (a relaxed-categorical VAE in eval mode draws exact
    codes); no Pyro handler active but the parameter-only traces that ``SVI.step`` runs,
    so nothing else can change a site. With such a trace active, the VAE's parameters are registered
    in Pyro's param store as its ``model`` and ``guide`` register them, so ``SVI`` finds
    and trains them; with no handler active nothing listens for parameter statements, and
    the fused loss makes none (the param store is left as it was).

    :param elbo: a Pyro ``Trace_ELBO``; a ``TraceMeanField_ELBO`` asks for analytic KL.
    """
    vae = getattr(model, "__self__", None)
    if not isinstance(vae, VAE) or getattr(guide, "__self__", None) is not vae:
        return None
    if getattr(model, "__func__", None) is not VAE.model:
        return None
    if getattr(guide, "__func__", None) is not VAE.guide:
        return None
    if not _recognised(type(vae), type(elbo)):
        return None
    analytic_kl = isinstance(elbo, TraceMeanField_ELBO)
    if elbo.num_particles != 1 or elbo.vectorize_particles:
        return None
    if vae.is_frozen or vae._exact_codes:
        return None
    batch = _batch(args, kwargs)
    if batch is None:
        return None
    if not all(type(handler) is TraceMessenger and handler.param_only for handler in _PYRO_STACK):
        return None
    x, num_data = batch

    def loss() -> torch.Tensor:
        if not _PYRO_STACK:
            return vae.elbo_loss(x, num_data=num_data, analytic_kl=analytic_kl)
        # what the pyro_program wrapper of model and guide does: claim the VAE's names in
        # the param store, then read its modules inside its Pyro context, which turns each
        # module attribute into a pyro.module statement that the trace records
        vae._claim_param_store()
        with vae._pyro_context:
            return vae.elbo_loss(x, num_data=num_data, analytic_kl=analytic_kl)

    return loss


@functools.cache
def _recognised(vae_class: type, elbo_class: type) -> bool:
    """Whether ``vae_class`` keeps the VAE's program and ``elbo_class`` its Pyro class's
    estimator: a question about classes, answered once per pair (not on every step)."""
    if any(getattr(vae_class, name) is not getattr(VAE, name) for name in _PROGRAM):
        return False
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

        The fused route returns the surrogate loss itself, with no host synchronization
        while Pyro's validation is off (Pyro reads its value to the host, as a float, on
        every call; with validation on, both check it for NaN, which reads the device).
        """
        loss = fused_loss(self, model, guide, args, kwargs)
        if loss is None:
            return super().differentiable_loss(model, guide, *args, **kwargs)
        value = loss()
        if is_validation_enabled():
            warn_if_nan(value, "loss")
        return value

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The loss (negative ELBO estimate) as a float, fused for a VAE."""
        loss = fused_loss(self, model, guide, args, kwargs)
        if loss is None:
            return super().loss(model, guide, *args, **kwargs)
        with torch.no_grad():
            value = torch_item(loss())
        warn_if_nan(value, "loss")
        return value

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss as a float, after adding its gradient to every trainable parameter's
        ``.grad``, as ``SVI.step`` asks; fused for a VAE."""
        loss = fused_loss(self, model, guide, args, kwargs)
        if loss is None:
            return super().loss_and_grads(model, guide, *args, **kwargs)
        value = loss()
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
    :meth:`~pyro_vae.VAE.elbo_loss` instead of tracing its model and guide; equal in
    value and gradient, from the same random state. See :func:`fused_loss` for the
    programs it recognises; all others go through ``Trace_ELBO`` unchanged.

    Takes ``Trace_ELBO``'s arguments.
    """


class FusedTraceMeanField_ELBO(_Fused, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` (analytic KL where it exists) that computes the package's own
    VAE with ``vae.elbo_loss(..., analytic_kl=True)`` instead of tracing its model and
    guide; equal in value and gradient, from the same random state. See
    :func:`fused_loss` for the programs it recognises; all others go through
    ``TraceMeanField_ELBO`` unchanged.

    Takes ``TraceMeanField_ELBO``'s arguments.
    """
