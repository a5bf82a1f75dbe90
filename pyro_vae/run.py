"""The run: where, how long and how a model is trained, described once.

:class:`Run` holds every setting that is not the model's own objective: the devices
and processes (handed to Lightning Fabric as they are), the precision, the epochs,
the learning rate and its schedule, the seed, the checkpoint and whether to resume,
the loggers, progress bars and ``torch.compile``. Every trainer of the package
(:func:`pyro_vae.fit`, :func:`pyro_vae.ssvae.fit_ssvae`) takes one, the engine reads
it, and a run folder's ``config.json`` stores it, so a run can be replayed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .config import check_fields
from .errors import UsageError

#: Fabric precisions offered; the log-densities and KL stay float32 under the mixed ones.
PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed")
#: learning-rate schedules: "constant", or "cosine" (half a cosine from ``lr`` to 0 over
#: the run's steps, Loshchilov & Hutter 2017, without restarts).
LR_SCHEDULES = ("constant", "cosine")
#: the loggers that Fabric writes under ``log_dir``.
LOGGERS = ("csv", "tensorboard")


@dataclass(frozen=True)
class Run:
    """The settings of one training run, shared by every model the package trains.

    ``Run()`` is ten epochs at ``lr=1e-3`` in one process, on CUDA when a GPU is there
    and on the CPU otherwise. ``Run(accelerator="cpu", devices=2, strategy="ddp")``
    trains two processes on the CPU (gloo); ``Run(devices=4, num_nodes=2,
    strategy="ddp", precision="bf16-mixed")`` eight GPUs on two nodes.
    ``Run(accelerator="cuda:1")`` is shorthand for ``accelerator="cuda", devices=[1]``.
    """

    #: epochs in all; a resumed run goes on up to this number.
    epochs: int = 10
    #: Adam's learning rate (a resumed run continues at this rate, whatever it began with).
    lr: float = 1e-3
    #: "constant" or "cosine" (to 0 at the last step of ``epochs``).
    lr_schedule: str = "constant"
    #: seeds the shuffling and the noise of training; process ``r`` draws with ``seed + r``.
    seed: int = 0
    #: "auto" (CUDA when a GPU is there), "cpu", "cuda", "cuda:N", ... (Fabric's).
    accelerator: str = "auto"
    #: processes (devices) per node, "auto", -1 for all, or a list of device indices.
    devices: int | str | tuple[int, ...] = 1
    #: machines in the run.
    num_nodes: int = 1
    #: "auto", "ddp", "ddp_spawn", ... (Fabric's strategies).
    strategy: str = "auto"
    #: one of :data:`PRECISIONS`.
    precision: str = "32-true"
    #: file written after every epoch and on Ctrl-C, and resumed from (None: no file).
    checkpoint: str | None = None
    #: go on from ``checkpoint`` where it stopped, if it exists.
    resume: bool = False
    #: "csv" and/or "tensorboard", written under ``log_dir``.
    loggers: tuple[str, ...] = ()
    #: the folder of the loggers' files.
    log_dir: str | None = None
    #: progress bars (and a line per epoch) on the first process.
    progress: bool = True
    #: ``torch.compile`` the model's fused loss: True, or a mode ("reduce-overhead").
    compile: bool | str = False

    def __post_init__(self) -> None:
        _set = object.__setattr__  # frozen: normalise the fields once, here
        accelerator, devices = _split_device(self.accelerator, self.devices)
        _set(self, "accelerator", accelerator)
        _set(self, "devices", devices)
        for name in ("checkpoint", "log_dir"):
            value = getattr(self, name)
            _set(self, name, None if value is None else str(value))
        loggers = (self.loggers,) if isinstance(self.loggers, str) else self.loggers
        _set(self, "loggers", tuple(dict.fromkeys(loggers)))
        self._check()

    def _check(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise UsageError(f"epochs={self.epochs!r}: ask for at least 1 epoch")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise UsageError(f"lr={self.lr!r}: the learning rate must be a finite number > 0")
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("precision", self.precision, PRECISIONS)
        if self.num_nodes < 1:
            raise UsageError(f"num_nodes must be at least 1, got {self.num_nodes}")
        for name in self.loggers:
            _choice("logger", name, LOGGERS)
        if self.loggers and self.log_dir is None:
            raise UsageError(f"the loggers {list(self.loggers)} need a log_dir to write to")
        if self.resume and self.checkpoint is None:
            raise UsageError("resume=True needs a checkpoint to resume from")

    @property
    def resuming(self) -> bool:
        """Whether the run goes on from its checkpoint: asked to, and there is one."""
        return self.resume and self.checkpoint is not None and Path(self.checkpoint).exists()

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate of optimizer step ``step`` (from 0) of ``total_steps``."""
        if self.lr_schedule == "constant" or total_steps <= 1:
            return self.lr
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    def replace(self, **changes: Any) -> Run:
        """A copy with ``changes`` (a frozen dataclass cannot be edited in place)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON values: what a run folder's ``config.json`` stores."""
        out = asdict(self)
        out["loggers"] = list(self.loggers)
        if isinstance(self.devices, tuple):
            out["devices"] = list(self.devices)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> Run:
        """A run from :meth:`to_dict`'s output, naming any key this version does not know."""
        check_fields(cls, values)
        values = dict(values)
        if isinstance(values.get("devices"), list):
            values["devices"] = tuple(values["devices"])
        if "loggers" in values:
            values["loggers"] = tuple(values["loggers"])
        return cls(**values)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _split_device(accelerator: str, devices):
    """``accelerator="cuda:1"`` as ``("cuda", (1,))``; lists of indices as tuples."""
    if isinstance(devices, list):
        devices = tuple(devices)
    if not isinstance(accelerator, str) or ":" not in accelerator:
        return accelerator, devices
    try:
        device = torch.device(accelerator)
    except RuntimeError as error:
        raise UsageError(f"unknown device {accelerator!r}: {error}") from None
    if devices not in (1, "1"):
        raise UsageError(
            f"accelerator={accelerator!r} names one device, but devices={devices!r} asks for "
            "more; pass the accelerator type and a list of devices (e.g. devices=[0, 1])"
        )
    return device.type, (device.index,)
