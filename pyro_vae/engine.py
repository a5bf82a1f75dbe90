"""The one training loop of the package, on Lightning Fabric: from a laptop CPU to many
GPUs on many nodes.

Every model the package trains supplies an :class:`Objective`: a module whose forward
pass is the loss of one batch (the negative ELBO, scaled to the whole data set), a
batch source, its per-step schedules and its per-epoch metric. :func:`train` owns the
rest, once for all of them:

- devices, processes, precision and loggers, through :class:`lightning_fabric.Fabric`
  (``accelerator``, ``devices``, ``num_nodes``, ``strategy``, ``precision`` pass straight
  to it); under DDP the *objective's* module is wrapped, since Pyro's ELBO is not the
  forward call of the VAE;
- one Adam optimizer over the trainable parameters, Pyro's param store in a private scope
  and its per-step validation off (the data are checked before training);
- every process starting from the same weights (DDP broadcasts rank 0's), drawing its own
  noise (seed + rank), and training on a disjoint shard of each epoch's shuffled order;
  the plate is scaled to the whole data set, so DDP's average of the processes'
  gradients is the whole-data gradient;
- no host synchronisation per step on an accelerator: the loss is accumulated on the
  device and read every few steps, and a step whose loss (or, across processes, whose
  averaged gradient) is not finite is skipped on the device by the optimizer itself, as
  is every later one until the next read stops the run with the first bad step named;
- a deferred Ctrl-C, agreed on by all processes; checkpoints with weights, optimizer,
  progress and every process's RNG state, written atomically by rank 0 alone; resuming.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import check_config, load_checkpoint, save_checkpoint
from .errors import CheckpointError, DataError, TrainingDivergedError, UsageError

#: steps between two reads of the device's loss and flags, where a step that is not read
#: at once can be skipped on the device (see _train_process); else every step is read.
SYNC_EVERY = 50

#: Fabric precisions offered; the log-densities and KL stay float32 under the mixed ones.
PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed")


@dataclass(frozen=True)
class Devices:
    """Where and how to train; each field goes to :class:`lightning_fabric.Fabric` as it is.

    ``Devices()`` is one process on CUDA when a GPU is there, else on the CPU.
    ``Devices(accelerator="cpu", devices=2, strategy="ddp")`` trains two processes on
    the CPU (gloo); ``Devices(devices=4, num_nodes=2, strategy="ddp",
    precision="bf16-mixed")`` eight GPUs on two nodes.
    """

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(
                f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}"
            )
        if self.num_nodes < 1:
            raise UsageError(f"num_nodes must be at least 1, got {self.num_nodes}")


class Objective:
    """What a model gives the loop. Subclasses set the attributes and override the methods.

    :attr module: the ``nn.Module`` that DDP wraps; ``module(x)`` returns the loss of
        batch ``x`` (the negative objective, summed over the batch and scaled to the
        whole data set), and its parameters with ``requires_grad`` are trained.
    :attr model: the model whose config and ``state_dict`` a checkpoint stores.
    :attr batches: the batch source (:mod:`pyro_vae.data`), unsharded and on the CPU.
    :attr record_type: the dataclass of one epoch's record.
    """

    module: nn.Module
    model: nn.Module
    batches: Any
    record_type: type

    def setup(self, device: torch.device, rank: int, world: int, epochs: int) -> None:
        """Called in each process once the device is known, before training, after the
        loop has sharded :attr:`batches` and moved them to the device."""

    def use_dtype(self, dtype: torch.dtype) -> None:
        """Called once Fabric has set up the weights (``"64-true"`` makes them float64):
        data must reach the model in ``dtype``. Subclasses cast their held-out data too."""
        self.batches.dtype = dtype

    def before_step(self, step: int) -> None:
        """Set what changes with the step (KL weight, temperature) before step ``step``."""

    def record(self, reduce: Callable[[torch.Tensor], torch.Tensor], progress: dict) -> Any:
        """The record of the epoch that just ended, held-out metric included.

        :param reduce: sums a tensor over all processes (held-out data is sharded: each
            process evaluates its own part, the sums are combined).
        :param progress: ``epoch``, ``step``, ``train_loss``, ``seconds``, ``lr``.
        """
        raise NotImplementedError

    def checkpoint_extra(self) -> dict:
        """Entries a checkpoint stores besides the loop's own (e.g. an SSVAE's base)."""
        return {}

    def images(self) -> dict[str, torch.Tensor]:
        """Named ``(N, C, H, W)`` images in [0, 1] for image loggers, once an epoch."""
        return {}

    def checkpoint_differences(self, state: dict) -> list[str]:
        """What differs between a checkpoint to resume and :meth:`checkpoint_extra` now, one
        line per entry (entries a checkpoint lacks are not compared)."""
        return [
            f"{key}: checkpoint has {state[key]!r}, asked for {value!r}"
            for key, value in self.checkpoint_extra().items()
            if key in state and state[key] != value
        ]


class Batch:
    """A batch handed to the objective's module untouched.

    Under mixed precision, Fabric casts every floating-point tensor passed to a module
    to the half dtype. The networks run in half precision anyway (autocast), but the
    data must not: the likelihood scores the data as given, in full precision. So the
    loop passes each batch inside this holder, which Fabric leaves alone, and the module
    takes it out with :func:`unwrap`.
    """

    __slots__ = ("data",)

    def __init__(self, data: torch.Tensor):
        self.data = data


def unwrap(x: torch.Tensor | Batch) -> torch.Tensor:
    """The tensor of a :class:`Batch` (or ``x`` itself, when called directly)."""
    return x.data if isinstance(x, Batch) else x


@dataclass
class Settings:
    """The loop's options that are not the objective's."""

    epochs: int
    lr: float
    seed: int = 0
    checkpoint: str | Path | None = None
    resume: bool = False
    progress: bool = True

    @property
    def resuming(self) -> bool:
        """Whether the run goes on from its checkpoint: asked to, and there is one."""
        return self.resume and self.checkpoint is not None and Path(self.checkpoint).exists()


def make_devices(
    device: str | torch.device | None,
    accelerator: str = "auto",
    devices: int | str | list[int] = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str = "32-true",
) -> Devices:
    """:class:`Devices` from the training functions' arguments, where ``device`` ("cpu",
    "cuda", "cuda:1") is shorthand for Fabric's ``accelerator`` (and device index)."""
    if device not in (None, "auto"):
        accelerator, devices = _from_device(device, devices)
    return Devices(accelerator, devices, num_nodes, strategy, precision)


def _from_device(device, devices):
    device = resolve_device(device)
    if device.index is not None and devices != 1:
        raise UsageError(
            f"device={str(device)!r} names one device, but devices={devices!r} asks for more; "
            "pass accelerator and devices (e.g. devices=[0, 1]) instead"
        )
    return device.type, [device.index] if device.index is not None else devices


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


def fabric_for(devices: Devices, loggers: list | None = None):
    """A :class:`lightning_fabric.Fabric` for ``devices``, with Fabric's own errors about
    impossible combinations turned into a :class:`UsageError` that names them."""
    from lightning_fabric import Fabric
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        return Fabric(
            accelerator=devices.accelerator,
            devices=devices.devices,
            num_nodes=devices.num_nodes,
            strategy=devices.strategy,
            precision=devices.precision,
            loggers=loggers,
        )
    except (MisconfigurationException, ValueError, RuntimeError, TypeError) as error:
        raise UsageError(f"cannot train on {devices}: {error}") from None


def train(
    objective: Objective,
    settings: Settings,
    devices: Devices,
    loggers: list | None = None,
    on_epoch: Callable[[Any], None] | None = None,
) -> tuple[list, int]:
    """Train ``objective`` and return (the records of every epoch, this process's rank).

    With a strategy that spawns processes (``ddp_spawn``), training runs in the spawned
    processes and the trained weights are loaded back into ``objective.model`` here.
    """
    fabric = fabric_for(devices, loggers)
    if _launched_by_cli():  # ``fabric run`` made the processes; launching again is an error
        return _train_process(fabric, objective, settings, on_epoch)
    if not _spawns(fabric):
        return fabric.launch(_train_process, objective, settings, on_epoch)
    # Spawned processes train copies of the model; the first one leaves its weights in a
    # file (a large result sent back through the launcher's queue can block it) and they
    # are loaded here. on_epoch runs here too, once training is over.
    fd, weights = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        records, rank = fabric.launch(_train_process, objective, settings, None, weights)
        objective.model.load_state_dict(torch.load(weights, weights_only=True))
    finally:
        Path(weights).unlink(missing_ok=True)
    if on_epoch is not None:
        for record in records:
            on_epoch(record)
    return records, rank


def _spawns(fabric) -> bool:
    from lightning_fabric.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(getattr(fabric.strategy, "launcher", None), _MultiProcessingLauncher)


def _launched_by_cli() -> bool:
    # ``fabric run`` creates the processes itself and forbids launching again
    return os.environ.get("LT_CLI_USED", "0") == "1"


def _train_process(
    fabric, objective: Objective, settings: Settings, on_epoch, weights: str | None = None
) -> tuple[list, int]:
    rank, world = fabric.global_rank, fabric.world_size
    device = fabric.device
    pyro.set_rng_seed(settings.seed + rank)  # the same weights everywhere, not the same noise
    # this process's shard of every epoch, delivered on its device
    objective.batches.shard(rank, world)
    objective.batches.to(device)
    objective.setup(device, rank, world, settings.epochs)
    module = objective.module.to(device)
    _materialize(objective)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise UsageError("the model has no trainable parameters (is it frozen?)")
    optimizer = _Adam(params, lr=settings.lr, fused=_fusable(params))
    wrapped, fabric_optimizer = fabric.setup(module, optimizer)
    if _passthrough(fabric):
        # Fabric's wrappers would only forward each call: skip them (about 0.1 ms a step)
        forward, backward, step = module, torch.Tensor.backward, optimizer.step
    else:
        forward, backward, step = wrapped, fabric.backward, fabric_optimizer.step
    # data in the dtype the precision gave the weights (float64 under "64-true")
    objective.use_dtype(params[0].dtype)
    run, records = _Progress(), []
    if settings.resuming:
        records, run = _restore(objective, optimizer, settings, device, rank, world)
        if run.epoch >= settings.epochs:
            warnings.warn(
                f"{settings.checkpoint} already holds {run.epoch} epochs, so training for "
                f"{settings.epochs} trained nothing; ask for more epochs to continue the run",
                stacklevel=4,
            )
    batches = objective.batches
    num_data = batches.num_data
    main = fabric.is_global_zero
    scaler_skips = _uses_scaler(fabric)
    # one process on the CPU reads each step's loss at once (it costs nothing there)
    host = world == 1 and device.type == "cpu" and not scaler_skips
    # elsewhere, between two reads of the flags, bad steps are skipped on the device: by
    # fused Adam (found_inf) or by the gradient scaler (16-mixed); an optimizer that can
    # do neither has its flags read every step, before the step
    skips_on_device = not host and optimizer.defaults.get("fused", False) and not scaler_skips
    sync_every = SYNC_EVERY if skips_on_device or scaler_skips else 1

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        return fabric.all_reduce(tensor, reduce_op="sum") if world > 1 else tensor

    def save(tally: _HostTally | _DeviceTally | None = None) -> None:
        if settings.checkpoint is None:
            return
        # collectives: every process takes part
        state = _rng_states(fabric, world)
        if tally is not None:  # mid-epoch: the epoch's totals over all processes
            totals = reduce(tally.totals(device))
            run.loss_sum, run.images = totals[0].item(), int(totals[1].item())
        if main:
            save_checkpoint(
                settings.checkpoint,
                objective.model,
                optimizer=optimizer.state_dict(),
                progress=asdict(run),
                history=[asdict(record) for record in records],
                rng=state,
                world_size=world,
                **objective.checkpoint_extra(),
            )
        if world > 1:
            fabric.barrier()

    store = pyro.get_param_store()
    with store.scope(), pyro.validation_enabled(False), _DeferredInterrupt() as interrupt:
        start = time.perf_counter()
        tally = None
        try:
            while run.epoch < settings.epochs:
                start = time.perf_counter()
                # (a resumed epoch's totals so far are shared out over the processes)
                if host:
                    tally = _HostTally(run.loss_sum, run.images)
                else:
                    tally = _DeviceTally(device, run.loss_sum / world, run.images / world)
                if world > 1:
                    # a streamed batch that fails its data check must stop every process
                    # together, at the next reading of the flags, not this one alone
                    batches.on_bad_data = tally.bad_data
                bar = tqdm(
                    batches.epoch(run.epoch, run.batch),
                    total=len(batches),
                    initial=run.batch,
                    desc=f"epoch {run.epoch + 1}/{settings.epochs}",
                    disable=not (settings.progress and main),
                    leave=False,
                )
                for x in bar:
                    objective.before_step(run.step)
                    loss = forward(Batch(x))  # through Fabric where it acts (autocast, DDP)
                    backward(loss)
                    grads = None
                    if world > 1 and not scaler_skips:
                        # the averaged gradient is the same in every process: checking it
                        # keeps them in step when one process's loss alone went bad
                        grads = [p.grad for p in params if p.grad is not None]
                    tally.add(loss.detach(), x.shape[0], num_data, run.step + 1, grads)
                    stop = False
                    # read the flags now and then, before the step is applied
                    if (run.step + 1) % sync_every == 0 or run.batch + 1 == len(batches):
                        stop = tally.check(interrupt.requested, fabric if world > 1 else None)
                        if main and settings.progress and (run.batch + 1) % 10 == 0:
                            bar.set_postfix(loss=f"{tally.running():.2f}")
                    if skips_on_device:
                        optimizer.found_inf = tally.found_inf()  # skipped on the device
                    step()
                    optimizer.zero_grad(set_to_none=True)
                    run.batch += 1
                    run.step += 1
                    if stop:
                        raise KeyboardInterrupt
                run.seconds += time.perf_counter() - start
                totals = reduce(tally.totals(device))
                progress = {
                    "epoch": run.epoch + 1,
                    "step": run.step,
                    "train_loss": (totals[0] / totals[1].clamp(min=1)).item(),
                    "seconds": run.seconds,
                    "lr": settings.lr,
                }
                objective.model.eval()
                record = objective.record(reduce, progress)
                objective.model.train()
                records.append(record)
                if main and settings.progress:
                    tqdm.write(_summary(record, settings.epochs))
                _log(fabric, objective, record, run.epoch + 1)
                run.next_epoch()
                tally = None
                save()
                if on_epoch is not None and main:
                    on_epoch(record)
        except KeyboardInterrupt:
            run.seconds += time.perf_counter() - start
            save(tally)
            raise
        finally:
            batches.on_bad_data = None  # the tally's, for this run only
    objective.model.eval()
    if weights is not None and main:
        torch.save({k: v.detach().cpu() for k, v in objective.model.state_dict().items()}, weights)
    return records, rank


class _HostTally:
    """The epoch's running loss and the divergence check for one process on the CPU,
    where reading the loss costs nothing: each step's loss is read and checked at once."""

    def __init__(self, loss_sum: float, images: float):
        self.loss_sum, self.images = loss_sum, images
        self.bad: tuple[int, float] | None = None

    def add(self, loss: torch.Tensor, images: int, num_data: int, step: int, grads=None) -> None:
        """Record step ``step``'s loss of ``images`` images, scaled to ``num_data``."""
        value = loss.item()
        if not math.isfinite(value):
            self.bad = self.bad or (step, value)
            return
        self.loss_sum += value * images / num_data  # the batch's sum of per-image losses
        self.images += images

    def check(self, interrupted: bool, fabric=None) -> bool:
        """Raise if a step went bad; say whether Ctrl-C asks to stop."""
        if self.bad is not None:
            raise TrainingDivergedError(*self.bad)
        return interrupted

    def running(self) -> float:
        return self.loss_sum / max(self.images, 1)

    def totals(self, device: torch.device) -> torch.Tensor:
        """(sum of per-image losses, images) of the epoch so far, as a tensor."""
        return torch.tensor([self.loss_sum, self.images], dtype=torch.float64, device=device)


class _DeviceTally:
    """The same, kept on the device, for accelerators and for several processes: no host
    synchronisation per step. A sticky flag marks the first non-finite step, whose number
    and loss are kept; :meth:`found_inf` lets fused Adam skip that step and every later
    one on the device, until :meth:`check` reads the flags (agreed on by all processes)."""

    def __init__(self, device: torch.device, loss_sum: float, images: float):
        zero = torch.zeros((), device=device)
        self.zero = zero
        self.loss_sum, self.images = zero + loss_sum, zero + images
        self.halted, self.first_bad = zero.clone(), zero + math.inf
        self.bad_loss = zero - math.inf  # below any process's loss, for the max across them
        self.data_flag, self.data_error = zero.clone(), None

    def add(self, loss: torch.Tensor, images: int, num_data: int, step: int, grads=None) -> None:
        loss = loss.float()
        bad = ~torch.isfinite(loss)
        if grads is not None:
            bad = bad | ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
        first = bad & (self.halted == 0)
        self.first_bad = torch.where(first, float(step), self.first_bad)
        # the first bad step's loss, or +inf for "the loss itself was not finite"
        self.bad_loss = torch.where(first, torch.where(torch.isfinite(loss), loss, math.inf),
                                    self.bad_loss)  # fmt: skip
        self.halted = torch.maximum(self.halted, bad.float())
        per_image = torch.where(self.halted > 0, 0.0, loss) * (images / num_data)
        self.loss_sum = self.loss_sum + per_image
        self.images = self.images + images

    def bad_data(self, error: DataError, batch: torch.Tensor) -> torch.Tensor:
        """Keep a batch's data error for :meth:`check`, which raises it in every process.

        Until then this process goes on taking its steps, as the others wait for it in
        each step's gradient exchange, with a batch of NaN in place of the bad one: its
        gradient, averaged into every process, is not finite, so every process skips
        its step (fused Adam's ``found_inf``, or the gradient scaler under 16-mixed) and
        the weights stay those from before the bad batch."""
        self.data_error = self.data_error or error
        self.data_flag.fill_(1.0)
        self.halted.fill_(1.0)
        return torch.full_like(batch, math.nan)

    def check(self, interrupted: bool, fabric=None) -> bool:
        # every process reaches the same verdict and message: the earliest bad step, and
        # whether any process's loss (not only the averaged gradient) was not finite
        flags = torch.stack(
            [self.halted, -self.first_bad, self.zero + interrupted, self.bad_loss, self.data_flag]
        )
        if fabric is not None:
            flags = fabric.all_reduce(flags, reduce_op="max")
        if flags[4] > 0:
            raise self.data_error or DataError(
                "another process drew a batch that fails the data check (its message says "
                "why); check a streamed floating-point data set before a multi-process run"
            )
        if flags[0] > 0:
            loss = flags[3].item()
            if math.isinf(loss):
                raise TrainingDivergedError(int(-flags[1]), float("nan"))
            raise TrainingDivergedError(int(-flags[1]), loss, gradient=True)
        return bool(flags[2] > 0)

    def running(self) -> float:
        return (self.loss_sum / self.images.clamp(min=1)).item()

    def found_inf(self) -> torch.Tensor:
        return self.halted

    def totals(self, device: torch.device) -> torch.Tensor:
        return torch.stack([self.loss_sum, self.images]).double()


def _passthrough(fabric) -> bool:
    """Whether Fabric's module and optimizer wrappers only pass each call on: one device,
    full float32 precision (no autocast, no input casting, no gradient scaler, no
    gradient synchronisation). The loop then calls the module and optimizer itself."""
    from lightning_fabric.plugins.precision import Precision
    from lightning_fabric.strategies import SingleDeviceStrategy

    strategy = fabric.strategy
    return type(strategy) is SingleDeviceStrategy and type(strategy.precision) is Precision


def _uses_scaler(fabric) -> bool:
    """Whether a gradient scaler (16-mixed) skips non-finite steps itself: then the loop
    must not, as overflowing steps are how the scaler finds its scale."""
    return getattr(fabric.strategy.precision, "scaler", None) is not None


class _Adam(torch.optim.Adam):
    """torch's Adam, without its per-step check for CUDA-graph capture when every parameter
    is on the CPU, where no step can be captured.

    That check asks ``torch.cuda.is_available()`` on every step. Importing Lightning sets
    ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (so that asking does not initialise CUDA before a
    fork), and with it, on a machine whose torch is built for CUDA but that trains on the
    CPU, each question loads and initialises NVML: about 0.3 ms, some 3% of an MNIST step
    (``docs/benchmarks.md``). On a GPU the answer is cached and the check runs as usual.
    """

    def __init__(self, params, **options):
        super().__init__(params, **options)
        self._all_on_cpu = all(
            p.device.type == "cpu" for group in self.param_groups for p in group["params"]
        )

    def _accelerator_graph_capture_health_check(self) -> None:
        if not self._all_on_cpu:
            super()._accelerator_graph_capture_health_check()

    def _cuda_graph_capture_health_check(self) -> None:  # its name before torch 2.11
        if not self._all_on_cpu:
            super()._cuda_graph_capture_health_check()


def _fusable(params: list[torch.Tensor]) -> bool:
    """Fused Adam (one kernel, and on-device skipping of bad steps) where torch has it."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def _materialize(objective: Objective) -> None:
    """Run one batch through the objective if a layer still has lazy (uninitialized)
    parameters: DDP must see every parameter before it wraps the module."""
    lazy = nn.parameter.UninitializedParameter
    if any(isinstance(p, lazy) for p in objective.module.parameters()):
        with torch.no_grad():
            objective.module(Batch(next(iter(objective.batches.epoch(0)))))


def epoch_line(record, epochs: int, held_out: str = "") -> str:
    """One line for a log: ``epoch e/E  train loss L<held_out>  (s s)``, where ``held_out``
    is a record's own held-out figure (e.g. ``"  test ELBO -98.20"``) or nothing."""
    return (
        f"epoch {record.epoch}/{epochs}  train loss {record.train_loss:.2f}{held_out}"
        f"  ({record.seconds:.1f} s)"
    )


def _summary(record, epochs: int) -> str:
    if hasattr(record, "summary"):
        return record.summary(epochs)
    return epoch_line(record, epochs)


def _log(fabric, objective: Objective, record, step: int) -> None:
    """Scalars of the record to every logger; images to those that take them (rank 0)."""
    if not fabric.loggers:
        return
    scalars = {
        f.name: getattr(record, f.name)
        for f in fields(record)
        if f.name != "epoch" and isinstance(getattr(record, f.name), (int, float))
    }
    fabric.log_dict(scalars, step=step)
    if not fabric.is_global_zero:
        return
    takers = [logger for logger in fabric.loggers if type(logger).__name__ == "TensorBoardLogger"]
    images = objective.images() if takers else {}
    if images:
        from torchvision.utils import make_grid

        grids = {
            name: make_grid(batch.detach().float().cpu().clamp(0, 1), nrow=8, pad_value=1)
            for name, batch in images.items()
        }
        for logger in takers:
            for name, grid in grids.items():
                logger.experiment.add_image(name, grid, global_step=step)
    for logger in fabric.loggers:
        logger.save()


def _rng_states(fabric, world: int) -> dict:
    """Every process's torch (and CUDA) RNG state, gathered so rank 0 can store them."""
    states = {"torch": _gather(torch.get_rng_state(), fabric, world)}
    if fabric.device.type == "cuda":
        states["cuda"] = _gather(torch.cuda.get_rng_state(fabric.device), fabric, world)
    return states


def _gather(state: torch.Tensor, fabric, world: int) -> list[torch.Tensor]:
    """One CPU tensor of every process, in rank order."""
    if world == 1:
        return [state]
    import torch.distributed as dist

    own = state.to(fabric.device)
    everyone = [torch.empty_like(own) for _ in range(world)]
    dist.all_gather(everyone, own)
    return [s.cpu() for s in everyone]


def _restore(objective: Objective, optimizer, settings: Settings, device, rank: int, world: int):
    state = load_checkpoint(settings.checkpoint, map_location=device)
    check_config(state["config"], objective.model.config, settings.checkpoint)
    # what else defines the model (an SSVAE's classes, base VAE and code dimensions)
    diffs = objective.checkpoint_differences(state)
    if diffs:
        raise CheckpointError(
            f"{settings.checkpoint} was written for another model ({'; '.join(diffs)}); "
            "resume with the same settings, or train into a new checkpoint"
        )
    saved_world = int(state.get("world_size", 1))
    if saved_world != world:
        raise CheckpointError(
            f"{settings.checkpoint} was written by a run of {saved_world} process(es); resume "
            f"it with the same number (devices x num_nodes), not {world}"
        )
    objective.model.load_state_dict(state["model"])
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
        # Adam's moments carry over, but the rate is the one asked for now (the saved one
        # would silently override it): a run can go on at a lower rate, a step decay
        for group in optimizer.param_groups:
            group["lr"] = settings.lr
    rng = state.get("rng", {})
    torch_states = rng.get("torch")
    if isinstance(torch_states, torch.Tensor):  # written before the states were per process
        torch_states = [torch_states]
    if torch_states:
        torch.set_rng_state(torch_states[rank].cpu())
    cuda_states = rng.get("cuda")
    if cuda_states and device.type == "cuda":
        own = cuda_states[rank] if len(cuda_states) == world else cuda_states[0]
        torch.cuda.set_rng_state(own.cpu(), device)
    records = [objective.record_type(**row) for row in state.get("history", [])]
    progress = {k: v for k, v in state.get("progress", {}).items() if k in _PROGRESS_FIELDS}
    return records, _Progress(**progress)


class _DeferredInterrupt:
    """Turns the first Ctrl-C into a request that the loop honours between two steps
    (every process at the same step), so the checkpoint written on interruption holds a
    consistent state. A second Ctrl-C stops at once. Outside the main thread, where
    handlers cannot be set, Ctrl-C acts as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class _Progress:
    """Where a run stands; stored in checkpoints so a resumed run picks up mid-epoch."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    #: the sum of per-image losses over the epoch so far, and the images, over all processes
    loss_sum: float = 0.0
    images: int = 0
    seconds: float = 0.0

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch, self.loss_sum, self.images, self.seconds = 0, 0.0, 0, 0.0


_PROGRESS_FIELDS = {f.name for f in fields(_Progress)}
