"""Checkpoints: config + weights + optimizer + progress + RNG states, safe to load.

A checkpoint is a dict of tensors and plain Python values written by ``torch.save``
to a temporary file that is then renamed over the target, so an interruption never
leaves a half-written checkpoint in place of a good one. It is read back with
``torch.load(weights_only=True)``, which refuses to unpickle arbitrary objects.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a checkpoint written by :func:`save_checkpoint`."""
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
        state["config"] = VAEConfig.from_dict(state["config"])
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
    vae = VAE(config)
    try:
        vae.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{path} has weights that do not fit its config: {error}") from None
    return vae.to(map_location).eval()
