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

Stacked on a fitted :class:`~pyro_vae.VAE` (``base``), this is Kingma et al.'s M1 + M2:
M2 explains the base VAE's latent code instead of the pixels, and the base decoder
turns the code into the image::

    y_n ~ Categorical, z_n ~ N(0, I)            # "<name>.y", "<name>.z"
    c_n ~ N(decoder(z_n, one_hot(y_n)), sigma)  # the base's latent site "<base>.z"
    x_n ~ p(x | base decoder(c_n))              # the base's image site "<base>.x"

with the guide ``c_n ~ q_base(c | x_n)``, then ``q(y | c_n)`` and ``q(z | c_n, y_n)``.
The base is trained first and stays fixed, so its encoder and decoder add constants to
the ELBO's gradient and M2 is, in effect, fitted to draws of the codes. On MNIST with
100 labels, M2's classifier does far better on the codes than on the pixels (see
docs/benchmarks.md). M2 may model only some code dimensions (:func:`active_code_dims`):
the others keep the base's N(0, 1) prior, and a base VAE's inactive dimensions are
exactly that, noise whatever the image.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.nn import PyroModule
from torch import nn

from .checkpoint import load_checkpoint, load_weights
from .config import VAEConfig
from .data import HeldOut, PairedBatches, TensorBatches
from .engine import Batch, Objective, unwrap
from .engine import train as train_engine
from .errors import CheckpointError, DataError, UsageError
from .evaluate import ACTIVE_THRESHOLD, prepare_held_out, unit_activity
from .history import EpochRecord, History
from .latents import GaussianLatent
from .likelihoods import GaussianLikelihood, Likelihood, make_likelihood
from .nets import MLPDecoder, MLPEncoder
from .run import Run
from .sites import NamedSites, pyro_program
from .vae import VAE


class _LabelledEncoder(nn.Module):
    """(x, one-hot y) -> encoder output for q(z | x, y).

    The image passes through an MLP encoder to ``hidden`` features, to which a linear
    embedding of the label is added before the last Softplus layer. That is an MLP on
    the concatenation [x, y] whose first layer is split in two, and it lets the image
    features be computed once and broadcast over all enumerated labels.
    """

    def __init__(
        self, config: VAEConfig, data_shape: tuple[int, ...], num_classes: int, out_features: int
    ):
        super().__init__()
        self.image = MLPEncoder(data_shape, config.hidden, config.hidden, config.depth)
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
    :param base: a fitted VAE with a Gaussian latent to stack M2 on (M1 + M2, see the
        module docstring). M2 then models the base's codes: ``config.likelihood`` must be
        "gaussian" (its sigma is that of the codes, and "pixel" learns one per code
        dimension) and ``config.image_shape`` that of the base. The SSVAE keeps its own
        frozen copy of the base (``requires_grad=False``, eval mode), saved with its
        weights; the VAE passed in is left as it is.
    :param code_dims: with ``base``, the code dimensions that M2 models (all by default);
        the others keep the base's N(0, 1) prior. :func:`active_code_dims` picks them.
    """

    def __init__(
        self,
        config: VAEConfig | None = None,
        num_classes: int = 10,
        base: VAE | None = None,
        code_dims: Sequence[int] | None = None,
        **kwargs,
    ):
        if config is None:
            config = VAEConfig(**{"name": "ssvae", **kwargs})
        elif kwargs:
            raise TypeError("pass either a VAEConfig or keyword arguments, not both")
        if config.arch != "mlp" or config.latent != "gaussian":
            raise UsageError("SSVAE supports arch 'mlp' with the 'gaussian' latent only")
        if num_classes < 2:
            raise UsageError(f"num_classes must be at least 2, got {num_classes}")
        if base is None:
            if code_dims is not None:
                raise UsageError("code_dims selects codes of a base VAE; pass base too")
            data_shape = config.image_shape
        else:
            _check_base(config, base)
            code_dims = _check_code_dims(code_dims, base.config.latent_dim)
            data_shape = (len(code_dims),)
        super().__init__(name=config.name)
        self.config = config
        self.num_classes = int(num_classes)
        #: a frozen copy of the base VAE, in eval mode for good (see train()), or None.
        self.base = None if base is None else copy.deepcopy(base).requires_grad_(False).eval()
        if base is not None:  # follows the model across devices; code_dims reads it back
            self.register_buffer("_code_index", torch.tensor(code_dims), persistent=False)
        self.latent = GaussianLatent(config.latent_dim)
        self.classifier = MLPEncoder(data_shape, config.hidden, num_classes, config.depth)
        self.encoder = _LabelledEncoder(
            config, data_shape, num_classes, self.latent.encoder_features
        )
        self.decoder = MLPDecoder(
            config.latent_dim + num_classes, config.hidden, data_shape, config.depth
        )
        #: the distribution of what M2 generates: the images, or the base's codes.
        self.likelihood: Likelihood = (
            make_likelihood(config)
            if base is None
            else GaussianLikelihood(
                data_shape, config.gaussian_sigma, config.sigma_init, config.sigma_floor
            )
        )

    def train(self, mode: bool = True) -> SSVAE:
        """As :meth:`torch.nn.Module.train`, but a base VAE stays in eval mode: it is
        frozen, and Pyro would warn on every step that its weights are not trained."""
        super().train(mode)
        if self.base is not None:
            self.base.eval()
        return self

    @property
    def code_dims(self) -> list[int] | None:
        """The base code dimensions that M2 models (None without a base)."""
        return None if self.base is None else self._code_index.tolist()

    @property
    def image_likelihood(self) -> Likelihood:
        """p(x | ·) of the images: M2's own likelihood, or the base VAE's when stacked.
        Its ``preprocessing`` says how 8-bit training images are made into data."""
        return self.likelihood if self.base is None else self.base.likelihood

    @property
    def x_site(self) -> str:
        """Name of the observed image site (the base VAE's, when stacked)."""
        return super().x_site if self.base is None else self.base.x_site

    @property
    def y_site(self) -> str:
        """Name of the label site."""
        return f"{self.config.name}.y"

    # ----------------------------------------------------------------- Pyro programs
    @pyro_program
    def model(
        self,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """p(y) p(z) p(x | y, z), or p(y) p(z) p(c | y, z) p(x | c) stacked on a base VAE
        (c its code). ``x`` and ``y`` are observed where given; with both ``None`` the
        model draws ``batch_size`` labelled images, and with ``y`` alone it draws one
        image of each given class. Returns the (base) decoder's mean images."""
        like = self._a_parameter()
        with self._plate(x, y, num_data, batch_size) as index:
            prior_y = dist.Categorical(logits=like.new_zeros(self.num_classes))
            y = pyro.sample(self.y_site, prior_y.expand(index.shape), obs=y)
            z = pyro.sample(self.z_site, self.latent.prior(index.shape, like))
            params = self.decoder(_join(z, self._one_hot(y, like)))
            if self.base is None:
                pyro.sample(self.x_site, self.likelihood.distribution(params), obs=x)
                return self.likelihood.mean(params)
            code = pyro.sample(self.base.z_site, self._code_distribution(params))
            params = self.base.decoder(code)
            pyro.sample(self.x_site, self.base.likelihood.distribution(params), obs=x)
        return self.base.likelihood.mean(params)

    @pyro_program
    def guide(
        self,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """q(y | x) q(z | x, y); y is enumerated over all classes where it is not observed.
        Stacked on a base VAE, x is first encoded to a code ``c ~ q_base(c | x)``, and the
        label and z are inferred from c. Returns the sampled z."""
        if x is None:
            raise UsageError("the guide encodes observed images, so it needs x")
        with self._plate(x, y, num_data, batch_size):
            if self.base is not None:
                code = pyro.sample(self.base.z_site, self.base.posterior(x))
                x = code.index_select(-1, self._code_index)
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
                raise DataError(f"expected images of shape (batch, {want}), got {tuple(x.shape)}")
            batch, device = x.shape[0], x.device
        elif y is not None:
            batch, device = y.shape[0], y.device
        elif batch_size is not None:
            batch, device = int(batch_size), self._a_parameter().device
        else:
            raise UsageError("with x=None and y=None the model needs batch_size")
        if y is not None and (y.dim() != 1 or y.shape[0] != batch):
            raise UsageError(f"y must hold one label per image ({batch}), got {tuple(y.shape)}")
        return self._data_plate(batch, device, num_data)

    def _code_distribution(self, params: torch.Tensor) -> dist.TorchDistribution:
        """p(c | y, z) over the base's whole code: M2's Gaussian, with mean ``params``, on
        the modelled dimensions, and the base's N(0, 1) prior on the others."""
        index, size = self._code_index, self.base.config.latent_dim
        loc = params.new_zeros((*params.shape[:-1], size)).index_copy(-1, index, params)
        sigma = self.likelihood.sigma.to(params.dtype).expand(index.shape)
        scale = params.new_ones(size).index_copy(0, index, sigma)
        return dist.Normal(loc, scale).to_event(1)

    def _one_hot(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y.long(), self.num_classes).to(like.dtype)

    # ----------------------------------------------------------------- plain helpers
    def _classifier_input(self, x: torch.Tensor, sample: bool) -> torch.Tensor:
        """What q(y | ·) reads: the images, or when stacked their base codes, drawn from
        q_base(c | x) in training (as the guide does) or its mean to classify."""
        if self.base is None:
            return x
        posterior = self.base.posterior(x)
        code = posterior.rsample() if sample else posterior.mean
        return code.index_select(-1, self._code_index)

    def classification_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy ``-sum log q(y | x)`` of a labelled batch (a one-draw
        estimate of its expectation over the codes, when stacked)."""
        return F.cross_entropy(self.classifier(self._classifier_input(x, True)), y, reduction="sum")

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable label under q(y | x) for each image (under q(y | c) at the
        base's posterior mean code c, when stacked)."""
        return self.classifier(self._classifier_input(x, False)).argmax(-1)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
        """Fraction of images whose :meth:`classify` label equals ``y``."""
        hits = sum(
            (self.classify(x[i : i + batch_size]) == y[i : i + batch_size]).sum().item()
            for i in range(0, x.shape[0], batch_size)
        )
        return hits / x.shape[0]


def _check_base(config: VAEConfig, base: VAE) -> None:
    """Raise UsageError unless an M2 with ``config`` can be stacked on ``base``."""
    if not isinstance(base, VAE) or base.config.latent != "gaussian":
        raise UsageError("base must be a pyro_vae.VAE with the 'gaussian' latent")
    if config.likelihood != "gaussian":
        raise UsageError(
            "stacked on a base VAE, M2 models its continuous codes, so the likelihood "
            f"must be 'gaussian', got {config.likelihood!r}"
        )
    if config.image_shape != base.config.image_shape:
        raise UsageError(
            f"image_shape {config.image_shape} differs from the base VAE's "
            f"{base.config.image_shape}"
        )
    if config.name == base.config.name:
        raise UsageError(f"the SSVAE and its base VAE share the name {config.name!r}")


def _check_code_dims(code_dims: Sequence[int] | None, size: int) -> list[int]:
    """``code_dims`` as a sorted list of distinct dimensions of a code of ``size``."""
    if code_dims is None:
        return list(range(size))
    message = f"code_dims must be distinct integer dimensions in 0..{size - 1}"
    try:
        dims = sorted({operator.index(d) for d in code_dims})
    except TypeError:
        raise UsageError(f"{message}, got {list(code_dims)}") from None
    if not dims or len(dims) != len(code_dims) or dims[0] < 0 or dims[-1] >= size:
        raise UsageError(f"{message}, got {list(code_dims)}")
    return dims


def active_code_dims(
    vae: VAE, images: torch.Tensor, threshold: float = ACTIVE_THRESHOLD
) -> list[int]:
    """The code dimensions of a fitted VAE that carry information about ``images``:
    those whose posterior mean varies over them by more than ``threshold`` (the active
    units of Burda et al.). The others stay at the prior whatever the image, so an M2
    stacked on them would only learn to ignore noise."""
    x, _ = prepare_held_out(vae, images.to(next(vae.parameters()).device))
    dims = (unit_activity(vae, x) > threshold).nonzero().flatten().tolist()
    if not dims:
        raise DataError("no code dimension of this VAE is active: it has collapsed to its prior")
    return dims


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


class SSVAELoss(nn.Module):
    """The semi-supervised objective of one step as a module (what DDP wraps): the
    enumerated ELBO of a batch of unlabelled images, the ELBO of a random batch of the
    labelled ones (labels observed), and the auxiliary classification loss.

    A step's batch is ``(x_unlabelled, x_labelled, labels)``, made ready by
    :class:`~pyro_vae.data.PairedBatches`.
    """

    def __init__(self, ssvae: SSVAE, num_unlabelled: int, num_labelled: int, aux_weight: float):
        super().__init__()
        self.ssvae = ssvae
        self.num_unlabelled, self.num_labelled = num_unlabelled, num_labelled
        # the auxiliary weight is a fraction of the whole data set's size
        self.alpha = aux_weight * (num_unlabelled + num_labelled)
        self.unlabelled_elbo = TraceEnum_ELBO(max_plate_nesting=1)
        # the labelled ELBO has nothing to enumerate, so plain Trace_ELBO scores it
        self.labelled_elbo = Trace_ELBO()

    def forward(self, batch: tuple | Batch) -> torch.Tensor:
        x_u, x_l, y_l = unwrap(batch)
        ssvae = self.ssvae
        model, guide = ssvae.programs()
        return (
            self.unlabelled_elbo.differentiable_loss(
                model, guide, x_u, num_data=self.num_unlabelled
            )
            + self.labelled_elbo.differentiable_loss(
                model, guide, x_l, y_l, num_data=self.num_labelled
            )
            + self.alpha / x_l.shape[0] * ssvae.classification_loss(x_l, y_l)
        )


class SSVAEObjective(Objective):
    """How :func:`fit_ssvae` trains an SSVAE in the package's one loop: the objective of
    :class:`SSVAELoss`, and the classifier's held-out accuracy as the epoch's metric."""

    def __init__(self, ssvae: SSVAE, module: SSVAELoss, held_out: HeldOut | None):
        self.model, self.module, self.held_out = ssvae, module, held_out

    def prepare(self, rank: int, world: int, device, dtype, steps: int) -> None:
        held_out = self.held_out  # each process classifies its own slice
        self.local_test = None if held_out is None else held_out.shard(rank, world, device, dtype)

    def metrics(self, reduce, step: int) -> dict:
        if self.local_test is None:
            return {"test_accuracy": None}
        x, y = self.local_test.data, self.local_test.labels
        hits = self.model.accuracy(x, y) * len(y) if len(y) else 0.0
        total = reduce(torch.tensor([hits, len(y)], dtype=torch.float64, device=y.device))
        return {"test_accuracy": (total[0] / total[1]).item()}

    def checkpoint_extra(self) -> dict:
        ssvae = self.model
        return {
            "num_classes": ssvae.num_classes,
            "base_config": None if ssvae.base is None else ssvae.base.config.to_dict(),
            "code_dims": ssvae.code_dims,
        }

    def checkpoint_differences(self, state: dict) -> list[str]:
        # the base's config as a config: a checkpoint written before a field was added
        # to VAEConfig reads as that field's default, as load_ssvae reads it
        if state.get("base_config") is not None:
            state = {**state, "base_config": VAEConfig.from_dict(state["base_config"]).to_dict()}
        return super().checkpoint_differences(state)


def fit_ssvae(
    ssvae: SSVAE,
    labelled: torch.Tensor,
    labels: torch.Tensor,
    unlabelled: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    batch_size: int = 100,
    aux_weight: float = 0.1,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    run: Run | None = None,
) -> History:
    """Train ``ssvae`` by SVI with ``TraceEnum_ELBO`` on labelled and unlabelled images,
    in the package's one training loop (:mod:`pyro_vae.engine`), as :func:`pyro_vae.fit`
    trains a VAE: ``run`` (a :class:`~pyro_vae.run.Run`) sets the same devices,
    processes, precision, loggers, checkpoints, resume and Ctrl-C handling.

    Each step takes one batch of unlabelled images (the label enumerated) and one batch
    of labelled images (the label observed, all of them when there are at most
    ``batch_size``), each ELBO scaled to its own data set, plus the auxiliary
    classification loss ``aux_weight * N * mean(-log q(y | x))`` over labelled images
    (Kingma et al. use ``aux_weight = 0.1``; N counts all training images).

    :param labelled: ``(L, C, H, W)`` uint8 images with integer ``labels`` ``(L,)``.
    :param unlabelled: ``(U, C, H, W)`` uint8 images; uint8 data is binarized or
        dequantized afresh each step, as :func:`pyro_vae.fit` does.
    :param test: held-out ``(images, labels)``; the classifier's accuracy on one fixed
        preprocessing of them is recorded after each epoch (metric ``test_accuracy``).
    :param on_epoch: called with each epoch's record, as :func:`pyro_vae.fit` calls its
        ``on_epoch``: in the first process only, once the epoch's checkpoint is written.
    :returns: the :class:`~pyro_vae.history.History` of the run, as :func:`pyro_vae.fit`.
    """
    run = run or Run()
    _check_data(ssvae, labelled, labels, unlabelled)
    if batch_size < 1 or aux_weight < 0:
        raise UsageError(
            f"need batch_size >= 1 and aux_weight >= 0, got {batch_size}, {aux_weight}"
        )
    ssvae.cpu().train()
    how = ssvae.image_likelihood.preprocessing
    source = TensorBatches(unlabelled, batch_size, run.seed, how)
    batches = PairedBatches(source, labelled, labels, batch_size)
    module = SSVAELoss(ssvae, unlabelled.shape[0], labelled.shape[0], aux_weight)
    held_out = None
    if test is not None:
        images, test_labels = test
        held_out = HeldOut.of(images, ssvae.config.image_shape, ssvae.image_likelihood, test_labels)
    history = train_engine(SSVAEObjective(ssvae, module, held_out), batches, run, on_epoch)
    ssvae.eval()
    return history


def _check_data(ssvae: SSVAE, labelled, labels, unlabelled) -> None:
    if labelled.shape[0] == 0 or labels.shape != labelled.shape[:1]:
        raise DataError("need a non-empty batch of labelled images with one label each")
    if unlabelled.shape[0] == 0:
        raise DataError("need unlabelled images")
    if labels.min() < 0 or labels.max() >= ssvae.num_classes:
        raise DataError(f"labels must lie in 0..{ssvae.num_classes - 1}")
    for images in (labelled, unlabelled):
        if images.is_floating_point():  # uint8 images are made valid data by preprocess()
            ssvae.image_likelihood.check_data(images)


def load_ssvae(path: str | Path, map_location: str | torch.device = "cpu") -> SSVAE:
    """Rebuild an :class:`SSVAE` saved by :func:`fit_ssvae`, in eval mode."""
    state = load_checkpoint(path, map_location)
    if "num_classes" not in state:
        raise CheckpointError(f"{path} holds a plain VAE, not an SSVAE; use load_vae")
    base = state.get("base_config")
    try:
        base = None if base is None else VAE(VAEConfig.from_dict(base))
        ssvae = SSVAE(
            state["config"],
            num_classes=int(state["num_classes"]),
            base=base,
            code_dims=state.get("code_dims"),
        )
    except (AttributeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} holds an invalid SSVAE or base config: {error}") from None
    return load_weights(ssvae, state, path).to(map_location).eval()
