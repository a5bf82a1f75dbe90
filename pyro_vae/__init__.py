"""pyro_vae: variational autoencoders as Pyro models and guides, trained with SVI."""

from .checkpoint import load_checkpoint, load_vae, save_checkpoint
from .config import VAEConfig
from .errors import CheckpointError, DataError, TrainingDivergedError
from .evaluate import elbo, iwae_log_likelihood
from .train import EpochRecord, History, fit
from .vae import VAE

__all__ = [
    "VAE",
    "CheckpointError",
    "DataError",
    "EpochRecord",
    "History",
    "TrainingDivergedError",
    "VAEConfig",
    "elbo",
    "fit",
    "iwae_log_likelihood",
    "load_checkpoint",
    "load_vae",
    "save_checkpoint",
]
__version__ = "0.1.0"
