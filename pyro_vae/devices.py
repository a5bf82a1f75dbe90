"""Where training runs: a :class:`~pyro_vae.run.Run` made into Lightning Fabric, its
loggers, the optimizer, and the decision whether Fabric's wrappers are needed.

The loop (:mod:`pyro_vae.engine`) asks this module for a :class:`Setup`: the module
on its device, the optimizer, and the three calls of a step (forward, backward, the
optimizer's step), either Fabric's wrappers or, where they would only pass the call
on, the plain ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .internals import CpuAdam, spawns_processes
from .run import Run


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """ "auto" (or None) picks CUDA when a GPU is there, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"unknown device {device!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "device 'cuda' was asked for but no CUDA GPU is available; use 'cpu' or 'auto'"
        )
    return device


def make_loggers(names: Sequence[str], log_dir: str | Path | None) -> list:
    """Lightning Fabric loggers by name ("csv", "tensorboard"), writing under ``log_dir``."""
    loggers = []
    for name in dict.fromkeys(names):
        if log_dir is None:
            raise UsageError(f"logger {name!r} needs a log_dir to write to")
        if name == "csv":
            from lightning_fabric.loggers import CSVLogger

            # a new version folder per run segment: a resumed run must not overwrite the logs
            loggers.append(CSVLogger(str(log_dir), name="csv"))
        elif name == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise UsageError(
                    "the tensorboard logger needs the tensorboard package: "
                    "pip install 'pyro_vae[tensorboard]' (or pip install tensorboard)"
                ) from None
            from lightning_fabric.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(str(log_dir), name="tensorboard"))
        else:
            raise UsageError(f"unknown logger {name!r}; choose csv or tensorboard")
    return loggers


def make_fabric(run: Run, loggers: list | None = None):
    """A :class:`lightning_fabric.Fabric` for ``run``, with Fabric's own errors about
    impossible combinations turned into a :class:`UsageError` that names them."""
    from lightning_fabric import Fabric
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    on_cpu = run.accelerator == "cpu" or (
        run.accelerator == "auto" and not torch.cuda.is_available()
    )
    if run.precision == "16-mixed" and on_cpu:
        # Fabric would warn and run bf16-mixed instead, and the run folder would say 16-mixed
        raise UsageError(
            "precision '16-mixed' needs a CUDA GPU; on the CPU use 'bf16-mixed' or '32-true'"
        )
    devices = list(run.devices) if isinstance(run.devices, tuple) else run.devices
    try:
        return Fabric(
            accelerator=run.accelerator,
            devices=devices,
            num_nodes=run.num_nodes,
            strategy=run.strategy,
            precision=run.precision,
            loggers=loggers,
        )
    except (MisconfigurationException, ValueError, RuntimeError, TypeError) as error:
        where = f"accelerator={run.accelerator!r}, devices={run.devices!r}"
        raise UsageError(
            f"cannot train with {where}, num_nodes={run.num_nodes}, strategy={run.strategy!r}, "
            f"precision={run.precision!r}: {error}"
        ) from None


def spawns(fabric) -> bool:
    """Whether Fabric's launcher starts new processes by spawning (``ddp_spawn``): they then
    train copies of the model, whose weights must be sent back."""
    return spawns_processes(fabric.strategy)


def launched_by_cli() -> bool:
    """Whether ``fabric run`` made the processes, which forbids launching them again."""
    return os.environ.get("LT_CLI_USED", "0") == "1"


def weights_dtype(run: Run, module: nn.Module) -> torch.dtype:
    """The dtype of the weights once Fabric has set the module up: float64 under
    "64-true", else the module's own (mixed precisions keep float32 weights)."""
    if run.precision == "64-true":
        return torch.float64
    return next(module.parameters()).dtype


@dataclass
class Setup:
    """A module ready to train in this process, and the three calls of one step."""

    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    forward: Callable
    backward: Callable[[torch.Tensor], None]
    step: Callable[[], None]
    #: a gradient scaler (16-mixed) skips non-finite steps itself; the loop must not
    scaler: bool


def set_up(fabric, module: nn.Module, lr: float) -> Setup:
    """Move ``module`` to this process's device, make Adam over its trainable
    parameters, and wrap both with Fabric where its wrappers act (DDP, autocast,
    casting, a gradient scaler); elsewhere the loop calls them itself (about 0.1 ms a
    step saved)."""
    module = module.to(fabric.device)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise UsageError("the model has no trainable parameters (is it frozen?)")
    optimizer = CpuAdam(params, lr=lr, fused=_fusable(params))
    wrapped, fabric_optimizer = fabric.setup(module, optimizer)
    scaler = getattr(fabric.strategy.precision, "scaler", None) is not None
    if passthrough(fabric):
        return Setup(params, optimizer, module, torch.Tensor.backward, optimizer.step, scaler)
    return Setup(params, optimizer, wrapped, fabric.backward, fabric_optimizer.step, scaler)


def passthrough(fabric) -> bool:
    """Whether Fabric's module and optimizer wrappers only pass each call on: one device,
    full float32 precision (no autocast, no input casting, no gradient scaler, no
    gradient synchronisation)."""
    from lightning_fabric.plugins.precision import Precision
    from lightning_fabric.strategies import SingleDeviceStrategy

    strategy = fabric.strategy
    return type(strategy) is SingleDeviceStrategy and type(strategy.precision) is Precision


def _fusable(params: list[torch.Tensor]) -> bool:
    """Fused Adam (one kernel, and on-device skipping of bad steps) where torch has it."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
