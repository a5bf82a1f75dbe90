"""What the package's Pyro models share: public site names under a prefix, the plate over
data points, and the rule that keeps a model's weights its own in Pyro's global param
store (:func:`pyro_program`, :meth:`NamedSites.frozen`)."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import pyro
import torch
from pyro.nn import PyroModule, pyro_method
from pyro.params.param_store import param_with_module_name

from . import internals
from .config import VAEConfig
from .errors import UsageError

_Program = TypeVar("_Program", bound=Callable)


def pyro_program(fn: _Program) -> _Program:
    """Make ``fn`` a Pyro program of its module (:func:`pyro.nn.pyro_method`) that always
    runs on the module's own weights.

    Pyro's global param store outlives models: a second model of the same name (a notebook
    cell run twice, a second ``load_vae``) would otherwise find the first model's tensors
    stored under its parameter names, and ``SVI`` would hand *those* to the optimizer
    while the model computes with its own, which then never move. Before each call the
    module claims its names in the store (:meth:`NamedSites._claim_param_store`). Inside
    :meth:`NamedSites.frozen` the program runs as plain PyTorch instead, so none of its
    weights reach the param store or an optimizer.
    """
    with_pyro = pyro_method(fn)

    @functools.wraps(fn)
    def program(self, *args, **kwargs):
        if self._frozen:
            return fn(self, *args, **kwargs)
        self._claim_param_store()
        return with_pyro(self, *args, **kwargs)

    program.body = fn  # what NamedSites.programs() runs
    return program  # type: ignore[return-value]


class NamedSites:
    """Public site names, each prefixed by ``config.name`` so that two models can share one
    Pyro program, and the plate over data points; shared by the package's models (of
    images or vectors). Also what keeps such a model's weights its own in Pyro's global
    param store."""

    config: VAEConfig
    decoder: torch.nn.Module
    _frozen: bool = False
    _warned_store: bool = False

    @property
    def is_frozen(self) -> bool:
        """Whether the model is inside :meth:`frozen` (and so must not be trained)."""
        return self._frozen

    def programs(self) -> tuple[Callable, Callable]:
        """``(model, guide)`` that sample the same sites with the same densities as
        :meth:`model` and :meth:`guide` but leave Pyro's param store alone: for a loop that
        optimizes ``self.parameters()`` itself (``fit`` does), registering every weight
        as a Pyro param on every call would only cost time (about 0.5 ms a step)."""
        return self._program("model"), self._program("guide")

    def _program(self, name: str) -> Callable:
        method = getattr(type(self), name)
        body = getattr(method, "body", None)
        # a subclass may override with a plain method or pyro_method; run it as it is
        return functools.partial(body, self) if body is not None else getattr(self, name)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Use the fitted model as a fixed part of another program while inside.

        Its weights take no gradients and never enter Pyro's param store, so ``SVI`` of an
        enclosing model (over z, say) cannot change them; ``model`` and ``guide`` still
        sample their sites as usual. Without it, calling ``vae.model`` inside your own model
        makes the VAE's weights parameters of *your* model, trained with it.
        """
        if self._frozen:  # nested: the outer block restores
            yield
            return
        flags = [p.requires_grad for p in self.parameters()]
        self.requires_grad_(False)
        self._frozen = True
        try:
            yield
        finally:
            self._frozen = False
            for p, flag in zip(self.parameters(), flags, strict=True):
                p.requires_grad_(flag)

    def _claim_param_store(self) -> bool:
        """Store this module's own weights under its parameter names in Pyro's param store,
        replacing tensors that another module of the same name left there.

        Returns whether the store now holds every weight of the plain submodules under its
        name and all of them train: then the ``pyro.module`` statements of the model and
        guide would change nothing in the store (they register only missing names, and
        warn only of frozen weights), so a caller with no Pyro handler active may skip them.
        """
        if pyro.settings.get("module_local_params"):
            return False  # Pyro keeps each module's parameters apart; nothing to claim
        named, frozen = [], False
        own_name = internals.pyro_module_name(self)
        for child_name, child in self.named_children():
            if isinstance(child, PyroModule):
                continue
            prefix = f"{own_name}.{child_name}"  # as PyroModule names it
            for param_name, param in child.named_parameters():  # as pyro.module lists them
                if param.requires_grad:  # pyro.module registers only these
                    named.append((param_with_module_name(prefix, param_name), param))
                else:
                    frozen = True
        claimed, complete = internals.claim_params(pyro.get_param_store(), named)
        if claimed and not self._warned_store:
            self._warned_store = True
            warnings.warn(
                f"Pyro's param store held parameters of another model named "
                f"'{self.config.name}' (e.g. {claimed[0]}); they now point at this model's "
                f"weights, so SVI trains this one. To keep two such models in one program, "
                f"give each its own name (VAEConfig(name=...), load_vae(..., name=...)).",
                stacklevel=3,
            )
        return complete and not frozen

    @staticmethod
    def _plate_size(batch: int, num_data: int | None) -> int:
        """The size of the data plate: ``num_data``, or the batch itself."""
        size = batch if num_data is None else int(num_data)
        if size < batch:
            raise UsageError(f"num_data={size} is smaller than the batch of {batch} images")
        return size

    def _data_plate(self, batch: int, device: torch.device, num_data: int | None) -> pyro.plate:
        """The plate over ``batch`` images, a subsample of ``num_data`` when that is given."""
        size = self._plate_size(batch, num_data)
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
