"""fit(): stochastic variational inference on a VAE, in the package's one training loop.

Each step is the textbook SVI step, with a PyTorch optimizer over the VAE's parameters:
a Pyro ELBO's ``differentiable_loss`` of the model and guide on one mini-batch (scaled to
the data set by the model's plate), ``backward``, ``step``. This module says what is
particular to the VAE (:class:`VAEObjective`: the ELBO as a module, the KL warm-up and
temperature schedules, the held-out ELBO of each epoch) and :mod:`pyro_vae.engine` runs
it: devices, processes, precision, checkpoints and the rest, as for every model here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro.infer import ELBO, JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.runtime import am_i_wrapped
from torch import nn
from torch.utils.data import Dataset

from . import engine, evaluate
from .data import (
    HeldOut,
    LoaderBatches,
    TensorBatches,
    check_shape,
    check_tensor,
    fixed_preprocess,
)
from .engine import Objective
from .errors import DataError, UsageError
from .fused import FusedTrace_ELBO, FusedTraceMeanField_ELBO, fused_loss, recognise
from .history import EpochRecord, History
from .likelihoods import GaussianLikelihood
from .objectives import IWAE_ELBO
from .run import Run

#: fit's estimators. "trace" and "meanfield" are Pyro's Trace_ELBO and TraceMeanField_ELBO
#: as subclasses that compute the package's own VAE without tracing it (pyro_vae.fused;
#: equal in value and gradient, tested); the "-pyro" names are Pyro's own classes;
#: "iwae" the importance-weighted bound (pyro_vae.objectives; 5 particles, IWAE gradient:
#: pass an IWAE_ELBO for others).
ELBOS = {
    "trace": FusedTrace_ELBO,
    "meanfield": FusedTraceMeanField_ELBO,
    "trace-pyro": Trace_ELBO,
    "meanfield-pyro": TraceMeanField_ELBO,
    "jit": JitTrace_ELBO,
    "iwae": IWAE_ELBO,
}


def make_elbo(elbo: str | ELBO) -> ELBO:
    """The ELBO ``fit`` trains with: one of :data:`ELBOS` by name, or a Pyro ELBO as given
    (e.g. ``IWAE_ELBO(50, "dreg")``)."""
    if isinstance(elbo, ELBO):
        return elbo
    if elbo not in ELBOS:
        raise UsageError(f"unknown elbo {elbo!r}; choose one of: {', '.join(ELBOS)}")
    return ELBOS[elbo]()


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


@dataclass(frozen=True)
class Temperature:
    """The Concrete temperature schedule of a relaxed-categorical latent (ignored by
    latents without one); it follows optimizer steps, so a resumed run continues it.

    :param start: the temperature at the start of training.
    :param floor: the temperature at the end of the annealing, and after it.
    :param schedule: "exponential", "cosine" or "constant" (see :func:`temperature_at`).
    :param anneal: epochs over which the temperature falls to the floor (default: all).
    """

    start: float = 1.0
    floor: float = 0.5
    schedule: str = "exponential"
    anneal: float | None = None

    def __post_init__(self) -> None:
        if self.schedule not in TEMPERATURE_SCHEDULES:
            raise UsageError(
                f"unknown temperature schedule {self.schedule!r}; "
                f"choose one of: {', '.join(TEMPERATURE_SCHEDULES)}"
            )
        if not 0 < self.floor <= self.start:
            raise UsageError(
                f"need 0 < temperature floor <= temperature, got {self.floor} and {self.start}"
            )


def fit(
    vae,
    train: torch.Tensor | Dataset,
    test: torch.Tensor | None = None,
    *,
    batch_size: int = 256,
    beta: float = 1.0,
    warmup: float = 0.0,
    elbo: str | ELBO = "trace",
    temperature: Temperature | None = None,
    num_workers: int = 2,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    run: Run | None = None,
) -> History:
    """Train ``vae`` by SVI on ``train`` and return the per-epoch :class:`History`.

    Training runs in the package's one loop (:mod:`pyro_vae.engine`) on Lightning
    Fabric, as ``run`` (a :class:`~pyro_vae.run.Run`: epochs, learning rate, seed,
    devices, precision, checkpoint, loggers, ``compile``...) says, so the same call
    trains on a CPU, a GPU, or many GPUs on many nodes.

    :param train: ``(N, C, H, W)`` images (``(N, D)`` vectors for a VAE of vectors), held
        on the device and batched by shuffled index; uint8 images are binarized afresh
        each batch (Bernoulli likelihood) or dequantized (continuous ones), floating-point
        data is used as it is, in the model's dtype. A ``Dataset`` of images (e.g.
        :class:`~pyro_vae.data.ImageFolder`), or of ``(image, label, ...)`` tuples such as
        a ``TensorDataset`` or a torchvision data set, whose first element is taken, is
        streamed through a ``DataLoader`` with ``num_workers`` workers instead.
    :param test: held-out images; their ELBO is recorded after each epoch. uint8 test
        images get one fixed, seeded binarization or dequantization.
    :param batch_size: images per step in each process (a step of ``W`` processes sees
        ``W * batch_size`` images).
    :param beta: weight of the KL term (1 is the true ELBO), applied with
        ``poutine.scale`` to the latent site in both model and guide.
    :param warmup: epochs over which the KL weight ramps linearly from 0 to ``beta``.
    :param elbo: "trace" (``Trace_ELBO``, the default) or "meanfield"
        (``TraceMeanField_ELBO``, analytic KL where it exists), each as its fused subclass
        (:mod:`pyro_vae.fused`: the package's own VAE computed without Pyro's tracing, equal
        in value and gradient); "trace-pyro" and "meanfield-pyro" run Pyro's own classes;
        "jit" is ``JitTrace_ELBO``, which compiles the KL weight and the temperature as
        constants, so it refuses a warm-up or an annealed temperature; "iwae" is the
        per-image importance-weighted bound (:class:`~pyro_vae.objectives.IWAE_ELBO`, 5
        particles). A Pyro ELBO instance is used as given, e.g. ``IWAE_ELBO(50, "dreg")``
        for 50 particles and doubly-reparameterized gradients (computed for the package's
        VAE without tracing, as the fused classes are). ``run.compile`` needs "trace" or
        "meanfield". Under "iwae" the KL warm-up weighs the latent terms inside each log
        weight (``log p(x|z) + beta (log p(z) - log q(z|x))``).
    :param temperature: the Concrete temperature schedule (:class:`Temperature`) of a
        relaxed-categorical latent.
    :param on_epoch: called (in the first process) with each epoch's record once its
        checkpoint is written, e.g. to log when ``run.progress`` is off, or, in a run of
        one process, to stop early by raising (under ``ddp_spawn`` it runs after training).
    :param run: the run's settings (default ``Run()``: 10 epochs at lr 1e-3, one process).
        ``run.seed`` seeds the shuffling and the noise of training; the weights were drawn
        when the VAE was built, so for a run reproducible from scratch call
        ``pyro.set_rng_seed(seed)`` before ``VAE(...)``. With ``run.resume`` the run goes
        on from ``run.checkpoint`` (its config must match ``vae.config``, its number of
        processes the run's).
    :raises TrainingDivergedError: when the loss stops being finite; the bad step is
        not applied, and the checkpoint keeps the last good epoch.
    """
    run = run or Run()
    temperature = temperature or Temperature()
    _check_options(vae, elbo, batch_size, beta, warmup, temperature, run)
    vae.cpu().train()
    batches = _batches(vae, train, batch_size, run.seed, num_workers)
    held_out = None
    if test is not None:
        held_out = HeldOut.of(test, vae.config.image_shape, vae.likelihood)
    if not run.resuming:
        _check_gaussian_scale(vae, train)
    objective = VAEObjective(
        vae, held_out, elbo=elbo, num_data=batches.num_data, compile=run.compile,
        beta=beta, warmup=warmup, temperature=temperature, epochs=run.epochs,
    )  # fmt: skip
    history = engine.train(objective, batches, run, on_epoch)
    vae.eval()
    return history


def _check_options(vae, elbo, batch_size, beta, warmup, temperature: Temperature, run) -> None:
    """Refuse, before any work, options that cannot train this VAE, naming the fix."""
    elbo = make_elbo(elbo)
    if batch_size < 1 or warmup < 0:
        raise UsageError(f"need batch_size >= 1 and warmup >= 0, got {batch_size} and {warmup}")
    if not beta > 0:
        raise UsageError(
            f"beta={beta}: the KL weight must be positive (Pyro scales the latent site by "
            "it, and a scale of 0 is not allowed); for almost no KL use a small beta, 1e-3"
        )
    if vae.is_frozen:
        raise UsageError("the VAE is frozen (inside vae.frozen()); fit it outside that block")
    anneals = hasattr(vae.latent, "temperature") and temperature.schedule != "constant"
    if isinstance(elbo, JitTrace_ELBO) and (warmup > 0 or anneals):
        raise UsageError(
            "elbo='jit' compiles the KL weight and the Concrete temperature into its graph "
            "as constants, so a KL warm-up or an annealed temperature would stay at its "
            "first value; use elbo='trace' (or a constant schedule with no warm-up)"
        )


class ELBOLoss(nn.Module):
    """The negative ELBO of a VAE's model and guide on a batch, as a module: Pyro's loss
    is not the VAE's forward call, so this is what data-parallel training wraps.

    With a fused ELBO ("trace", "meanfield") and the package's own VAE, the loss is
    :meth:`~pyro_vae.VAE.elbo_loss`; ``compile`` then runs it through ``torch.compile``
    (one graph per batch shape: the full batches and the last, smaller one), with the KL
    weight and temperature as tensor inputs so that their schedules reach the graph.
    Any other program goes through Pyro's ELBO as it is.

    :param weight: the KL weight of the next step, set by the schedule.
    """

    def __init__(self, vae, elbo: str | ELBO, num_data: int, compile: bool | str = False):
        super().__init__()
        self.vae = vae
        self.elbo = make_elbo(elbo)
        self.num_data = num_data
        self.weight = 1.0
        self.compile = compile
        self._analytic_kl = isinstance(self.elbo, TraceMeanField_ELBO)
        self._iwae = isinstance(self.elbo, IWAE_ELBO)
        # the fused route, decided once: a fused ELBO class, and a program it recognises
        fusing = isinstance(self.elbo, (FusedTrace_ELBO, FusedTraceMeanField_ELBO, IWAE_ELBO))
        self._direct = fusing and self.fused()
        if compile and (self._iwae or not self._direct):
            raise UsageError(
                "compile=True compiles the fused ELBO of the package's own VAE, so it needs "
                f"elbo 'trace' or 'meanfield' (not {elbo!r}) and a VAE whose class does not "
                "override model, guide or elbo_loss"
            )

    def fused(self) -> bool:
        """Whether the fused ELBO computes this VAE (see :func:`pyro_vae.fused.fused_loss`)."""
        vae = self.vae
        probe = (torch.empty(0),), {"num_data": self.num_data}
        if self._iwae:
            return recognise(vae.model, vae.guide, *probe) is not None
        return fused_loss(self.elbo, vae.model, vae.guide, *probe) is not None

    def forward(self, x: torch.Tensor | engine.Batch) -> torch.Tensor:
        x = engine.unwrap(x)
        if self.compile:
            return self._compiled_loss(x)
        model, guide = self._programs()
        if self._direct and not am_i_wrapped():
            # what the fused ELBO's differentiable_loss computes for this VAE with no Pyro
            # handler active, minus the per-step recognition of the program (done once,
            # in __init__) and the KL-weight context: tens of microseconds a step
            if self._iwae:
                return self._iwae_loss(x)
            return self.vae.elbo_loss(
                x, num_data=self.num_data, analytic_kl=self._analytic_kl, kl_weight=self.weight
            )
        with self.vae.kl_weight(self.weight):
            return self.elbo.differentiable_loss(model, guide, x, num_data=self.num_data)

    def _iwae_loss(self, x: torch.Tensor) -> torch.Tensor:
        elbo = self.elbo
        loss, surrogate = self.vae.iwae_loss(
            x, num_data=self.num_data, num_particles=elbo.num_particles,
            estimator=elbo.estimator, kl_weight=self.weight,
        )  # fmt: skip
        return loss.detach() + (surrogate - surrogate.detach())

    def _programs(self):
        # bound once: JitTrace_ELBO keys its compiled graph on the programs' identity.
        # Fused ELBOs recognise vae.model and vae.guide; Pyro's own run the lighter
        # programs that skip registering parameters (see VAE.programs)
        if not hasattr(self, "_bound"):
            vae = self.vae
            jit = isinstance(self.elbo, JitTrace_ELBO)
            self._bound = (vae.model, vae.guide) if jit or self._direct else vae.programs()
        return self._bound

    def _compiled_loss(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "_step"):
            analytic_kl, vae, num_data = self._analytic_kl, self.vae, self.num_data

            def step(x, kl_weight, temperature):
                return vae.elbo_loss(
                    x,
                    num_data=num_data,
                    analytic_kl=analytic_kl,
                    kl_weight=kl_weight,
                    temperature=temperature,
                )

            mode = None if self.compile is True else self.compile
            self._step = torch.compile(step, mode=mode, dynamic=False)
            self._inputs = x.new_ones(()), x.new_ones(())
        kl_weight, temperature = self._inputs
        # in place, on the device: no recompilation, no host synchronisation
        kl_weight.fill_(self.weight)
        temperature.fill_(getattr(self.vae.latent, "temperature", 1.0))
        return self._step(x, kl_weight, temperature)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_bound", "_step", "_inputs"):  # rebuilt in each process
            state.pop(name, None)
        return state


class VAEObjective(Objective):
    """How :func:`fit` trains a VAE in the engine: the ELBO, the KL warm-up and the
    Concrete temperature schedules, and the held-out ELBO as the epoch's metric."""

    def __init__(
        self,
        vae,
        held_out: HeldOut | None,
        *,
        elbo: str | ELBO,
        num_data: int,
        compile: bool | str = False,
        beta: float,
        warmup: float,
        temperature: Temperature,
        epochs: int,
    ):
        self.model = vae
        self.epochs = epochs
        self.module = ELBOLoss(vae, elbo, num_data, compile)
        self.held_out = held_out
        self.beta, self.warmup = beta, warmup
        self.temperature = temperature
        # only latents with a relaxation have a temperature
        self.has_temperature = hasattr(vae.latent, "temperature")

    def prepare(self, rank: int, world: int, device, dtype, steps: int) -> None:
        self.warmup_steps = self.warmup * steps
        t = self.temperature
        anneal_steps = (self.epochs if t.anneal is None else t.anneal) * steps
        self.schedule = (t.start, t.floor, t.schedule, anneal_steps)
        # each process scores its own slice of the held-out images
        held_out = self.held_out
        self.local_test = None if held_out is None else held_out.shard(rank, world, device, dtype)

    def kl_weight(self, step: int) -> float:
        return kl_weight_at(step, self.beta, self.warmup_steps)

    def temperature_after(self, steps: int) -> float:
        return temperature_at(steps, *self.schedule)

    def before_step(self, step: int) -> None:
        self.module.weight = self.kl_weight(step)
        if self.has_temperature:
            # as the KL warm-up does, step n uses the value reached after n + 1 steps,
            # so the last step of the annealing is at the floor
            self.model.latent.temperature = self.temperature_after(step + 1)

    def metrics(self, reduce, step: int) -> dict:
        test_elbo = None
        if self.local_test is not None:
            x = self.local_test.data
            values = evaluate.elbo(self.model, x) if len(x) else None
            local = x.new_zeros(2, dtype=torch.float64)
            if values is not None:
                local = torch.stack([values.double().sum(), local.new_tensor(len(values))])
            total = reduce(local)
            test_elbo = (total[0] / total[1]).item()
        return {
            "test_elbo": test_elbo,
            "kl_weight": self.kl_weight(step - 1),
            "temperature": self.temperature_after(step) if self.has_temperature else None,
        }

    @torch.no_grad()
    def images(self) -> dict[str, torch.Tensor]:
        vae = self.model
        if len(vae.config.image_shape) != 3:
            return {}
        shown = {"samples": vae.sample(16)}
        if self.local_test is not None and len(self.local_test):
            x = self.local_test.data[:8]
            shown["reconstructions"] = torch.cat([x, vae.reconstruct(x)])
        return shown


def _first(item):
    """The image of a data set item: the item itself, or the first of a tuple such as
    ``(image, label)``."""
    return item[0] if isinstance(item, (tuple, list)) else item


def _batches(vae, train, batch_size: int, seed: int, num_workers: int):
    """The batch source of ``train``: shuffled, shardable, preprocessed for the likelihood
    (see :mod:`pyro_vae.data`); the engine prepares it for each process."""
    how, check = vae.likelihood.preprocessing, vae.likelihood.check_data
    if isinstance(train, torch.Tensor):
        check_tensor(vae.config.image_shape, train, "training")
        return TensorBatches(train, batch_size, seed, how, None, check)
    if not isinstance(train, Dataset):
        raise DataError(f"training data must be a tensor or a Dataset, got {type(train).__name__}")
    if len(train) == 0:
        raise DataError("the training set is empty")
    check_shape(vae.config.image_shape, _first(train[0]).shape, "training")
    return LoaderBatches(train, batch_size, seed, num_workers, how, None, check)


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
