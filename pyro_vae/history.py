"""What a training run returns: one record per epoch, the same type for every model.

Each :class:`EpochRecord` has the fields every run has (epoch, optimizer steps, mean
training loss, seconds, learning rate) and the model's own ``metrics`` (the VAE's
held-out ELBO, KL weight and temperature; the SSVAE's test accuracy), which also read
as attributes: ``record.test_elbo`` is ``record.metrics["test_elbo"]``.
:class:`History` adds the device the run trained on and the process that returns it.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: how an epoch line names a metric (others are named by their key).
LABELS = {
    "test_elbo": "test ELBO",
    "test_accuracy": "test accuracy",
    "test_bits_per_token": "test bits/token",
}
#: the metrics an epoch line shows, where a record has them.
SHOWN = ("test_elbo", "test_accuracy", "test_bits_per_token")
_BASE = ("epoch", "step", "train_loss", "seconds", "lr")


@dataclass
class EpochRecord:
    """What one epoch did. Losses are nats per data point."""

    epoch: int
    #: optimizer steps taken so far, over all epochs.
    step: int
    #: mean training loss (the negative objective) over the epoch's batches.
    train_loss: float
    #: wall-clock seconds of the epoch's training steps (held-out evaluation excluded).
    seconds: float
    #: Adam's learning rate at the end of the epoch.
    lr: float | None = None
    #: the model's own figures of the epoch, by name (None: not measured).
    metrics: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # only called for names that are not fields: a metric, as an attribute
        metrics = self.__dict__.get("metrics", {})
        if name in metrics:
            return metrics[name]
        raise AttributeError(f"{type(self).__name__} has no field or metric {name!r}")

    def summary(self, epochs: int) -> str:
        """One line for a log: ``epoch e/E  train loss L  test ELBO T  (s s)``."""
        shown = "".join(
            f"  {LABELS.get(name, name)} {self.metrics[name]:.{2 if name == 'test_elbo' else 4}f}"
            for name in SHOWN
            if self.metrics.get(name) is not None
        )
        return (
            f"epoch {self.epoch}/{epochs}  train loss {self.train_loss:.2f}{shown}"
            f"  ({self.seconds:.1f} s)"
        )

    def to_row(self) -> dict:
        """A flat dict (the fields, then the metrics), for CSV, JSON and checkpoints."""
        return {**{name: getattr(self, name) for name in _BASE}, **self.metrics}

    @classmethod
    def from_row(cls, row: dict) -> EpochRecord:
        """The record of :meth:`to_row`'s dict (older rows without ``lr`` or ``step`` too)."""
        base = {name: row[name] for name in _BASE if name in row}
        return cls(**base, metrics={k: v for k, v in row.items() if k not in _BASE})


@dataclass
class History:
    """The records of a run's epochs, the device it trained on and this process's rank."""

    epochs: list[EpochRecord] = field(default_factory=list)
    #: the device of this process, e.g. "cpu" or "cuda:0".
    device: str = field(default="cpu", compare=False)
    #: the process that returned this history (0 but in data-parallel runs): only
    #: process 0 should write files.
    rank: int = field(default=0, compare=False)

    def to_rows(self) -> list[dict]:
        return [record.to_row() for record in self.epochs]

    @classmethod
    def from_rows(cls, rows: Iterable[dict], device: str = "cpu", rank: int = 0) -> History:
        return cls([EpochRecord.from_row(row) for row in rows], device=device, rank=rank)

    def column(self, name: str) -> list:
        """One field or metric over all epochs, e.g. ``history.column("test_elbo")``."""
        return [getattr(record, name) for record in self.epochs]

    def write_csv(self, path: str | Path) -> Path:
        """Write one row per epoch to ``path`` (a header of every field and metric)."""
        rows = self.to_rows()
        names = list(dict.fromkeys(key for row in rows for key in row)) or list(_BASE)
        path = Path(path)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=names)
            writer.writeheader()
            writer.writerows(rows)
        return path
