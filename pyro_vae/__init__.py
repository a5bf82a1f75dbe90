"""pyro_vae: variational autoencoders as Pyro models and guides, trained with SVI."""

from .checkpoint import load_checkpoint, load_vae, save_checkpoint
from .config import VAEConfig
from .errors import CheckpointError, DataError, TrainingDivergedError, UsageError
from .evaluate import Evaluation, elbo, evaluate_vae, iwae_log_likelihood
from .train import EpochRecord, History, fit
from .vae import VAE

__all__ = [
    "VAE",
    "CheckpointError",
    "DataError",
    "EpochRecord",
    "Evaluation",
    "History",
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
