"""The upstream details that ``pyro_vae/internals.py`` depends on, each checked: a new Pyro
or PyTorch that changes one fails here, not silently in the package."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.nn import PyroModule, PyroParam, PyroSample
from pyro.params.param_store import param_with_module_name
from pyro.poutine.runtime import am_i_wrapped

from pyro_vae import internals


def test_claim_params_makes_the_store_hold_the_given_tensors():
    """Pyro's param store keeps a name -> tensor dictionary and its reverse; claiming a
    name makes ``pyro.param`` return the claimed tensor itself, and the reverse lookup
    forget the replaced one. A name not in the store is left alone and reported."""
    store = pyro.get_param_store()
    stale = pyro.param("model.weight", torch.zeros(3)).unconstrained()
    assert isinstance(store._params, dict) and isinstance(store._param_to_name, dict)
    own, unknown = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    claimed, complete = internals.claim_params(store, [("model.weight", own)])
    assert claimed == ["model.weight"] and complete
    assert pyro.param("model.weight").unconstrained() is own
    assert store.param_name(own) == "model.weight" and store.param_name(stale) is None
    claimed, complete = internals.claim_params(
        store, [("model.weight", own), ("model.other", unknown)]
    )
    assert claimed == [] and not complete
    assert "model.other" not in store


def test_the_public_store_assignment_copies_a_channels_last_weight():
    """Why ``claim_params`` writes the store's dictionaries: the public ``store[name] = t``
    stores a contiguous copy of a non-contiguous tensor, which an optimizer would then
    train instead of the module's weight. Should Pyro stop copying, the public form
    would do, and this test says so."""
    weight = torch.nn.Parameter(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last))
    store = pyro.get_param_store()
    store["conv.weight"] = weight
    assert pyro.param("conv.weight").unconstrained() is not weight
    internals.claim_params(store, [("conv.weight", weight)])
    assert pyro.param("conv.weight").unconstrained() is weight


def test_version_counts_in_place_changes():
    tensor = torch.zeros(4)
    before = internals.version(tensor)
    tensor.add_(1.0)
    assert internals.version(tensor) > before
    after = internals.version(tensor)
    tensor[:2].mul_(2.0)  # through a view
    assert internals.version(tensor) > after
    assert internals.version(tensor + 1) == 0  # a new tensor starts unchanged


class _Inner(PyroModule):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)

    def forward(self):
        return self.linear.weight


def test_pyro_module_name_is_the_prefix_of_its_childrens_param_names():
    """A root ``PyroModule`` has the name it was given, a nested one its path, and the
    plain modules under it register their parameters under that name (how the VAE names
    the entries it claims in the param store)."""
    outer = PyroModule(name="outer")
    outer.inner = _Inner()
    assert internals.pyro_module_name(outer) == "outer"
    assert internals.pyro_module_name(outer.inner) == "outer.inner"
    outer.inner()  # with no handler active, the pyro.module statement registers the weights
    prefix = f"{internals.pyro_module_name(outer.inner)}.linear"
    name = param_with_module_name(prefix, "weight")
    assert pyro.param(name).unconstrained() is outer.inner.linear.weight


def test_has_pyro_attributes_sees_pyro_samples_and_params():
    module = PyroModule()
    assert not internals.has_pyro_attributes(module)
    module.shift = PyroSample(pyro.distributions.Normal(0.0, 1.0))
    assert internals.has_pyro_attributes(module)
    other = PyroModule()
    other.offset = PyroParam(torch.zeros(()))
    assert internals.has_pyro_attributes(other)
    del module.shift
    assert not internals.has_pyro_attributes(module)


def test_forward_hooks_are_seen_on_a_module_and_for_all_modules():
    module = torch.nn.Linear(2, 2)
    assert not internals.has_forward_hooks(module)
    for register in (module.register_forward_hook, module.register_forward_pre_hook):
        handle = register(lambda *args: None)
        assert internals.has_forward_hooks(module)
        handle.remove()
        assert not internals.has_forward_hooks(module)
    assert not internals.has_global_forward_hooks()
    global_hooks = torch.nn.modules.module
    for register in (
        global_hooks.register_module_forward_hook,
        global_hooks.register_module_forward_pre_hook,
    ):
        handle = register(lambda *args: None)
        try:
            assert internals.has_global_forward_hooks()
        finally:
            handle.remove()
        assert not internals.has_global_forward_hooks()


def test_pyro_handlers_is_the_stack_of_active_handlers():
    assert internals.pyro_handlers() == [] and not am_i_wrapped()
    with poutine.trace(param_only=True) as outer, poutine.scale(scale=2.0) as inner:
        handlers = internals.pyro_handlers()
        assert handlers[-2:] == [outer, inner] and am_i_wrapped()
    assert internals.pyro_handlers() == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_standard_normal_draws_what_torchs_normal_draws(dtype):
    shape = torch.Size((5, 3))
    torch.manual_seed(3)
    ours = internals.standard_normal(shape, dtype=dtype, device=torch.device("cpu"))
    torch.manual_seed(3)
    zeros = torch.zeros(shape, dtype=dtype)
    theirs = torch.distributions.Normal(zeros, torch.ones_like(zeros)).rsample()
    assert ours.dtype == dtype and torch.equal(ours, theirs)


def test_spawns_processes_tells_fabrics_spawning_strategies_from_the_others():
    from lightning_fabric import Fabric

    from pyro_vae.internals import spawns_processes

    assert spawns_processes(Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").strategy)
    assert not spawns_processes(Fabric(accelerator="cpu", devices=2, strategy="ddp").strategy)
    assert not spawns_processes(Fabric(accelerator="cpu", devices=1).strategy)
