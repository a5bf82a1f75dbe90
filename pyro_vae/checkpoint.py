"""Checkpoints: config + weights + optimizer + progress + RNG states, safe to load.

A checkpoint is a dict of tensors and plain Python values written by ``torch.save``
to a temporary file that is then renamed over the target, so an interruption never
leaves a half-written checkpoint in place of a good one. It is read back with
``torch.load(weights_only=True)``, which refuses to unpickle arbitrary objects.

Beside save and load, this module holds the state a training run keeps in its
checkpoint: where it stands (:class:`Progress`), every process's random state
(:func:`rng_states`), what a resumed run restores (:func:`restore_training`), and
the deferred Ctrl-C that lets a run save a consistent state before it stops
(:class:`DeferredInterrupt`).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .config import VAEConfig
from .errors import CheckpointError

FORMAT = "pyro_vae.checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, vae: torch.nn.Module, **extra: Any) -> Path:
    """Atomically write ``vae`` (config and weights) and ``extra`` entries to ``path``.

    ``extra`` holds whatever resuming needs: ``optimizer`` (a state dict), ``progress``,
    ``history``, ``rng``. Values must be tensors or plain Python containers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "config": vae.config.to_dict(),
        "model": vae.state_dict(),
        **extra,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", config_type: type = VAEConfig
) -> dict:
    """Read and check a checkpoint written by :func:`save_checkpoint`.

    :param config_type: the config class of the model it holds (with ``from_dict``): the
        VAE's by default, another model's (a token prior's) where it says so.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # zip, pickle and EOF errors all mean "not ours or damaged"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} is not a readable pyro_vae checkpoint (damaged, or another program's "
            f"file): {reason[:200]}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a torch file but not a pyro_vae checkpoint")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path} was written by a newer pyro_vae (format {state['version']}); "
            "upgrade pyro_vae to read it"
        )
    try:
        state["config"] = config_type.from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} holds an invalid config: {error}") from None
    return state


def check_config(saved: VAEConfig, wanted: VAEConfig, path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming every field where two configs differ."""
    diffs = [
        f"{key}: checkpoint has {value!r}, asked for {wanted.to_dict()[key]!r}"
        for key, value in saved.to_dict().items()
        if wanted.to_dict()[key] != value
    ]
    if diffs:
        raise CheckpointError(f"{path} does not match the model ({'; '.join(diffs)})")


def load_vae(path: str | Path, map_location: str | torch.device = "cpu", name: str | None = None):
    """Rebuild the VAE stored in a checkpoint, with its trained weights, in eval mode.

    :param name: a new ``config.name`` (the prefix of its Pyro sites and parameters), so
        that two checkpoints saved under the same name can live in one Pyro program.
    """
    from .vae import VAE

    state = load_checkpoint(path, map_location)
    config = state["config"] if name is None else dataclasses.replace(state["config"], name=name)
    return load_weights(VAE(config), state, path).to(map_location).eval()


def load_weights(model: torch.nn.Module, state: dict, path: str | Path) -> torch.nn.Module:
    """Load a checkpoint's weights into a freshly built ``model``, in the precision they
    were trained in (float64 under ``--precision 64-true``): ``load_state_dict`` alone
    would round them to the new model's float32."""
    dtype = stored_dtype(state["model"])
    if dtype is not None:
        model = model.to(dtype)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{path} has weights that do not fit its config: {error}") from None
    return model


def stored_dtype(weights: dict) -> torch.dtype | None:
    """The floating-point dtype of a state dict's tensors (None: it holds none)."""
    return next((t.dtype for t in weights.values() if t.is_floating_point()), None)


# ---------------------------------------------------------------------------- training state
@dataclass
class Progress:
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

    @classmethod
    def from_dict(cls, values: dict) -> Progress:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def rng_states(fabric) -> dict:
    """Every process's torch (and CUDA) RNG state, gathered so rank 0 can store them
    (a collective: every process calls it)."""
    states = {"torch": _gather(torch.get_rng_state(), fabric)}
    if fabric.device.type == "cuda":
        states["cuda"] = _gather(torch.cuda.get_rng_state(fabric.device), fabric)
    return states


def _gather(state: torch.Tensor, fabric) -> list[torch.Tensor]:
    """One CPU tensor of every process, in rank order."""
    if fabric.world_size == 1:
        return [state]
    import torch.distributed as dist

    own = state.to(fabric.device)
    everyone = [torch.empty_like(own) for _ in range(fabric.world_size)]
    dist.all_gather(everyone, own)
    return [s.cpu() for s in everyone]


def _restore_rng(rng: dict, rank: int, world: int, device: torch.device) -> None:
    torch_states = rng.get("torch")
    if isinstance(torch_states, torch.Tensor):  # written before the states were per process
        torch_states = [torch_states]
    if torch_states:
        torch.set_rng_state(torch_states[rank].cpu())
    cuda_states = rng.get("cuda")
    if cuda_states and device.type == "cuda":
        own = cuda_states[rank] if len(cuda_states) == world else cuda_states[0]
        torch.cuda.set_rng_state(own.cpu(), device)


def restore_training(
    path: str | Path, model, optimizer, lr: float, extra_differences, fabric
) -> tuple[list[dict], Progress]:
    """Load a run's checkpoint into ``model`` and ``optimizer`` and this process's RNG,
    after checking that it was written for this model and this number of processes;
    return its history rows and progress.

    :param lr: the rate the run goes on at (Adam's moments carry over, but the saved rate
        would silently override the one asked for now).
    :param extra_differences: called with the checkpoint, returns one line per entry
        that defines the model besides its config and differs (an SSVAE's classes).
    """
    device, rank, world = fabric.device, fabric.global_rank, fabric.world_size
    state = load_checkpoint(path, map_location=device, config_type=type(model.config))
    check_config(state["config"], model.config, path)
    diffs = extra_differences(state)
    if diffs:
        raise CheckpointError(
            f"{path} was written for another model ({'; '.join(diffs)}); "
            "resume with the same settings, or train into a new checkpoint"
        )
    saved_world = int(state.get("world_size", 1))
    if saved_world != world:
        raise CheckpointError(
            f"{path} was written by a run of {saved_world} process(es); resume it with the "
            f"same number (devices x num_nodes), not {world}"
        )
    model.load_state_dict(state["model"])
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = lr
    _restore_rng(state.get("rng", {}), rank, world, device)
    return state.get("history", []), Progress.from_dict(state.get("progress", {}))


class DeferredInterrupt:
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

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
