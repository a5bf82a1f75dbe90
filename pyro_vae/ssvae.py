"""The M2 semi-supervised VAE (Kingma et al., 2014), built from the package's own parts.

Generative story (the model)::

    for each image n in the data plate "<name>.data":
        y_n ~ Categorical(1 / num_classes)        # label site  "<name>.y"
        z_n ~ N(0, I)                             # latent site "<name>.z"
        x_n ~ p(x | decoder(z_n, one_hot(y_n)))   # image site  "<name>.x"

and the guide ``y_n ~ q(y | x_n)`` (the classifier), ``z_n ~ q(z | x_n, y_n)``. A labelled
batch observes y in the model and the guide leaves it alone; an unlabelled batch lets
the guide's y site be enumerated in parallel over all classes, so ``TraceEnum_ELBO``
sums the ELBO over labels weighted by q(y | x) exactly instead of sampling a label.
Because the classifier only enters the unlabelled ELBO, the labelled data also train it
directly through the auxiliary term ``alpha * E[-log q(y | x)]`` of Kingma et al.,
with ``alpha = aux_weight * N``.

The networks are :mod:`pyro_vae.nets` MLPs, the observation model a
:mod:`pyro_vae.likelihoods` likelihood, and the latent family
:class:`~pyro_vae.latents.GaussianLatent`, so nothing here is specific to MNIST.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.nn import PyroModule, pyro_method
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .config import VAEConfig
from .data import TensorBatches, fixed_preprocess, preprocess
from .errors import CheckpointError, DataError, TrainingDivergedError
from .latents import GaussianLatent
from .likelihoods import make_likelihood
from .nets import MLPDecoder, MLPEncoder
from .train import resolve_device
from .vae import NamedSites


class _LabelledEncoder(nn.Module):
    """(x, one-hot y) -> encoder output for q(z | x, y).

    The image passes through an MLP encoder to ``hidden`` features, to which a linear
    embedding of the label is added before the last Softplus layer. That is an MLP on
    the concatenation [x, y] whose first layer is split in two, and it lets the image
    features be computed once and broadcast over all enumerated labels.
    """

    def __init__(self, config: VAEConfig, num_classes: int, out_features: int):
        super().__init__()
        self.image = MLPEncoder(config.image_shape, config.hidden, config.hidden, config.depth)
        self.label = nn.Linear(num_classes, config.hidden, bias=False)
        self.out = nn.Linear(config.hidden, out_features)

    def forward(self, x: torch.Tensor, y_one_hot: torch.Tensor) -> torch.Tensor:
        return self.out(F.softplus(self.image(x) + self.label(y_one_hot)))


class SSVAE(NamedSites, PyroModule):
    """M2: a VAE whose decoder is conditioned on a label, which is observed or inferred.

    :param config: image shape, likelihood, ``latent_dim``, ``hidden``, ``depth`` and
        ``name`` (the prefix of site and parameter names) as for :class:`~pyro_vae.VAE`;
        only the MLP architecture and the Gaussian latent are supported.
    :param num_classes: how many values the label y takes.
    """

    def __init__(self, config: VAEConfig | None = None, num_classes: int = 10, **kwargs):
        if config is None:
            config = VAEConfig(**{"name": "ssvae", **kwargs})
        elif kwargs:
            raise TypeError("pass either a VAEConfig or keyword arguments, not both")
        if config.arch != "mlp" or config.latent != "gaussian":
            raise ValueError("SSVAE supports arch 'mlp' with the 'gaussian' latent only")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        super().__init__(name=config.name)
        self.config = config
        self.num_classes = int(num_classes)
        self.latent = GaussianLatent(config.latent_dim)
        self.classifier = MLPEncoder(config.image_shape, config.hidden, num_classes, config.depth)
        self.encoder = _LabelledEncoder(config, num_classes, self.latent.encoder_features)
        self.decoder = MLPDecoder(
            config.latent_dim + num_classes, config.hidden, config.image_shape, config.depth
        )
        self.likelihood = make_likelihood(config)

    @property
    def y_site(self) -> str:
        """Name of the label site."""
        return f"{self.config.name}.y"

    # ----------------------------------------------------------------- Pyro programs
    @pyro_method
    def model(
        self,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """p(y) p(z) p(x | y, z). ``x`` and ``y`` are observed where given; with both
        ``None`` the model draws ``batch_size`` labelled images, and with ``y`` alone it
        draws one image of each given class. Returns the decoder's mean images."""
        like = self._a_parameter()
        with self._plate(x, y, num_data, batch_size) as index:
            prior_y = dist.Categorical(logits=like.new_zeros(self.num_classes))
            y = pyro.sample(self.y_site, prior_y.expand(index.shape), obs=y)
            z = pyro.sample(self.z_site, self.latent.prior(index.shape, like))
            params = self.decoder(_join(z, self._one_hot(y, like)))
            pyro.sample(self.x_site, self.likelihood.distribution(params), obs=x)
        return self.likelihood.mean(params)

    @pyro_method
    def guide(
        self,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """q(y | x) q(z | x, y); y is enumerated over all classes where it is not observed.
        Returns the sampled z."""
        if x is None:
            raise ValueError("the guide encodes observed images, so it needs x")
        with self._plate(x, y, num_data, batch_size):
            if y is None:
                y = pyro.sample(
                    self.y_site,
                    dist.Categorical(logits=self.classifier(x)),
                    infer={"enumerate": "parallel"},
                )
            encoded = self.encoder(x, self._one_hot(y, x))
            return pyro.sample(self.z_site, self.latent.posterior(encoded))

    def _plate(
        self,
        x: torch.Tensor | None,
        y: torch.Tensor | None,
        num_data: int | None,
        batch_size: int | None,
    ) -> pyro.plate:
        if x is not None:
            if x.dim() != 4 or tuple(x.shape[1:]) != self.config.image_shape:
                want = ", ".join(map(str, self.config.image_shape))
                raise ValueError(f"expected images of shape (batch, {want}), got {tuple(x.shape)}")
            batch, device = x.shape[0], x.device
        elif y is not None:
            batch, device = y.shape[0], y.device
        elif batch_size is not None:
            batch, device = int(batch_size), self._a_parameter().device
        else:
            raise ValueError("with x=None and y=None the model needs batch_size")
        if y is not None and (y.dim() != 1 or y.shape[0] != batch):
            raise ValueError(f"y must hold one label per image ({batch}), got {tuple(y.shape)}")
        return self._data_plate(batch, device, num_data)

    def _one_hot(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y.long(), self.num_classes).to(like.dtype)

    # ----------------------------------------------------------------- plain helpers
    def classification_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy ``-sum log q(y | x)`` of a labelled batch."""
        return F.cross_entropy(self.classifier(x), y, reduction="sum")

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable label under q(y | x) for each image."""
        return self.classifier(x).argmax(-1)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
        """Fraction of images whose :meth:`classify` label equals ``y``."""
        hits = sum(
            (self.classify(x[i : i + batch_size]) == y[i : i + batch_size]).sum().item()
            for i in range(0, x.shape[0], batch_size)
        )
        return hits / x.shape[0]


def _join(z: torch.Tensor, y_one_hot: torch.Tensor) -> torch.Tensor:
    """[z, one_hot(y)] after broadcasting their leading (enumeration, batch) dimensions."""
    lead = torch.broadcast_shapes(z.shape[:-1], y_one_hot.shape[:-1])
    return torch.cat([z.expand(*lead, -1), y_one_hot.expand(*lead, -1)], dim=-1)


# ----------------------------------------------------------------------------- training
def balanced_labels(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``per_class`` randomly chosen examples of every class in ``labels``."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique(sorted=True):
        members = (labels == label).nonzero().squeeze(1)
        if members.numel() < per_class:
            raise DataError(
                f"class {label.item()} has {members.numel()} examples, fewer than {per_class}"
            )
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    return torch.cat(chosen)


@dataclass
class SSVAEEpoch:
    """What one epoch of :func:`fit_ssvae` did."""

    epoch: int
    #: mean loss per image: -ELBO of labelled and unlabelled images plus the auxiliary term.
    train_loss: float
    #: classifier accuracy on the held-out images (None: no test data).
    test_accuracy: float | None
    #: wall-clock seconds of the epoch's training steps.
    seconds: float


def fit_ssvae(
    ssvae: SSVAE,
    labelled: torch.Tensor,
    labels: torch.Tensor,
    unlabelled: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 1e-3,
    aux_weight: float = 0.1,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    checkpoint: str | Path | None = None,
    on_epoch=None,
) -> list[SSVAEEpoch]:
    """Train ``ssvae`` by SVI with ``TraceEnum_ELBO`` on labelled and unlabelled images.

    Each step takes one batch of unlabelled images (the label enumerated) and one batch
    of labelled images (the label observed, all of them when there are at most
    ``batch_size``), each ELBO scaled to its own data set, plus the auxiliary
    classification loss ``aux_weight * N * mean(-log q(y | x))`` over labelled images
    (Kingma et al. use ``aux_weight = 0.1``; N counts all training images).

    :param labelled: ``(L, C, H, W)`` uint8 images with integer ``labels`` ``(L,)``.
    :param unlabelled: ``(U, C, H, W)`` uint8 images; uint8 data is binarized or
        dequantized afresh each step, as :func:`pyro_vae.fit` does.
    :param test: held-out ``(images, labels)``; the classifier's accuracy on one fixed
        preprocessing of them is recorded after each epoch.
    :param checkpoint: file written after every epoch (config, weights, history).
    :param on_epoch: called with each :class:`SSVAEEpoch` as it finishes, e.g. to log.
    """
    if labelled.shape[0] == 0 or labels.shape != labelled.shape[:1]:
        raise DataError("need a non-empty batch of labelled images with one label each")
    if unlabelled.shape[0] == 0:
        raise DataError("need unlabelled images")
    if labels.min() < 0 or labels.max() >= ssvae.num_classes:
        raise DataError(f"labels must lie in 0..{ssvae.num_classes - 1}")
    if epochs < 0 or batch_size < 1 or lr <= 0 or aux_weight < 0:
        raise ValueError("need epochs >= 0, batch_size >= 1, lr > 0, aux_weight >= 0")
    for images in (labelled, unlabelled):
        if images.is_floating_point():  # uint8 images are made valid data by preprocess()
            ssvae.likelihood.check_data(images)
    device = resolve_device(device)
    ssvae.to(device).train()
    pyro.set_rng_seed(seed)
    how = ssvae.likelihood.preprocessing
    batches = TensorBatches(unlabelled, batch_size, device, seed)
    labelled, labels = labelled.to(device), labels.to(device)
    num_labelled, num_data = labelled.shape[0], unlabelled.shape[0] + labelled.shape[0]
    alpha = aux_weight * num_data
    test_x = test_y = None
    if test is not None:
        test_x, test_y = fixed_preprocess(test[0].to(device), how), test[1].to(device)
    # the labelled ELBO has nothing to enumerate, so plain Trace_ELBO scores it
    unlabelled_elbo, labelled_elbo = TraceEnum_ELBO(max_plate_nesting=1), Trace_ELBO()
    optimizer = torch.optim.Adam(ssvae.parameters(), lr=lr)
    history: list[SSVAEEpoch] = []
    with pyro.get_param_store().scope():
        for epoch in range(epochs):
            start, loss_sum = time.perf_counter(), 0.0
            first_step = epoch * len(batches) + 1
            for step, images in enumerate(batches.epoch(epoch), start=first_step):
                pick = torch.randperm(num_labelled, device=device)[:batch_size]
                x_l, y_l = preprocess(labelled[pick], how), labels[pick]
                x_u = preprocess(images, how)
                # the data were checked up front and a NaN surfaces in the loss below, so
                # Pyro's per-step support checks would only repeat work (as in fit())
                with pyro.validation_enabled(False):
                    loss = (
                        unlabelled_elbo.differentiable_loss(
                            ssvae.model, ssvae.guide, x_u, num_data=batches.num_data
                        )
                        + labelled_elbo.differentiable_loss(
                            ssvae.model, ssvae.guide, x_l, y_l, num_data=num_labelled
                        )
                        + alpha / x_l.shape[0] * ssvae.classification_loss(x_l, y_l)
                    )
                if not math.isfinite(loss.item()):
                    raise TrainingDivergedError(step, loss.item())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() / num_data
            seconds = time.perf_counter() - start
            ssvae.eval()
            accuracy = None if test_x is None else ssvae.accuracy(test_x, test_y)
            ssvae.train()
            history.append(SSVAEEpoch(epoch + 1, loss_sum / len(batches), accuracy, seconds))
            if checkpoint is not None:
                save_checkpoint(
                    checkpoint,
                    ssvae,
                    num_classes=ssvae.num_classes,
                    history=[asdict(record) for record in history],
                )
            if on_epoch is not None:
                on_epoch(history[-1])
    ssvae.eval()
    return history


def load_ssvae(path: str | Path, map_location: str | torch.device = "cpu") -> SSVAE:
    """Rebuild an :class:`SSVAE` saved by :func:`fit_ssvae`, in eval mode."""
    state = load_checkpoint(path, map_location)
    if "num_classes" not in state:
        raise CheckpointError(f"{path} holds a plain VAE, not an SSVAE; use load_vae")
    ssvae = SSVAE(state["config"], num_classes=int(state["num_classes"]))
    try:
        ssvae.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{path} has weights that do not fit its config: {error}") from None
    return ssvae.to(map_location).eval()
