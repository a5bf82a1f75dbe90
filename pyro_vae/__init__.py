"""pyro_vae: variational autoencoders as Pyro models and guides, trained with SVI."""

from .checkpoint import load_checkpoint, load_vae, save_checkpoint
from .config import VAEConfig
from .errors import (
    CheckpointError,
    DataError,
    ProcessLostError,
    TrainingDivergedError,
    UsageError,
)
from .evaluate import Evaluation, elbo, evaluate_vae, iwae_log_likelihood
from .history import EpochRecord, History
from .run import Run
from .train import Temperature, fit
from .vae import VAE

__all__ = [
    "VAE",
    "CheckpointError",
    "DataError",
    "EpochRecord",
    "Evaluation",
    "History",
    "ProcessLostError",
    "Run",
    "Temperature",
    "TrainingDivergedError",
    "UsageError",
    "VAEConfig",
    "elbo",
    "evaluate_vae",
    "fit",
    "iwae_log_likelihood",
    "load_checkpoint",
    "load_vae",
    "save_checkpoint",
]
__version__ = "0.1.0"
