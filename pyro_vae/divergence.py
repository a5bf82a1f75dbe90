"""The epoch's running loss, and the check that training has not diverged.

Reading a loss on the host costs nothing for one process on the CPU, but on an
accelerator it stalls the device, and across processes it is a collective. So the
:class:`Tally` follows a :class:`SyncPolicy`:

- one CPU process reads each step's loss at once and stops at the first bad one;
- elsewhere the loss is summed on the device, a sticky flag marks the first step
  whose loss (or, across processes, whose averaged gradient) is not finite, fused
  Adam (``found_inf``) or the 16-mixed gradient scaler skips that step and every
  later one on the device, and the flags are read every :data:`SYNC_EVERY` steps
  (every step when the optimizer cannot skip on the device), agreed on by every
  process, so all of them stop at the same step with the same message.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import DataError, TrainingDivergedError

#: steps between two reads of the flags, where bad steps are skipped on the device.
SYNC_EVERY = 50


@dataclass(frozen=True)
class SyncPolicy:
    """When the loop reads the loss and the flags, and who skips a bad step."""

    #: read each step's loss on the host at once (one process on the CPU).
    host: bool
    #: steps between two reads of the flags.
    every: int
    #: the optimizer skips bad steps on the device between reads (fused Adam's found_inf).
    skip_on_device: bool
    #: also check the averaged gradient (several processes, no gradient scaler).
    check_gradient: bool
    #: several processes: the verdict is agreed on by all of them.
    world: int = 1

    @classmethod
    def choose(cls, world: int, device: torch.device, scaler: bool, fused: bool) -> SyncPolicy:
        """The cheapest policy that still stops every process at the first bad step."""
        host = world == 1 and device.type == "cpu" and not scaler
        skip = not host and fused and not scaler
        every = SYNC_EVERY if skip or scaler else 1
        return cls(host, every, skip, world > 1 and not scaler, world)


class Tally:
    """The running loss of one epoch in one process, and the divergence flags.

    :param loss_sum: the sum of per-image losses so far (a resumed epoch's share).
    :param images: the images seen so far.
    """

    def __init__(self, policy: SyncPolicy, device: torch.device, loss_sum: float, images: float):
        self.policy = policy
        self.bad: tuple[int, float] | None = None  # host: (first bad step, its loss)
        self.data_error: DataError | None = None
        if policy.host:
            self.loss_sum, self.images = loss_sum, images
            return
        zero = torch.zeros((), device=device)
        self.zero = zero
        self.loss_sum, self.images = zero + loss_sum, zero + images
        self.halted, self.first_bad = zero.clone(), zero + math.inf
        self.bad_loss = zero - math.inf  # below any process's loss, for the max across them
        self.data_flag = zero.clone()

    def add(self, loss: torch.Tensor, images: int, num_data: int, step: int, grads=None) -> None:
        """Record step ``step``'s loss of ``images`` images, scaled to ``num_data``."""
        if self.policy.host:
            value = loss.item()
            if not math.isfinite(value):
                self.bad = self.bad or (step, value)
                return
            self.loss_sum += value * images / num_data  # the batch's sum of per-image losses
            self.images += images
            return
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
        its step and the weights stay those from before the bad batch."""
        self.data_error = self.data_error or error
        self.data_flag.fill_(1.0)
        self.halted.fill_(1.0)
        return torch.full_like(batch, math.nan)

    def due(self, step: int, last_of_epoch: bool) -> bool:
        """Whether the flags are read after step ``step`` (counted from 1)."""
        return step % self.policy.every == 0 or last_of_epoch

    def check(
        self, interrupted: bool, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> bool:
        """Raise if a step went bad (in any process); say whether Ctrl-C asks to stop.

        :param all_reduce: the max over processes (None for one process).
        """
        if self.policy.host:
            if self.bad is not None:
                raise TrainingDivergedError(*self.bad)
            return interrupted
        # every process reaches the same verdict and message: the earliest bad step, and
        # whether any process's loss (not only the averaged gradient) was not finite
        flags = torch.stack(
            [self.halted, -self.first_bad, self.zero + interrupted, self.bad_loss, self.data_flag]
        )
        if all_reduce is not None:
            flags = all_reduce(flags)
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
        """The mean loss per image so far (reads the device)."""
        if self.policy.host:
            return self.loss_sum / max(self.images, 1)
        return (self.loss_sum / self.images.clamp(min=1)).item()

    def found_inf(self) -> torch.Tensor:
        """The flag that makes fused Adam skip its step on the device."""
        return self.halted

    def totals(self, device: torch.device) -> torch.Tensor:
        """(sum of per-image losses, images) of the epoch so far, as a float64 tensor."""
        if self.policy.host:
            return torch.tensor([self.loss_sum, self.images], dtype=torch.float64, device=device)
        return torch.stack([self.loss_sum, self.images]).double()
