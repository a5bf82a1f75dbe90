"""Where the package reads or writes Pyro's and PyTorch's private state, each with why.

The VAE, its latents and the fused ELBO reach other libraries' private names only
through the small functions here (a subclass's use of what its own base class offers
subclasses, such as a torch ``Distribution``'s ``_validate_args``, is not counted). Each
says which upstream detail it depends on, and ``tests/test_internals.py`` checks that
detail, so a new release of Pyro or PyTorch that changes it fails there instead of
making this package silently compute something else.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pyro.nn import PyroModule
from pyro.params.param_store import ParamStoreDict

# Pyro's stack of active effect handlers. The public ``am_i_wrapped()`` says only whether
# it is empty; the VAE also needs to know which handlers are on it (a parameter-only trace
# of SVI, a condition handler holding z), and Pyro offers no other view of it.
from pyro.poutine.runtime import _PYRO_STACK

# torch's Normal draws its noise with this function (``torch.normal`` under the JIT
# tracer, ``normal_`` otherwise); the latent's Normal draws with it too, so that its
# draws are torch's, number for number, from the same random state.
from torch.distributions.utils import _standard_normal
from torch.nn.modules import module as _torch_module


def pyro_handlers() -> list:
    """Pyro's active effect handlers, innermost last: the live stack, to read, not to change."""
    return _PYRO_STACK


def standard_normal(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Standard normal noise of ``shape`` exactly as ``torch.distributions.Normal.rsample``
    draws it."""
    return _standard_normal(shape, dtype=dtype, device=device)


def version(tensor: torch.Tensor) -> int:
    """The tensor's version counter, which every in-place operation on it (or on a view of
    it) increments: the one way to tell that a tensor has not changed since it was made.
    torch has no public accessor for it."""
    return tensor._version  # noqa: SLF001 torch's only view of the version counter


def claim_params(
    store: ParamStoreDict, params: Iterable[tuple[str, torch.Tensor]]
) -> tuple[list[str], bool]:
    """Make each ``name`` in Pyro's param ``store`` hold ``tensor`` itself where it holds
    another tensor. Returns the names changed, and whether every name is now in the store
    (none was missing).

    The public ``store[name] = tensor`` is not this: it stores a *contiguous copy* of a
    non-contiguous tensor (a conv weight in channels-last memory format), so the store
    would train a copy, and it leaves the replaced tensor's reverse entry behind. Pyro's
    own ``PyroModule`` writes the two dictionaries below directly, as done here.
    """
    by_name = store._params  # noqa: SLF001 name -> unconstrained tensor, as PyroModule writes it
    by_tensor = store._param_to_name  # noqa: SLF001 its reverse, kept in step with it
    claimed, complete = [], True
    for name, tensor in params:
        held = by_name.get(name)
        if held is None:
            complete = False
        elif held is not tensor:
            by_name[name] = tensor
            by_tensor.pop(held, None)
            by_tensor[tensor] = name
            claimed.append(name)
    return claimed, complete


def pyro_module_name(module: PyroModule) -> str:
    """The name under which a ``PyroModule``'s statements are made: its own, or the one its
    enclosing ``PyroModule`` gave it (``"outer.vae"``); what ``pyro.module`` statements of
    its children are prefixed with. Pyro has no public accessor for it."""
    return module._pyro_name  # noqa: SLF001 PyroModule's own record of its name


def has_pyro_attributes(module: PyroModule) -> bool:
    """Whether ``module`` holds a ``PyroSample`` or ``PyroParam`` attribute of its own:
    reading such an attribute makes a sample or param statement, and it can shadow a
    submodule of the same name. ``PyroModule`` keeps them in these two registries and
    offers no public view of the samples."""
    return bool(module._pyro_samples or module._pyro_params)  # noqa: SLF001 PyroModule's registries


def has_forward_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs a forward hook or pre-hook of its own, i.e. code
    besides its ``forward``; torch has no public accessor for a module's hooks."""
    return bool(
        module._forward_hooks  # noqa: SLF001 torch keeps a module's forward hooks here
        or module._forward_pre_hooks  # noqa: SLF001 and its forward pre-hooks here
    )


def has_global_forward_hooks() -> bool:
    """Whether a forward hook or pre-hook is registered for every module
    (``torch.nn.modules.module.register_module_forward_hook``)."""
    return bool(
        _torch_module._global_forward_hooks  # noqa: SLF001 where torch keeps them
        or _torch_module._global_forward_pre_hooks  # noqa: SLF001 (and the pre-hooks)
    )


def spawns_processes(strategy) -> bool:
    """Whether a Lightning Fabric ``strategy`` starts its processes by spawning or forking
    from the calling one (``ddp_spawn``, ``ddp_fork``): they then train copies of the
    model, whose weights must come back. Fabric tells only by its launcher's class, which
    it keeps private."""
    from lightning_fabric.strategies.launchers.multiprocessing import (
        _MultiProcessingLauncher,  # noqa: PLC2701 Fabric's spawning launcher, named only here
    )

    return isinstance(getattr(strategy, "launcher", None), _MultiProcessingLauncher)


class CpuAdam(torch.optim.Adam):
    """torch's Adam, without its per-step check for CUDA-graph capture when every parameter
    is on the CPU, where no step can be captured.

    That check asks ``torch.cuda.is_available()`` on every step. Importing Lightning sets
    ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (so that asking does not initialise CUDA before a
    fork), and with it, on a machine whose torch is built for CUDA but that trains on the
    CPU, each question loads and initialises NVML: about 0.3 ms, some 3% of an MNIST step
    (``docs/benchmarks.md``). On a GPU the answer is cached and the check runs as usual.
    The two methods are torch's private hooks for that check (renamed in torch 2.11);
    ``tests/test_engine.py`` counts the questions, so a renamed hook shows there.
    """

    def __init__(self, params, **options):
        super().__init__(params, **options)
        self.all_on_cpu = all(
            p.device.type == "cpu" for group in self.param_groups for p in group["params"]
        )

    def _accelerator_graph_capture_health_check(self) -> None:
        if not self.all_on_cpu:
            super()._accelerator_graph_capture_health_check()

    def _cuda_graph_capture_health_check(self) -> None:  # its name before torch 2.11
        if not self.all_on_cpu:
            super()._cuda_graph_capture_health_check()
