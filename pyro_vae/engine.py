"""The one training loop of the package: ``train(objective, batches, run) -> History``.

Every model the package trains supplies an :class:`Objective` (a module whose forward
pass is the loss of one batch, its per-step schedules and its per-epoch metrics) and a
batch source (:mod:`pyro_vae.data`); the :class:`~pyro_vae.run.Run` says everything
else. The loop owns, each in the module its name promises:

- devices, processes, precision, the optimizer and Fabric's wrappers
  (:mod:`pyro_vae.devices`); under DDP the *objective's* module is wrapped, since
  Pyro's ELBO is not the forward call of the VAE;
- the running loss and the divergence check, with no host synchronisation per step on
  an accelerator (:mod:`pyro_vae.divergence`);
- progress, RNG states, resuming and the deferred Ctrl-C (:mod:`pyro_vae.checkpoint`).

Every process starts from the same weights (DDP broadcasts rank 0's), draws its own
noise (seed + rank) and trains on a disjoint shard of each epoch's shuffled order; the
plate is scaled to the whole data set, so DDP's average of the processes' gradients
is the whole-data gradient. Pyro's param store is kept in a private scope and its
per-step validation off (the data are checked before training). Rank 0 alone writes.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from torch import nn
from tqdm.auto import tqdm

from . import devices
from .checkpoint import DeferredInterrupt, Progress, restore_training, rng_states, save_checkpoint
from .divergence import SyncPolicy, Tally
from .errors import ProcessLostError
from .history import EpochRecord, History
from .run import Run


class Objective:
    """What a model gives the loop. Subclasses set the attributes and override the methods.

    :attr module: the ``nn.Module`` that DDP wraps; ``module(batch)`` returns the loss of
        a batch (the negative objective, summed over the batch and scaled to the whole
        data set), and its parameters with ``requires_grad`` are trained.
    :attr model: the model whose config and ``state_dict`` a checkpoint stores.
    """

    module: nn.Module
    model: nn.Module

    def prepare(self, rank: int, world: int, device: torch.device, dtype, steps: int) -> None:
        """Called in each process before training, once the device, the weights' dtype
        and the steps of one epoch (``steps``) are known: shard held-out data, size the
        schedules."""

    def before_step(self, step: int) -> None:
        """Set what changes with the step (KL weight, temperature) before step ``step``."""

    def metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor], step: int) -> dict:
        """The model's figures of the epoch that just ended, after ``step`` steps.

        :param reduce: sums a tensor over all processes (held-out data is sharded: each
            process evaluates its own part, the sums are combined).
        """
        return {}

    def checkpoint_extra(self) -> dict:
        """Entries a checkpoint stores besides the loop's own (e.g. an SSVAE's base)."""
        return {}

    def checkpoint_differences(self, state: dict) -> list[str]:
        """What differs between a checkpoint to resume and :meth:`checkpoint_extra` now, one
        line per entry (entries a checkpoint lacks are not compared)."""
        return [
            f"{key}: checkpoint has {state[key]!r}, asked for {value!r}"
            for key, value in self.checkpoint_extra().items()
            if key in state and state[key] != value
        ]

    def images(self) -> dict[str, torch.Tensor]:
        """Named ``(N, C, H, W)`` images in [0, 1] for image loggers, once an epoch."""
        return {}


class Batch:
    """A batch handed to the objective's module untouched.

    Under mixed precision, Fabric casts every floating-point tensor passed to a module
    to the half dtype. The networks run in half precision anyway (autocast), but the
    data must not: the likelihood scores the data as given, in full precision. So the
    loop passes each batch inside this holder, which Fabric leaves alone, and the module
    takes it out with :func:`unwrap`.
    """

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data


def unwrap(x):
    """The data of a :class:`Batch` (or ``x`` itself, when called directly)."""
    return x.data if isinstance(x, Batch) else x


def train(
    objective: Objective,
    batches,
    run: Run | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> History:
    """Train ``objective`` on ``batches`` as ``run`` says; return this process's history.

    With a strategy that spawns processes (``ddp_spawn``), training runs in the spawned
    processes and the trained weights are loaded back into ``objective.model`` here.

    :param on_epoch: called in the first process with each epoch's record, once its
        checkpoint is written (under ``ddp_spawn``, after training).
    """
    run = run or Run()
    fabric = devices.make_fabric(run, devices.make_loggers(run.loggers, run.log_dir))
    if devices.launched_by_cli():  # ``fabric run`` made the processes already
        return _train_process(fabric, objective, batches, run, on_epoch)
    if not devices.spawns(fabric):
        return fabric.launch(_train_process, objective, batches, run, on_epoch)
    # Spawned processes train copies of the model; the first one leaves its weights in a
    # file (a large result sent back through the launcher's queue can block it).
    fd, weights = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        # as a plain dict: the launcher rebuilds dataclass arguments field by field in each
        # spawned process, which a frozen dataclass refuses
        history = fabric.launch(_train_process, objective, batches, run.to_dict(), None, weights)
        objective.model.load_state_dict(torch.load(weights, weights_only=True))
    finally:
        Path(weights).unlink(missing_ok=True)
    for record in history.epochs if on_epoch is not None else ():
        on_epoch(record)
    return history


def _train_process(fabric, objective, batches, run: Run | dict, on_epoch, weights=None):
    """The loop of one process: epochs of steps, a record and a checkpoint after each."""
    run = Run.from_dict(run) if isinstance(run, dict) else run
    loop = _Loop(fabric, objective, batches, run)
    store = pyro.get_param_store()
    with store.scope(), pyro.validation_enabled(False), DeferredInterrupt() as interrupt:
        try:
            while loop.progress.epoch < run.epochs:
                loop.train_epoch(interrupt)
                record = loop.end_epoch()
                if on_epoch is not None and fabric.is_global_zero:
                    on_epoch(record)
        except RuntimeError as error:
            lost = _lost_process(error, fabric, run)
            if lost is None:
                raise
            raise lost from None
    objective.model.eval()
    if weights is not None and fabric.is_global_zero:
        state = objective.model.state_dict()
        torch.save({k: v.detach().cpu() for k, v in state.items()}, weights)
    return History(loop.records, device=str(fabric.device), rank=fabric.global_rank)


class _Loop:
    """One process's run: its set-up (devices, data, a resumed state) and its epochs."""

    def __init__(self, fabric, objective: Objective, batches, run: Run):
        self.fabric, self.objective, self.run = fabric, objective, run
        rank, world, device = fabric.global_rank, fabric.world_size, fabric.device
        pyro.set_rng_seed(run.seed + rank)  # the same weights everywhere, not the same noise
        _materialize(objective, batches)
        self.setup = devices.set_up(fabric, objective.module, run.lr)
        dtype = devices.weights_dtype(run, objective.module)
        fused = self.setup.optimizer.defaults.get("fused", False)
        self.policy = SyncPolicy.choose(world, device, self.setup.scaler, fused)
        self.tally: Tally | None = None
        # a streamed batch that fails its check must stop every process together
        bad = self._bad_data if world > 1 else None
        self.data = batches.prepare(rank, world, device, dtype, bad)
        objective.prepare(rank, world, device, dtype, len(self.data))
        self.progress, self.records = Progress(), []
        if run.resuming:
            self._resume()

    def _resume(self) -> None:
        rows, self.progress = restore_training(
            self.run.checkpoint, self.objective.model, self.setup.optimizer, self.run.lr,
            self.objective.checkpoint_differences, self.fabric,
        )  # fmt: skip
        self.records = [EpochRecord.from_row(row) for row in rows]
        if self.progress.epoch >= self.run.epochs:
            warnings.warn(
                f"{self.run.checkpoint} already holds {self.progress.epoch} epochs, so training "
                f"for {self.run.epochs} trained nothing; ask for more epochs to continue the run",
                stacklevel=5,
            )

    def train_epoch(self, interrupt: DeferredInterrupt) -> None:
        """The steps of one epoch (from where a resumed run stopped); a Ctrl-C saves a
        checkpoint at the next reading of the flags and stops."""
        run, progress, setup, data = self.run, self.progress, self.setup, self.data
        world, start = self.fabric.world_size, time.perf_counter()
        # (a resumed epoch's totals so far are shared out over the processes)
        self.tally = tally = Tally(
            self.policy, self.fabric.device, progress.loss_sum / world, progress.images / world
        )
        try:
            for x in self._bar():
                self.objective.before_step(progress.step)
                if run.lr_schedule != "constant":
                    self._set_lr(progress.step)
                loss = setup.forward(Batch(x))  # through Fabric where it acts (autocast, DDP)
                setup.backward(loss)
                tally.add(loss.detach(), _size(x), data.num_data, progress.step + 1, self._grads())
                stop = self._read_flags(interrupt)
                if self.policy.skip_on_device:
                    setup.optimizer.found_inf = tally.found_inf()  # skipped on the device
                setup.step()
                setup.optimizer.zero_grad(set_to_none=True)
                progress.batch += 1
                progress.step += 1
                if stop:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            progress.seconds += time.perf_counter() - start
            self.save(tally)
            raise
        progress.seconds += time.perf_counter() - start

    def _bar(self):
        epoch, total = self.progress.epoch, len(self.data)
        self.bar = tqdm(
            self.data.epoch(epoch, self.progress.batch),
            total=total,
            initial=self.progress.batch,
            desc=f"epoch {epoch + 1}/{self.run.epochs}",
            disable=not (self.run.progress and self.fabric.is_global_zero),
            leave=False,
        )
        return self.bar

    def _read_flags(self, interrupt: DeferredInterrupt) -> bool:
        """Read the flags when due, before the step is applied; whether to stop."""
        progress, tally = self.progress, self.tally
        if not tally.due(progress.step + 1, progress.batch + 1 == len(self.data)):
            return False
        reduce = self._all_max if self.fabric.world_size > 1 else None
        stop = tally.check(interrupt.requested, reduce)
        if self.run.progress and self.fabric.is_global_zero and (progress.batch + 1) % 10 == 0:
            self.bar.set_postfix(loss=f"{tally.running():.2f}")
        return stop

    def _grads(self) -> list[torch.Tensor] | None:
        """The averaged gradient, where it is checked: the same in every process, checking
        it keeps them in step when one process's loss alone went bad."""
        if not self.policy.check_gradient:
            return None
        return [p.grad for p in self.setup.params if p.grad is not None]

    def _set_lr(self, step: int) -> None:
        lr = self.run.lr_at(step, self.run.epochs * len(self.data))
        for group in self.setup.optimizer.param_groups:
            group["lr"] = lr

    def end_epoch(self) -> EpochRecord:
        """The epoch's record (held-out metrics included), logged, and a checkpoint."""
        progress, objective = self.progress, self.objective
        totals = self.reduce(self.tally.totals(self.fabric.device))
        objective.model.eval()
        metrics = objective.metrics(self.reduce, progress.step)
        objective.model.train()
        record = EpochRecord(
            epoch=progress.epoch + 1,
            step=progress.step,
            train_loss=(totals[0] / totals[1].clamp(min=1)).item(),
            seconds=progress.seconds,
            lr=self.setup.optimizer.param_groups[0]["lr"],
            metrics=metrics,
        )
        self.records.append(record)
        if self.fabric.is_global_zero and self.run.progress:
            tqdm.write(record.summary(self.run.epochs))
        _log(self.fabric, objective, record)
        progress.next_epoch()
        self.tally = None
        self.save()
        return record

    def save(self, tally: Tally | None = None) -> None:
        """Write the checkpoint (rank 0), mid-epoch with ``tally``'s totals so far; a
        collective, so every process calls it."""
        if self.run.checkpoint is None:
            return
        fabric, progress = self.fabric, self.progress
        states = rng_states(fabric)
        if tally is not None:
            totals = self.reduce(tally.totals(fabric.device))
            progress.loss_sum, progress.images = totals[0].item(), int(totals[1].item())
        if fabric.is_global_zero:
            save_checkpoint(
                self.run.checkpoint,
                self.objective.model,
                optimizer=self.setup.optimizer.state_dict(),
                progress=vars(progress).copy(),
                history=[record.to_row() for record in self.records],
                rng=states,
                world_size=fabric.world_size,
                **self.objective.checkpoint_extra(),
            )
        if fabric.world_size > 1:
            fabric.barrier()

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over all processes."""
        if self.fabric.world_size == 1:
            return tensor
        return self.fabric.all_reduce(tensor, reduce_op="sum")

    def _all_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.fabric.all_reduce(tensor, reduce_op="max")

    def _bad_data(self, error, batch: torch.Tensor) -> torch.Tensor:
        return self.tally.bad_data(error, batch)


def _size(x) -> int:
    """The data points of a batch: a tensor, or a tuple whose first element is the batch
    the plate runs over (the unlabelled images of a semi-supervised step)."""
    return (x[0] if isinstance(x, (tuple, list)) else x).shape[0]


def _materialize(objective: Objective, batches) -> None:
    """Run one batch through the objective if a layer still has lazy (uninitialized)
    parameters: DDP must see every parameter before it wraps the module."""
    lazy = nn.parameter.UninitializedParameter
    if any(isinstance(p, lazy) for p in objective.module.parameters()):
        with torch.no_grad():
            first = next(iter(batches.prepare(0, 1, "cpu").epoch(0)))
            objective.module(Batch(first))


#: what gloo and NCCL say when the process at the other end of a connection is gone.
_LOST = ("connection reset by peer", "connection closed by peer", "broken pipe", "timed out")


def _lost_process(error: RuntimeError, fabric, run: Run) -> ProcessLostError | None:
    """A one-line :class:`ProcessLostError` for a collective that failed because another
    process died (``kill -9``, out of memory), else None."""
    import torch.distributed as dist

    text = str(error).strip()
    lost = isinstance(error, getattr(dist, "DistBackendError", ())) or any(
        sign in text.lower() for sign in _LOST
    )
    if fabric.world_size == 1 or not lost:
        return None
    where = (
        f"the last checkpoint is {run.checkpoint}; resume from it (--resume, or "
        "Run(resume=True)) with the same number of processes"
        if run.checkpoint is not None and Path(run.checkpoint).exists()
        else "no checkpoint was written yet"
    )
    reason = text.splitlines()[0][:160] if text else type(error).__name__
    return ProcessLostError(
        f"process {fabric.global_rank} lost contact with another process of the run "
        f"({reason}); {where}"
    )


def _log(fabric, objective: Objective, record: EpochRecord) -> None:
    """Scalars of the record to every logger; images to those that take them (rank 0)."""
    if not fabric.loggers:
        return
    scalars = {
        name: value
        for name, value in record.to_row().items()
        if name != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    fabric.log_dict(scalars, step=record.epoch)
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
                logger.experiment.add_image(name, grid, global_step=record.epoch)
    for logger in fabric.loggers:
        logger.save()
