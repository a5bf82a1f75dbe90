"""fit(): stochastic variational inference on a VAE, with checkpoints and resume.

The loop is the textbook SVI step, written with a PyTorch optimizer over
``vae.parameters()``: a Pyro ELBO's ``differentiable_loss`` of the model and guide on one
mini-batch (scaled to the data set by the model's plate), ``backward``, ``step``.
Training runs inside a private scope of Pyro's param store, so it never reads or
overwrites parameters of other models in the same process.
"""

from __future__ import annotations

import functools
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyro
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import evaluate
from .checkpoint import check_config, load_checkpoint, save_checkpoint
from .data import LoaderBatches, TensorBatches, fixed_preprocess, preprocess
from .errors import DataError, TrainingDivergedError, UsageError
from .likelihoods import GaussianLikelihood
from .vae import VAE

ELBOS = {"trace": Trace_ELBO, "jit": JitTrace_ELBO, "meanfield": TraceMeanField_ELBO}


@dataclass
class EpochRecord:
    """What one epoch did. Losses are nats per image."""

    epoch: int
    #: optimizer steps taken so far, over all epochs.
    step: int
    #: mean training loss (negative, KL-weighted ELBO estimate) over the epoch's batches.
    train_loss: float
    #: ELBO of the held-out data with the weights at the end of the epoch (None: no test data).
    test_elbo: float | None
    #: wall-clock seconds of the epoch's training steps (held-out evaluation excluded).
    seconds: float
    #: KL weight (beta times warm-up) at the end of the epoch.
    kl_weight: float
    #: Concrete temperature at the end of the epoch (None: the latent has no temperature).
    temperature: float | None = None
    #: Adam's learning rate in the epoch (a run resumed at another rate changes it).
    lr: float | None = None

    def summary(self, epochs: int) -> str:
        """One line for a log: epoch, losses and seconds."""
        test = "" if self.test_elbo is None else f"  test ELBO {self.test_elbo:.2f}"
        return (
            f"epoch {self.epoch}/{epochs}  train loss {self.train_loss:.2f}{test}"
            f"  ({self.seconds:.1f} s)"
        )


@dataclass
class History:
    """The per-epoch record of a run; :meth:`to_rows` gives CSV/JSON-ready dicts."""

    epochs: list[EpochRecord] = field(default_factory=list)

    def to_rows(self) -> list[dict]:
        return [asdict(record) for record in self.epochs]

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> History:
        return cls([EpochRecord(**row) for row in rows])

    def column(self, name: str) -> list:
        """One field over all epochs, e.g. ``history.column("test_elbo")``."""
        return [getattr(record, name) for record in self.epochs]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """ "auto" (or None) picks CUDA when a GPU is there, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"unknown device {device!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "device 'cuda' was asked for but no CUDA GPU is available; use 'cpu' or 'auto'"
        )
    return device


def kl_weight_at(step: int, beta: float, warmup_steps: float) -> float:
    """beta, ramped linearly from 0 over the first ``warmup_steps`` steps (Bowman et al.)."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, (step + 1) / warmup_steps)


#: shapes of the temperature schedule, from ``temperature`` down to ``temperature_floor``.
TEMPERATURE_SCHEDULES = ("exponential", "cosine", "constant")


def temperature_at(step: int, start: float, floor: float, shape: str, anneal_steps: float) -> float:
    """Concrete temperature after ``step`` optimizer steps.

    "exponential" decays geometrically from ``start`` to ``floor`` over ``anneal_steps``
    steps (the log-temperature falls linearly, as in Jang et al.'s ``exp(-r t)``);
    "cosine" follows half a cosine between them; both stay at ``floor`` afterwards.
    "constant" keeps ``start``. A low temperature makes relaxed samples nearly one-hot
    (less bias against the discrete model) but their gradients noisier.
    """
    if shape == "constant":
        return start
    progress = 1.0 if anneal_steps <= 0 else min(1.0, step / anneal_steps)
    if shape == "exponential":
        return start * (floor / start) ** progress
    if shape == "cosine":
        return floor + (start - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise UsageError(
        f"unknown temperature schedule {shape!r}; choose one of: {', '.join(TEMPERATURE_SCHEDULES)}"
    )


def fit(
    vae,
    train: torch.Tensor | Dataset,
    test: torch.Tensor | None = None,
    *,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 1e-3,
    beta: float = 1.0,
    warmup: float = 0.0,
    elbo: str = "trace",
    seed: int = 0,
    device: str | torch.device | None = "auto",
    num_workers: int = 2,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    temperature: float = 1.0,
    temperature_floor: float = 0.5,
    temperature_schedule: str = "exponential",
    temperature_anneal: float | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> History:
    """Train ``vae`` by SVI on ``train`` and return the per-epoch :class:`History`.

    :param train: ``(N, C, H, W)`` images (``(N, D)`` vectors for a VAE of vectors), held
        on the device and batched by shuffled index; uint8 images are binarized afresh
        each batch (Bernoulli likelihood) or dequantized (continuous ones), floating-point
        data is used as it is, in the model's dtype. A ``Dataset`` of images (e.g.
        :class:`~pyro_vae.data.ImageFolder`), or of ``(image, label, ...)`` tuples such as
        a ``TensorDataset`` or a torchvision data set, whose first element is taken, is
        streamed through a ``DataLoader`` with ``num_workers`` workers instead.
    :param test: held-out images; their ELBO is recorded after each epoch. uint8 test
        images get one fixed, seeded binarization or dequantization.
    :param epochs: total epochs, at least 1; a resumed run continues up to this number.
    :param beta: weight of the KL term (1 is the true ELBO), applied with
        ``poutine.scale`` to the latent site in both model and guide.
    :param warmup: epochs over which the KL weight ramps linearly from 0 to ``beta``.
    :param elbo: "trace" (``Trace_ELBO``), "jit" (``JitTrace_ELBO``) or "meanfield"
        (``TraceMeanField_ELBO``, analytic KL where it exists).
    :param seed: seeds Pyro/torch, the shuffling and the noise of training, so a run is
        reproducible. The weights were drawn when the VAE was built: for a run that is
        reproducible from scratch, call ``pyro.set_rng_seed(seed)`` before ``VAE(...)``.
    :param checkpoint: file to write after every epoch, on Ctrl-C, and to resume from.
    :param resume: continue from ``checkpoint`` if it exists (weights, optimizer,
        progress, history, RNG states); its config must match ``vae.config``. The run
        goes on at ``lr``, which may differ from the rate it was started with.
    :param temperature: relaxed-categorical latents: the Concrete temperature at the
        start of training (ignored by latents without one).
    :param temperature_floor: the temperature at the end of the annealing, and after it.
    :param temperature_schedule: "exponential", "cosine" or "constant" (see
        :func:`temperature_at`); the temperature follows optimizer steps, so a resumed
        run continues the schedule where it stopped.
    :param temperature_anneal: epochs over which the temperature falls to the floor
        (default: all ``epochs``).
    :param on_epoch: called with each epoch's :class:`EpochRecord` once its checkpoint is
        written, e.g. to log when ``progress=False`` or to stop early by raising.
    :raises TrainingDivergedError: when the loss stops being finite; the bad step is
        not applied, and ``checkpoint`` keeps the last good epoch.
    """
    if elbo not in ELBOS:
        raise UsageError(f"unknown elbo {elbo!r}; choose one of: {', '.join(ELBOS)}")
    if epochs < 1:
        raise UsageError(f"epochs={epochs}: fit would train nothing; ask for at least 1 epoch")
    if batch_size < 1 or lr <= 0 or beta < 0 or warmup < 0:
        raise UsageError("need batch_size >= 1, lr > 0, beta >= 0, warmup >= 0")
    if temperature_schedule not in TEMPERATURE_SCHEDULES:
        raise UsageError(
            f"unknown temperature schedule {temperature_schedule!r}; "
            f"choose one of: {', '.join(TEMPERATURE_SCHEDULES)}"
        )
    if vae._frozen:
        raise UsageError("the VAE is frozen (inside vae.frozen()); fit it outside that block")
    if not 0 < temperature_floor <= temperature:
        raise UsageError(
            f"need 0 < temperature floor <= temperature, got {temperature_floor} and {temperature}"
        )
    device = resolve_device(device)
    vae.to(device)
    vae.train()
    pyro.set_rng_seed(seed)
    dtype = vae._a_parameter().dtype
    batches = _batches(vae, train, batch_size, device, seed, num_workers)
    # a streamed data set is seen one batch at a time: float batches are checked as they come
    check_batches = not isinstance(train, torch.Tensor) and _first(train[0]).is_floating_point()
    test_x = None if test is None else _held_out(vae, test, device).to(dtype)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    run = _Progress()
    history = History()
    if resume and checkpoint is not None and Path(checkpoint).exists():
        history, run = _restore(vae, optimizer, checkpoint, device, lr)
        if run.epoch >= epochs:
            warnings.warn(
                f"{checkpoint} already holds {run.epoch} epochs, so fit(epochs={epochs}) "
                "trained nothing; ask for more epochs to continue the run",
                stacklevel=2,
            )
    else:
        _check_gaussian_scale(vae, train)

    def save(**extra) -> None:
        if checkpoint is not None:
            save_checkpoint(
                checkpoint,
                vae,
                optimizer=optimizer.state_dict(),
                progress=asdict(run),
                history=history.to_rows(),
                rng=_rng_state(),
                **extra,
            )

    loss_fn = ELBOS[elbo]()
    # The PyroModule wrappers of model and guide put every parameter through Pyro's param
    # store on each call (a message per tensor). fit optimizes vae.parameters() itself, so
    # it runs the bodies without that registration, which costs ~0.5 ms a step; only
    # JitTrace_ELBO needs it, since it compiles param-store parameters as graph inputs.
    # The model's body also skips the mean image that model() returns and the ELBO
    # ignores (unless a subclass overrides model). Both are bound once: JitTrace_ELBO
    # keys its compiled graph on their identity.
    if elbo == "jit":
        model, guide = vae.model, vae.guide
    else:
        body = type(vae)._model_body if type(vae).model is VAE.model else type(vae).model
        model = functools.partial(getattr(body, "__wrapped__", body), vae)
        guide = functools.partial(type(vae).guide.__wrapped__, vae)
    warmup_steps = warmup * len(batches)
    anneal_steps = (epochs if temperature_anneal is None else temperature_anneal) * len(batches)
    # only latents with a relaxation have a temperature
    anneals = hasattr(vae.latent, "temperature")

    def temperature_after(steps: int) -> float:
        schedule = temperature, temperature_floor, temperature_schedule, anneal_steps
        return temperature_at(steps, *schedule)

    with pyro.get_param_store().scope(), _DeferredInterrupt() as interrupt:
        try:
            while run.epoch < epochs:
                start = time.perf_counter()
                bar = tqdm(
                    batches.epoch(run.epoch, run.batch),
                    total=len(batches),
                    initial=run.batch,
                    desc=f"epoch {run.epoch + 1}/{epochs}",
                    disable=not progress,
                    leave=False,
                )
                for images in bar:
                    x = preprocess(images, vae.likelihood.preprocessing).to(dtype)
                    weight = kl_weight_at(run.step, beta, warmup_steps)
                    if anneals:
                        # as the KL warm-up does, step n uses the value reached after n + 1 steps,
                        # so the last step of the annealing is at the floor
                        vae.latent.temperature = temperature_after(run.step + 1)
                    if check_batches:
                        vae.likelihood.check_data(x)
                    # The data were checked against the likelihood's support before training
                    # (and NaN parameters surface as a non-finite loss below), so Pyro's
                    # per-step argument and support checks would only repeat that work.
                    with vae.kl_weight(weight), pyro.validation_enabled(False):
                        loss = loss_fn.differentiable_loss(
                            model, guide, x, num_data=batches.num_data
                        )
                    value = loss.item()
                    if not math.isfinite(value):
                        raise TrainingDivergedError(run.step + 1, value)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    run.advance(value / batches.num_data, x.shape[0])
                    if run.batch % 10 == 0:
                        bar.set_postfix(loss=f"{run.loss_sum / run.images:.2f}")
                    if interrupt.requested:
                        raise KeyboardInterrupt
                run.seconds += time.perf_counter() - start
                test_elbo = None
                if test_x is not None:
                    vae.eval()
                    test_elbo = evaluate.elbo(vae, test_x).mean().item()
                    vae.train()
                history.epochs.append(
                    EpochRecord(
                        epoch=run.epoch + 1,
                        step=run.step,
                        train_loss=run.loss_sum / max(run.images, 1),
                        test_elbo=test_elbo,
                        seconds=run.seconds,
                        kl_weight=kl_weight_at(run.step - 1, beta, warmup_steps),
                        temperature=temperature_after(run.step) if anneals else None,
                        lr=lr,
                    )
                )
                if progress:
                    tqdm.write(history.epochs[-1].summary(epochs))
                run.next_epoch()
                save()
                if on_epoch is not None:
                    on_epoch(history.epochs[-1])
        except KeyboardInterrupt:
            run.seconds += time.perf_counter() - start
            save()
            raise
    vae.eval()
    return history


class _DeferredInterrupt:
    """Turns the first Ctrl-C into a request that the loop honours between two steps,
    so the checkpoint written on interruption holds a consistent state (weights,
    optimizer, progress and RNG all after the same step). A second Ctrl-C stops at once.
    Outside the main thread, where handlers cannot be set, Ctrl-C acts as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class _Progress:
    """Where a run stands; stored in checkpoints so a resumed run picks up mid-epoch."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    images: int = 0
    seconds: float = 0.0

    def advance(self, loss_per_image: float, batch_images: int) -> None:
        # the loss is scaled to the whole data set; weigh it by the batch's share
        self.loss_sum += loss_per_image * batch_images
        self.images += batch_images
        self.batch += 1
        self.step += 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch, self.loss_sum, self.images, self.seconds = 0, 0.0, 0, 0.0


def _check_shape(vae, shape: tuple[int, ...], what: str) -> None:
    if tuple(shape) != vae.config.image_shape:
        got = "x".join(map(str, shape))
        want = "x".join(map(str, vae.config.image_shape))
        kind = "images are {} (C x H x W)" if len(vae.config.image_shape) == 3 else "vectors are {}"
        raise DataError(f"{what} {kind.format(got)} but the model expects {want}")


def _first(item):
    """The image of a data set item: the item itself, or the first of a tuple such as
    ``(image, label)``."""
    return item[0] if isinstance(item, (tuple, list)) else item


def _check_tensor(vae, data: torch.Tensor, what: str) -> None:
    if not isinstance(data, torch.Tensor):
        raise DataError(f"{what} data must be a tensor or a Dataset, got {type(data).__name__}")
    dims = 1 + len(vae.config.image_shape)
    if data.dim() != dims or data.shape[0] == 0:
        layout = "(N, C, H, W)" if dims == 4 else "(N, D)"
        raise DataError(
            f"{what} data must be a non-empty {layout} tensor, got {tuple(data.shape)}"
        )
    _check_shape(vae, data.shape[1:], what)


def _batches(vae, train, batch_size: int, device: torch.device, seed: int, num_workers: int):
    if isinstance(train, torch.Tensor):
        _check_tensor(vae, train, "training")
        if train.is_floating_point():
            vae.likelihood.check_data(train)
        return TensorBatches(train, batch_size, device, seed)
    if not isinstance(train, Dataset):
        raise DataError(
            f"training data must be a tensor or a Dataset, got {type(train).__name__}"
        )
    if len(train) == 0:
        raise DataError("the training set is empty")
    _check_shape(vae, _first(train[0]).shape, "training")
    return LoaderBatches(train, batch_size, device, seed, num_workers)


def _check_gaussian_scale(vae, train) -> None:
    """Stop a fresh run whose learned Gaussian sigma starts far from the data's scale.

    Adam moves the raw sigma by about the learning rate per step, so a sigma that starts
    100 times too small or too large takes many thousands of steps to arrive, and the
    reconstruction term is mis-weighted against the KL all the while.
    """
    likelihood = vae.likelihood
    if not isinstance(likelihood, GaussianLikelihood) or not likelihood.learned:
        return
    # a fixed sample and seed: checking must not move the run's random stream
    if isinstance(train, torch.Tensor):
        sample = train[:10_000]
    else:
        sample = torch.stack([_first(train[i]) for i in range(min(len(train), 256))])
    spread = fixed_preprocess(sample, likelihood.preprocessing).float().std().item()
    sigma = likelihood.sigma.detach().median().item()
    if spread > 0 and not 0.01 <= spread / sigma <= 100:
        raise DataError(
            f"the gaussian likelihood's sigma starts at {sigma:.3g} but the data's standard "
            f"deviation is {spread:.3g}, too far apart for a learned sigma to catch up; "
            f"standardize the data, or build the VAE with sigma_init={spread / 3:.3g} "
            "(about a third of the data's spread; 0.1 suits pixels in [0, 1])"
        )


def _held_out(vae, test: torch.Tensor, device: torch.device) -> torch.Tensor:
    _check_tensor(vae, test, "test")
    x = fixed_preprocess(test.to(device), vae.likelihood.preprocessing)
    vae.likelihood.check_data(x)
    return x


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(vae, optimizer, checkpoint, device, lr: float) -> tuple[History, _Progress]:
    state = load_checkpoint(checkpoint, map_location=device)
    check_config(state["config"], vae.config, checkpoint)
    vae.load_state_dict(state["model"])
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
        # Adam's moments carry over, but the rate is the one asked for now (the saved one
        # would silently override it): a run can go on at a lower rate, a step decay
        for group in optimizer.param_groups:
            group["lr"] = lr
    rng = state.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    return History.from_rows(state.get("history", [])), _Progress(**state.get("progress", {}))
