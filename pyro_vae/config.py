"""The one configuration object: the constructor's arguments, and what a checkpoint stores."""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields

from .errors import UsageError

LIKELIHOODS = ("bernoulli", "continuous-bernoulli", "gaussian")
LATENTS = ("gaussian", "relaxed-categorical")
ARCHS = ("mlp", "conv")
GAUSSIAN_SIGMAS = ("shared", "pixel", "fixed")


@dataclass(frozen=True)
class VAEConfig:
    """Everything needed to rebuild a :class:`~pyro_vae.VAE`, and nothing else.

    A checkpoint stores this dataclass as a plain dict, so a saved model is rebuilt
    from its config without pickling any class of ours.
    """

    #: (channels, height, width) of one image; MNIST is (1, 28, 28). For tabular data or
    #: other vectors, (D,): one data point of D numbers (MLP nets only).
    image_shape: tuple[int, ...] = (1, 28, 28)
    #: p(x | z): "bernoulli" for binary pixels, "continuous-bernoulli" or "gaussian" for grey.
    likelihood: str = "bernoulli"
    #: the latent family; "gaussian" is N(0, I) with a diagonal Normal guide,
    #: "relaxed-categorical" discrete codes trained with the Gumbel-softmax relaxation.
    latent: str = "gaussian"
    #: "mlp" (fully connected) or "conv" (strided convolutions, 4x down/up-sampling).
    arch: str = "mlp"
    #: size of z. 50 matches Pyro's VAE example and Burda et al.'s one-layer models.
    latent_dim: int = 50
    #: hidden units of each MLP layer, and of the conv nets' fully connected layer.
    #: 400 is Pyro's VAE example.
    hidden: int = 400
    #: hidden layers of each MLP (encoder and decoder alike); 1 is Pyro's VAE example,
    #: 2 the deterministic layers of Burda et al.'s one-stochastic-layer models.
    depth: int = 1
    #: channels of the conv nets' first feature maps (the second has twice as many).
    channels: int = 32
    #: Gaussian likelihood only: "shared" learns one sigma for all pixels, "pixel" one per
    #: pixel, "fixed" keeps ``sigma_init``. A learned sigma calibrates reconstruction against
    #: KL (sigma -> root mean squared error); sigma = 1 on [0, 1] pixels drowns the
    #: reconstruction term and gives blurry means.
    gaussian_sigma: str = "shared"
    #: starting (or fixed) sigma of the Gaussian likelihood, in the data's units: 0.1 suits
    #: pixels in [0, 1]; for other data, about a third of its standard deviation (``fit``
    #: stops with a message when a learned sigma starts far from the data's scale).
    sigma_init: float = 0.1
    #: lower bound of a learned sigma: the size of the 8-bit quantization noise
    #: (1 / 256 / sqrt(12) ~ 1.1e-3), below which a density on dequantized pixels means nothing.
    sigma_floor: float = 1e-3
    #: relaxed-categorical, MLP only: number of independent codes (groups). 30 groups of
    #: 10 classes is the MNIST model of Jang, Gu & Poole (2017). With arch "conv" the codes
    #: are a grid of (height / 4) x (width / 4) instead.
    groups: int = 30
    #: relaxed-categorical: classes per code, i.e. the codebook size of the tokenizer.
    classes: int = 10
    #: relaxed-categorical: straight-through Gumbel-softmax (one-hot samples in training,
    #: gradients of the relaxed sample) instead of the plain relaxation.
    straight_through: bool = False
    #: prefix of every Pyro site and parameter name, so two VAEs can share one Pyro program.
    name: str = "vae"

    def __post_init__(self) -> None:
        _check_choice("likelihood", self.likelihood, LIKELIHOODS)
        _check_choice("latent", self.latent, LATENTS)
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("gaussian_sigma", self.gaussian_sigma, GAUSSIAN_SIGMAS)
        shape = tuple(int(s) for s in self.image_shape)
        if len(shape) not in (1, 3) or min(shape) < 1:
            raise UsageError(
                f"image_shape must be (channels, height, width) for images or (D,) for "
                f"vectors, got {self.image_shape}"
            )
        object.__setattr__(self, "image_shape", shape)
        if self.arch == "conv" and len(shape) != 3:
            raise UsageError(
                f"arch 'conv' needs images (channels, height, width), got image_shape {shape}; "
                "use arch 'mlp' for vectors"
            )
        if self.arch == "conv" and (shape[1] % 4 or shape[2] % 4):
            raise UsageError(
                f"arch 'conv' halves the image twice, so height and width must be multiples "
                f"of 4; got {shape[1]} x {shape[2]} (resize the images, or use arch 'mlp')"
            )
        for key in ("latent_dim", "hidden", "depth", "channels", "groups"):
            if getattr(self, key) < 1:
                raise UsageError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.classes < 2:
            raise UsageError(f"classes must be at least 2, got {self.classes}")
        if not 0 < self.sigma_floor <= self.sigma_init:
            raise UsageError(
                f"need 0 < sigma_floor <= sigma_init, got {self.sigma_floor} and {self.sigma_init}"
            )
        if not self.name or any(c in self.name for c in " /"):
            raise UsageError(
                f"name must be a non-empty string without spaces or '/', got {self.name!r}"
            )

    @property
    def num_pixels(self) -> int:
        """Dimension D of one data point (channels x height x width for an image)."""
        return math.prod(self.image_shape)

    def to_dict(self) -> dict:
        """A plain dict (lists, numbers, strings) fit for JSON and ``weights_only`` checkpoints."""
        out = asdict(self)
        out["image_shape"] = list(self.image_shape)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> VAEConfig:
        """Rebuild a config, naming any key that this version does not know."""
        check_fields(cls, values)
        return cls(**{**values, "image_shape": tuple(values.get("image_shape", (1, 28, 28)))})


def check_fields(cls: type, values: dict, error: type[Exception] = UsageError) -> None:
    """Raise ``error`` naming every key of ``values`` that is not a field of the dataclass
    ``cls`` (a config or run written by another version, edited by hand, or a mistyped
    keyword), with the closest field's name where one is close, and the valid ones."""
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise error(
            f"unknown {cls.__name__} field(s): {', '.join(hints)}; "
            f"the fields are: {', '.join(names)}"
        )


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"unknown {key} {value!r}; choose one of: {', '.join(choices)}")
