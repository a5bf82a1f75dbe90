"""A learned autoregressive prior over a VAE's discrete codes, as a Pyro model.

A relaxed-categorical VAE turns an image into ``L`` tokens of a codebook of ``K`` (a grid
of ``H/4 x W/4`` for conv nets, read in raster order: row by row, left to right; ``groups``
tokens for an MLP). Its own prior is uniform over the codes; a model of the codes that
the encoder actually produces makes better samples (the second stage of the DALL-E
recipe). The generative story::

    for each image n in the data plate "<name>.data":
        t_n ~ prod_i p(t_n,i | t_n,<i, c_n)        # sample site "<name>.tokens", (L,) integers

where ``c_n`` is an optional class (caption) token placed first, and each conditional is a
softmax of a small causal transformer (pre-norm blocks, learned positions, attention by
``torch.nn.functional.scaled_dot_product_attention``). The whole sequence is one sample
site with a :class:`TokenSequence` distribution: ``log_prob`` is the teacher-forced sum
of the per-token log-softmax, ``sample`` draws token by token with a key/value cache, so
``N`` sequences of ``L`` tokens cost ``L`` batched steps.

Training runs in the package's one loop (:mod:`pyro_vae.engine`): :func:`fit_prior`
supplies a :class:`TokenBatches` source and a :class:`TokenPriorObjective`, whose loss is
the negative log-likelihood of a batch scaled to the data set (the model's log joint,
computed without Pyro's tracing; a test shows it equals ``Trace_ELBO``'s).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from os import PathLike

import pyro
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import TorchDistribution, constraints
from pyro.nn import PyroModule
from pyro.poutine.condition_messenger import ConditionMessenger
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.util import is_validation_enabled
from torch import nn

from . import engine, internals
from .config import check_fields
from .data import Batches
from .engine import Objective
from .errors import UsageError
from .history import EpochRecord, History
from .likelihoods import full_precision
from .run import Run
from .sites import NamedSites, pyro_program

#: held-out sequences scored at once by :meth:`TokenPriorObjective.metrics`.
EVAL_CHUNK = 1024


# ---------------------------------------------------------------------------- config
#: The sampling temperature of the commands' pictures and images (``pyro-vae generate``,
#: ``fit-prior``'s samples.png); the library's own default stays 1, the fitted
#: distribution. A prior fitted to posterior draws reproduces the posterior's spread; at
#: 0.6 its MNIST images were the asked digit 98.7% of the time against 89.5% at 1, and
#: nearest the test set in Fréchet distance (13.2; 44.6 at 1, 21.9 at 0.8, 27.9 at 0.4):
#: docs/benchmarks.md, "The token prior's figures".
COMMAND_TEMPERATURE = 0.6


@dataclass(frozen=True)
class TokenPriorConfig:
    """Everything needed to rebuild a :class:`TokenPrior`, and nothing else; a checkpoint
    stores it as a plain dict."""

    #: values a token takes: the codebook size of the VAE whose codes are modelled
    #: (``VAEConfig.classes``).
    vocab_size: int
    #: tokens per image: ``(H / 4) * (W / 4)`` for a conv VAE's grid (in raster order),
    #: ``groups`` for an MLP's. Also the number of learned positions.
    length: int
    #: 0 for an unconditional prior; else the number of classes (captions), one of which
    #: is placed before the tokens and conditions every one of them.
    num_classes: int = 0
    #: transformer blocks. Four small blocks model 49 MNIST codes well and sample fast.
    n_layer: int = 4
    #: attention heads per block (must divide ``n_embd``).
    n_head: int = 4
    #: width of the residual stream; the MLP of each block is four times as wide.
    n_embd: int = 128
    #: dropout on attention weights and residual branches in training (0: none; a few
    #: thousand sequences of 49 tokens rarely need it).
    dropout: float = 0.0
    #: prefix of the Pyro sites and parameters, so that a prior and its VAE (or two
    #: priors) share one Pyro program.
    name: str = "prior"

    def __post_init__(self) -> None:
        for key, least in (("vocab_size", 2), ("length", 1), ("num_classes", 0),
                           ("n_layer", 1), ("n_head", 1), ("n_embd", 1)):  # fmt: skip
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UsageError(f"{key} must be an integer >= {least}, got {value!r}")
        if self.n_embd % self.n_head:
            raise UsageError(
                f"n_head={self.n_head} must divide n_embd={self.n_embd} (each head gets "
                "an equal slice of the embedding)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if not self.name or any(c in self.name for c in " /"):
            raise UsageError(
                f"name must be a non-empty string without spaces or '/', got {self.name!r}"
            )

    @classmethod
    def for_vae(cls, vae_config, **options) -> TokenPriorConfig:
        """The config of a prior over the codes of a relaxed-categorical VAE of
        ``vae_config`` (a :class:`~pyro_vae.VAEConfig`): its codebook size, and its number
        of codes (the conv grid's, or ``groups``); ``options`` set the other fields."""
        if vae_config.latent != "relaxed-categorical":
            raise UsageError(
                f"a token prior models discrete codes; this VAE's latent is "
                f"{vae_config.latent!r} (use latent='relaxed-categorical')"
            )
        if vae_config.arch == "conv":
            _, height, width = vae_config.image_shape
            length = (height // 4) * (width // 4)
        else:
            length = vae_config.groups
        return cls(vocab_size=vae_config.classes, length=length, **options)

    @property
    def conditional(self) -> bool:
        """Whether the prior is conditioned on a caption (class) per sequence."""
        return self.num_classes > 0

    def to_dict(self) -> dict:
        """A plain dict fit for JSON and ``weights_only`` checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TokenPriorConfig:
        """Rebuild a config, naming any key that this version does not know."""
        check_fields(cls, values)
        return cls(**values)


# ---------------------------------------------------------------------------- the network
class KVCache:
    """The keys and values of the positions computed so far, per layer, so that each step
    of sampling runs the network on the new position only.

    Buffers are made on first use, in the dtype of the keys (half precision under
    autocast), with room for ``length`` positions.
    """

    def __init__(self, layers: int, length: int):
        self.length = length
        #: positions stored so far: the next call starts at this position.
        self.filled = 0
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write ``k`` and ``v`` ``(N, heads, T, head_dim)`` of the new positions of
        ``layer``; return the keys and values of every position up to them."""
        if self.keys[layer] is None:
            n, heads, _, dim = k.shape
            self.keys[layer] = k.new_empty(n, heads, self.length, dim)
            self.values[layer] = v.new_empty(n, heads, self.length, dim)
        end = self.filled + k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self.filled : end] = k
        values[:, :, self.filled : end] = v
        return keys[:, :, :end], values[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which a position sees itself and earlier ones only."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        n, t, width = x.shape
        q, k, v = (
            self.qkv(x).view(n, t, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        )
        past, mask, causal = 0, None, t > 1
        if cache is not None:
            past = cache.filled
            k, v = cache.store(layer, k, v)
        if past and t > 1:
            # new positions after cached ones: the causal mask is aligned bottom-right
            # (new position r sees the past and new positions up to r)
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        return self.proj(y.transpose(1, 2).reshape(n, t, width))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``
    (normalising the branch inputs, not the sum, keeps deep stacks trainable without
    warm-up)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(n_embd)
        self.attention = CausalSelfAttention(n_embd, n_head, dropout)
        self.norm2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.drop(self.attention(self.norm1(x), cache, layer))
        return x + self.drop(self.mlp(self.norm2(x)))


class TokenTransformer(nn.Module):
    """The logits of each token given the ones before it and a start token.

    Position 0 holds the start token (the caption's embedding for a conditional prior, one
    learned vector otherwise), position ``i > 0`` the token ``i - 1``; the output at
    position ``i`` is the logits of token ``i``. So a sequence of ``L`` tokens needs ``L``
    positions, and its last token is never an input.
    """

    def __init__(self, config: TokenPriorConfig):
        super().__init__()
        width = config.n_embd
        self.vocab_size, self.length = config.vocab_size, config.length
        self.token = nn.Embedding(config.vocab_size, width)
        self.start = nn.Embedding(max(config.num_classes, 1), width)
        self.position = nn.Embedding(config.length, width)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(width, config.n_head, config.dropout) for _ in range(config.n_layer)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, config.vocab_size)
        self._initialize(config.n_layer)

    def _initialize(self, n_layer: int) -> None:
        # small weights, so the first predictions are near uniform; the layers that add
        # into the residual stream smaller still, so its variance does not grow with depth
        # (GPT-2's scheme)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for layer in (block.attention.proj, block.mlp[-1]):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * n_layer))

    def new_cache(self) -> KVCache:
        """An empty key/value cache for :meth:`forward`."""
        return KVCache(len(self.blocks), self.length)

    def forward(
        self, starts: torch.Tensor, prefix: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        """The logits ``(N, T, vocab_size)`` of the tokens at the positions computed.

        :param starts: ``(N,)`` start indices (captions; zeros for an unconditional prior).
        :param prefix: ``(N, P)`` tokens, ``P < length``: the logits of tokens ``0..P`` are
            computed (``P + 1`` positions), or, with a ``cache``, those of the positions
            it does not hold yet (the cache then holds all ``P + 1``).
        """
        first, end = (0 if cache is None else cache.filled), prefix.shape[1] + 1
        if end > self.length or first >= end:
            raise UsageError(
                f"a prefix of {prefix.shape[1]} tokens (after {first} cached positions) does "
                f"not fit a prior of {self.length} positions"
            )
        pieces = [self.token(prefix[:, max(first - 1, 0) :])]
        if first == 0:
            pieces.insert(0, self.start(starts).unsqueeze(1))
        positions = torch.arange(first, end, device=prefix.device)
        h = self.drop(torch.cat(pieces, 1) + self.position(positions))
        for layer, block in enumerate(self.blocks):
            h = block(h, cache, layer)
        if cache is not None:
            cache.filled = end
        return self.head(self.norm(h))


# ---------------------------------------------------------------------------- distribution
def sampling_logits(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """``logits / temperature``, with every class below the ``top_k``-th largest set to
    -inf (classes tied with it are kept), in at least float32."""
    logits = full_precision(logits) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return logits


class TokenSequence(TorchDistribution):
    """A distribution over whole sequences of ``L`` tokens, one per element of its batch,
    factored autoregressively by a :class:`TokenTransformer`.

    ``log_prob`` is exact: the sum over positions of each token's log-softmax given the
    tokens before it (teacher forcing, one pass of the network). ``sample`` draws the
    tokens one position at a time with a key/value cache, ``L`` passes over one new
    position each. Both use the same ``temperature`` and ``top_k``, so samples follow the
    distribution that ``log_prob`` scores (a sequence with a token outside the top ``k``
    has probability 0).

    :param net: the network.
    :param starts: ``(*batch_shape)`` integer start indices (captions, or zeros).
    :param temperature: divides the logits: below 1 sharper, above 1 flatter.
    :param top_k: keep the ``k`` most likely tokens at each position (None: all).
    """

    arg_constraints: dict = {}
    has_enumerate_support = False

    def __init__(
        self,
        net: TokenTransformer,
        starts: torch.Tensor,
        temperature: float = 1.0,
        top_k: int | None = None,
        validate_args: bool | None = None,
    ):
        if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
            raise UsageError(f"temperature must be a finite number > 0, got {temperature!r}")
        vocab = net.vocab_size
        if top_k is not None and (isinstance(top_k, bool) or not 1 <= int(top_k) <= vocab):
            raise UsageError(f"top_k must be an integer in 1..{vocab} or None, got {top_k!r}")
        self.net, self.starts = net, starts
        self.temperature, self.top_k = float(temperature), None if top_k is None else int(top_k)
        super().__init__(starts.shape, torch.Size((net.length,)), validate_args=validate_args)

    @property
    def support(self):
        """Sequences of integers in ``0..vocab_size - 1``."""
        return constraints.independent(constraints.integer_interval(0, self.net.vocab_size - 1), 1)

    def expand(self, batch_shape, _instance=None) -> TokenSequence:
        """The same distribution over more sequences (a plate's, or Predictive's samples):
        the start indices broadcast to ``batch_shape``; the network is shared."""
        new = self._get_checked_instance(TokenSequence, _instance)
        batch_shape = torch.Size(batch_shape)
        new.net, new.starts = self.net, self.starts.expand(batch_shape)
        new.temperature, new.top_k = self.temperature, self.top_k
        validate = self._validate_args  # whether this one checks its values, the copy does too
        super(TokenSequence, new).__init__(batch_shape, self.event_shape, validate_args=validate)
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``log p(value)`` of each sequence ``(..., L)``: one teacher-forced pass."""
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        length = self.net.length
        tokens = value.long().expand(*shape, length).reshape(-1, length)
        starts = self.starts.expand(shape).reshape(-1)
        logits = sampling_logits(self.net(starts, tokens[:, :-1]), self.temperature, self.top_k)
        per_token = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return per_token.sum(-1).reshape(shape)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """Draw ``(*sample_shape, *batch_shape, L)`` tokens, position by position, each
        step running the network on the new position only (its KV cache)."""
        shape = self._extended_shape(sample_shape)[:-1]
        starts = self.starts.expand(shape).reshape(-1)
        length, n = self.net.length, starts.shape[0]
        tokens = starts.new_zeros(n, length, dtype=torch.long)
        cache = self.net.new_cache()
        with torch.no_grad():
            for i in range(length):
                logits = self.net(starts, tokens[:, :i], cache)[:, -1]
                probs = sampling_logits(logits, self.temperature, self.top_k).softmax(-1)
                tokens[:, i] = torch.multinomial(probs, 1).squeeze(-1)
        return tokens.reshape(*shape, length)


def _is_integer(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds integers (not floats, complex numbers or booleans)."""
    dtype = tensor.dtype
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def to_grid(tokens: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Sequences ``(..., L)`` as grids ``(..., height, width)`` in raster order (row by
    row, left to right): the layout of a conv VAE's codes (``vae.tokenize``)."""
    height, width = shape
    if tokens.dim() < 1 or tokens.shape[-1] != height * width:
        raise UsageError(
            f"tokens of shape {tuple(tokens.shape)} do not make {height} x {width} grids"
        )
    return tokens.reshape(*tokens.shape[:-1], height, width)


# ---------------------------------------------------------------------------- the prior
class TokenPrior(NamedSites, PyroModule):
    """An autoregressive prior over token sequences, whose ``model`` is a Pyro program.

    :param config: the architecture; keyword arguments build one when it is omitted, e.g.
        ``TokenPrior(vocab_size=10, length=49)``.

    Site names are public: the plate :attr:`data_site` ("<name>.data") and the sample
    site :attr:`tokens_site` ("<name>.tokens"), whose value is ``(N, L)`` integer tokens.
    (The ``z_site`` and ``x_site`` names it shares with the VAE's sites are not used.)
    """

    def __init__(self, config: TokenPriorConfig | None = None, **kwargs):
        if config is None:
            config = TokenPriorConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a TokenPriorConfig or keyword arguments, not both")
        super().__init__(name=config.name)
        self.config = config
        self.net = TokenTransformer(config)

    @property
    def tokens_site(self) -> str:
        """Name of the sample site of the token sequences."""
        return f"{self.config.name}.tokens"

    def _a_parameter(self) -> torch.Tensor:
        return self.net.head.weight

    # ----------------------------------------------------------------- Pyro program
    @pyro_program
    def model(
        self,
        tokens: torch.Tensor | None = None,
        captions: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
        batch_size: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """p(tokens | captions) in a plate over images. With ``tokens`` given they are
        observed; with ``tokens=None`` the model draws ``batch_size`` sequences, one per
        caption when ``captions`` are given, or as many as a value conditioned at
        :attr:`tokens_site` holds. Returns the ``(N, L)`` tokens.

        :param tokens: ``(N, L)`` integer tokens, or ``(N, h, w)`` grids (flattened in
            raster order, row by row; the site's value is then the ``(N, L)`` sequence).
        :param captions: ``(N,)`` class indices, needed by (and only by) a conditional
            prior (``config.num_classes > 0``).
        :param num_data: size of the data set the batch is a subsample of: every
            log-probability is scaled by ``num_data / N``.
        :param temperature: and ``top_k``: of the distribution (see :class:`TokenSequence`),
            for drawing; keep the defaults to score data.
        """
        if tokens is not None:
            tokens = self.checked_tokens(tokens)
            batch, device = tokens.shape[0], tokens.device
            if batch_size is not None and batch_size != batch:
                raise UsageError(f"batch_size={batch_size} but tokens hold {batch} sequences")
        else:
            batch, device = self._batch_to_draw(captions, batch_size), self._a_parameter().device
        fn = TokenSequence(self.net, self.start_indices(captions, batch), temperature, top_k)
        with self._data_plate(batch, device, num_data):
            return pyro.sample(self.tokens_site, fn, obs=tokens)

    def distribution(
        self,
        captions: torch.Tensor | None = None,
        *,
        batch_size: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> TokenSequence:
        """The :class:`TokenSequence` of ``batch_size`` sequences (one per caption for a
        conditional prior)."""
        starts = self.start_indices(captions, self._batch_to_draw(captions, batch_size))
        return TokenSequence(self.net, starts, temperature, top_k)

    # ----------------------------------------------------------------- direct use
    def log_prob(self, tokens: torch.Tensor, captions: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(tokens | captions)`` of each sequence, ``(N,)`` nats.

        :param tokens: ``(N, L)`` tokens or ``(N, h, w)`` grids (raster order).
        """
        tokens = self.checked_tokens(tokens)
        return TokenSequence(self.net, self.start_indices(captions, tokens.shape[0])).log_prob(
            tokens
        )

    def nll_loss(
        self,
        tokens: torch.Tensor,
        captions: torch.Tensor | None = None,
        *,
        num_data: int | None = None,
    ) -> torch.Tensor:
        """The negative log-likelihood of a batch, summed and scaled by ``num_data / N``:
        what ``Trace_ELBO().differentiable_loss`` of :meth:`model` (with a guide of no
        sites) computes, in value and gradient, without tracing it. What
        :func:`fit_prior` trains."""
        log_p = self.log_prob(tokens, captions)
        size = self._plate_size(log_p.shape[0], num_data)
        return -log_p.sum() * (size / log_p.shape[0])

    @torch.no_grad()
    def sample(
        self,
        num_samples: int | None = None,
        captions: torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Draw ``(N, L)`` token sequences: ``num_samples`` of them, or one per caption
        (:func:`to_grid` makes a conv VAE's grids of them). Runs the network as it is:
        call ``prior.eval()`` first if it has dropout.

        :param temperature: divides the logits (below 1: closer to the most likely codes).
        :param top_k: draw each token from its ``k`` most likely values only (1: greedy).
        """
        fn = self.distribution(
            captions, batch_size=num_samples, temperature=temperature, top_k=top_k
        )
        return fn.sample()

    # ----------------------------------------------------------------- checks
    def checked_tokens(self, tokens: torch.Tensor, check_range: bool | None = None) -> torch.Tensor:
        """``tokens`` as ``(N, L)`` sequences, checked: dtype and shape always, values while
        Pyro's validation is on (``fit_prior`` checks its data once, then turns it off)."""
        length, vocab = self.config.length, self.config.vocab_size
        if not isinstance(tokens, torch.Tensor) or not _is_integer(tokens):
            kind = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise UsageError(f"tokens must be an integer tensor, got {kind}")
        if tokens.dim() == 3 and tokens.shape[1] * tokens.shape[2] == length:
            tokens = tokens.reshape(tokens.shape[0], length)
        if tokens.dim() != 2 or tokens.shape[1] != length:
            raise UsageError(
                f"tokens must be (N, {length}) sequences or (N, h, w) grids of {length} codes, "
                f"got shape {tuple(tokens.shape)} (for one sequence use tokens.unsqueeze(0))"
            )
        if check_range is None:
            check_range = is_validation_enabled()
        if check_range and tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab):
            raise UsageError(
                f"tokens must lie in 0..{vocab - 1} (vocab_size {vocab}); got values in "
                f"{tokens.min().item()}..{tokens.max().item()}"
            )
        return tokens

    def _batch_to_draw(self, captions: torch.Tensor | None, batch_size: int | None) -> int:
        """How many sequences: ``batch_size``, the captions', or a conditioned value's."""
        if captions is not None:
            if not isinstance(captions, torch.Tensor) or captions.dim() != 1:
                raise UsageError("captions must be an (N,) integer tensor of class indices")
            if batch_size is not None and batch_size != captions.shape[0]:
                raise UsageError(
                    f"batch_size={batch_size} but {captions.shape[0]} captions were given"
                )
            return captions.shape[0]
        if batch_size is None:
            return self._conditioned_batch()
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
        return int(batch_size)

    def _conditioned_batch(self) -> int:
        """How many sequences a value given by ``poutine.condition`` or ``replay`` holds."""
        site = self.tokens_site
        for handler in reversed(internals.pyro_handlers()):
            value = None
            if isinstance(handler, ConditionMessenger):
                data = handler.data
                if isinstance(data, poutine.Trace):
                    value = data.nodes[site]["value"] if site in data.nodes else None
                else:
                    value = data.get(site)
            elif isinstance(handler, ReplayMessenger) and site in handler.trace.nodes:
                value = handler.trace.nodes[site]["value"]
            if value is not None:
                value = torch.as_tensor(value)
                if value.dim() < 2 or value.shape[-1] != self.config.length:
                    raise UsageError(
                        f"{site} holds a tensor of shape {tuple(value.shape)}, but its value "
                        f"is (N, {self.config.length}) sequences"
                    )
                return value.shape[-2]
        raise UsageError(
            "with tokens=None the model needs batch_size (how many sequences to draw), "
            f"captions, or a value conditioned at {site!r}"
        )

    def start_indices(
        self, captions: torch.Tensor | None, batch: int, check_range: bool | None = None
    ) -> torch.Tensor:
        """The ``(batch,)`` start indices: the captions, checked (their values while Pyro's
        validation is on, or if ``check_range``), or zeros."""
        classes, device = self.config.num_classes, self._a_parameter().device
        if not classes:
            if captions is not None:
                raise UsageError(
                    "this prior is unconditional (num_classes=0), so it takes no captions; "
                    "build it with num_classes=C to condition on C classes"
                )
            return torch.zeros(batch, dtype=torch.long, device=device)
        if captions is None:
            raise UsageError(
                f"this prior is conditioned on {classes} classes: pass captions, an (N,) "
                "integer tensor with one class per sequence"
            )
        if not isinstance(captions, torch.Tensor) or not _is_integer(captions):
            raise UsageError("captions must be an (N,) integer tensor of class indices")
        if captions.shape != (batch,):
            raise UsageError(
                f"need one caption per sequence, {batch}, got shape {tuple(captions.shape)}"
            )
        if check_range is None:
            check_range = is_validation_enabled()
        if check_range and batch and (captions.min() < 0 or captions.max() >= classes):
            raise UsageError(
                f"captions must lie in 0..{classes - 1} (num_classes {classes}); got values "
                f"in {captions.min().item()}..{captions.max().item()}"
            )
        return captions.long()


# ---------------------------------------------------------------------------- training
@dataclass(frozen=True, eq=False)
class TokenDraws:
    """Several draws of every training image's codes from a discrete VAE's posterior, for
    :func:`fit_prior`: ``draws`` is ``(D, N, L)`` sequences or ``(D, N, h, w)`` grids,
    e.g. ``tokenize_images(vae, images, draws=D)``. The first epoch trains on the first
    draw, the second on the second, and so on round the D, so over the epochs the prior
    sees the aggregate posterior (the prior that maximizes the ELBO) rather than one fixed
    code per image."""

    draws: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.draws, torch.Tensor) or self.draws.dim() < 3:
            got = (
                f"shape {tuple(self.draws.shape)}"
                if isinstance(self.draws, torch.Tensor)
                else type(self.draws).__name__
            )
            raise UsageError(f"TokenDraws needs (D, N, L) or (D, N, h, w) tokens, got {got}")
        if self.draws.shape[0] == 0:
            raise UsageError("TokenDraws needs at least one draw (D >= 1), got D = 0")


class TokenBatches(Batches):
    """Mini-batches of integer token sequences (and their captions), held on the training
    device and batched by shuffled index, sharded per process as every batch source is
    (:class:`pyro_vae.data.Batches`). An epoch yields ``(tokens, captions)`` tuples,
    ``captions`` None for an unconditional prior. Tokens stay integers: the ``dtype``
    given to :meth:`prepare` (the weights') is not applied to them.

    :param tokens: ``(N, L)`` sequences or ``(N, h, w)`` grids; with ``draws``,
        ``(D, N, L)`` or ``(D, N, h, w)``: D draws of every sequence, epoch ``k`` (counted
        from 0, as :meth:`epoch` takes it) training on draw ``k mod D``.
    :param captions: ``(N,)`` class indices, or None.
    :param draws: whether ``tokens`` holds draws (see :class:`TokenDraws`).
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        captions: torch.Tensor | None = None,
        draws: bool = False,
    ):
        if not draws:
            tokens = tokens.unsqueeze(0)
        tokens = tokens.reshape(tokens.shape[0], tokens.shape[1], -1)  # (D, N, L)
        if captions is not None and captions.shape != tokens.shape[1:2]:
            raise UsageError(
                f"need one caption per sequence ({tokens.shape[1]}), got {tuple(captions.shape)}"
            )
        super().__init__(tokens.shape[1], batch_size, seed, None, None, None)
        # kept compact (int32 holds any codebook), made long batch by batch
        self.tokens = tokens.to(torch.int32)
        self.captions = None if captions is None else captions.long()

    def place(self, device: torch.device) -> None:
        self.tokens = self.tokens.to(device)
        self.captions = None if self.captions is None else self.captions.to(device)

    def epoch(
        self, epoch: int, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The ``(tokens, captions)`` batches of ``epoch`` (0 for the first) from batch
        number ``start`` on."""
        order = self._order(epoch).to(self.tokens.device)
        draw = self.tokens[epoch % self.tokens.shape[0]]
        for i in range(start, len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield draw[index].long(), None if self.captions is None else self.captions[index]


class TokenPriorLoss(nn.Module):
    """The prior's negative log-likelihood of a ``(tokens, captions)`` batch, scaled to the
    data set (:meth:`TokenPrior.nll_loss`), as the module data-parallel training wraps."""

    def __init__(self, prior: TokenPrior, num_data: int):
        super().__init__()
        self.prior, self.num_data = prior, num_data

    def forward(self, batch) -> torch.Tensor:
        tokens, captions = engine.unwrap(batch)
        return self.prior.nll_loss(tokens, captions, num_data=self.num_data)


class TokenPriorObjective(Objective):
    """How :func:`fit_prior` trains a prior in the package's one loop: the loss of
    :class:`TokenPriorLoss`, and as the epoch's metrics the held-out negative
    log-likelihood in nats per image (``test_nats``) and bits per token
    (``test_bits_per_token``).

    :param test: held-out ``(tokens, captions)``, checked, or None.
    :param draws: D when the training tokens are D posterior draws of each image, else
        None; kept in the checkpoint, and a resumed run must have the same.
    """

    def __init__(
        self,
        prior: TokenPrior,
        num_data: int,
        test: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        draws: int | None = None,
    ):
        self.model, self.module = prior, TokenPriorLoss(prior, num_data)
        self.test, self.local_test, self.draws = test, None, draws

    def prepare(self, rank: int, world: int, device, dtype, steps: int) -> None:
        if self.test is None:
            return
        tokens, captions = self.test  # each process scores its own slice; integers stay so
        self.local_test = (
            tokens[rank::world].to(device),
            None if captions is None else captions[rank::world].to(device),
        )

    @torch.no_grad()
    def metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor], step: int) -> dict:
        if self.local_test is None:
            return {"test_nats": None, "test_bits_per_token": None}
        tokens, captions = self.local_test
        nats = torch.zeros((), dtype=torch.float64, device=tokens.device)
        for begin in range(0, tokens.shape[0], EVAL_CHUNK):
            part = slice(begin, begin + EVAL_CHUNK)
            chunk = None if captions is None else captions[part]
            nats -= self.model.log_prob(tokens[part], chunk).double().sum()
        total = reduce(torch.stack([nats, nats.new_tensor(tokens.shape[0])]))
        per_image = (total[0] / total[1]).item()
        return {
            "test_nats": per_image,
            "test_bits_per_token": per_image / (self.model.config.length * math.log(2)),
        }

    def checkpoint_extra(self) -> dict:
        # the engine's "config" entry is read back as a VAEConfig; the prior's own config
        # is stored (and compared on resume) under its own name
        return {"prior_config": self.model.config.to_dict(), "token_draws": self.draws}


def fit_prior(
    prior: TokenPrior,
    tokens: torch.Tensor | TokenDraws,
    captions: torch.Tensor | None = None,
    test: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    batch_size: int = 64,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    run: Run | None = None,
) -> History:
    """Train ``prior`` by maximum likelihood on token sequences, in the package's one
    training loop (:mod:`pyro_vae.engine`), as :func:`pyro_vae.fit` trains a VAE: ``run``
    (a :class:`~pyro_vae.run.Run`) sets the devices, processes, precision, epochs,
    learning rate, loggers, checkpoint and Ctrl-C handling.

    :param tokens: ``(N, L)`` integer sequences or ``(N, h, w)`` grids (raster order),
        e.g. ``vae.tokenize(images)``; or :class:`TokenDraws`, several draws of each
        image's codes from the VAE's posterior, which is what a prior that improves the
        VAE's bound must model (:func:`pyro_vae.tokenizer.tokenize_images`).
    :param captions: ``(N,)`` class indices, for (and only for) a conditional prior.
    :param test: held-out tokens (with their captions, as a tuple, for a conditional
        prior); their negative log-likelihood is recorded after each epoch as
        ``test_nats`` (per image) and ``test_bits_per_token``.
    :param batch_size: sequences per step in each process.
    :param on_epoch: called in the first process with each epoch's record, once its
        checkpoint is written.
    :returns: the run's :class:`~pyro_vae.history.History`; the prior is left in eval mode.
    """
    run = run or Run()
    draws = tokens.draws.shape[0] if isinstance(tokens, TokenDraws) else None
    if draws is not None:  # checked as one (D * N) set of sequences, each with its caption
        prior.start_indices(captions, tokens.draws.shape[1], check_range=True)
        flat = tokens.draws.flatten(0, 1)
        repeated = None if captions is None else captions.repeat(draws)
        checked, held_out = _checked_data(prior, flat, repeated, test, batch_size, run)
        tokens = checked.reshape(draws, -1, checked.shape[-1])
    else:
        tokens, held_out = _checked_data(prior, tokens, captions, test, batch_size, run)
    prior.cpu().train()
    batches = TokenBatches(tokens, batch_size, run.seed, captions, draws=draws is not None)
    objective = TokenPriorObjective(prior, batches.num_data, held_out, draws)
    history = engine.train(objective, batches, run, on_epoch)
    prior.eval()
    return history


def _checked_data(prior: TokenPrior, tokens, captions, test, batch_size, run: Run):
    """Refuse, before any work, what cannot train; the training tokens as ``(N, L)`` and
    the held-out ``(tokens, captions)`` (or None), every value checked once, here."""
    if prior.is_frozen:
        raise UsageError("the prior is frozen (inside prior.frozen()); fit it outside that block")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    if run.compile:
        raise UsageError("compile is not offered for the token prior; train it without")
    held_out = None
    if test is not None:
        test_tokens, test_captions = test if isinstance(test, (tuple, list)) else (test, None)
        test_tokens = prior.checked_tokens(test_tokens, check_range=True)
        prior.start_indices(test_captions, test_tokens.shape[0], check_range=True)
        held_out = (test_tokens, test_captions)
    tokens = prior.checked_tokens(tokens, check_range=True)
    prior.start_indices(captions, tokens.shape[0], check_range=True)
    if not len(tokens) or (held_out is not None and not len(held_out[0])):
        raise UsageError("the training and held-out token sets must not be empty")
    return tokens, held_out


# ----------------------------------------------------------------------------- in the VAE
class TokenCodes(TorchDistribution):
    """A token prior as a distribution over a discrete VAE's one-hot codes: batch shape
    ``batch_shape``, event ``(*code_shape, K)``, what the VAE's latent site holds.

    A code grid is read in raster order (:func:`to_grid`'s inverse). For a conditional
    prior the caption is marginalized, uniform over the classes: ``log p(z) =
    logsumexp_c log p(z | c) - log C`` (C passes of the network), so the VAE stays a model
    of images alone, comparable with the uniform prior's.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, prior: TokenPrior, batch_shape, code_shape: tuple[int, ...], dtype):
        self.prior, self.code_shape, self.code_dtype = prior, tuple(code_shape), dtype
        event = torch.Size((*self.code_shape, prior.config.vocab_size))
        super().__init__(torch.Size(batch_shape), event, validate_args=False)

    @property
    def support(self):
        return constraints.independent(constraints.simplex, len(self.code_shape))

    def expand(self, batch_shape, _instance=None) -> TokenCodes:
        return TokenCodes(self.prior, batch_shape, self.code_shape, self.code_dtype)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        lead = value.shape[: value.dim() - len(self.event_shape)]
        tokens = value.argmax(-1).reshape(-1, math.prod(self.code_shape))
        classes = self.prior.config.num_classes
        if not classes:
            return self.prior.log_prob(tokens).reshape(lead)
        n = tokens.shape[0]
        per_caption = torch.stack([
            self.prior.log_prob(tokens, tokens.new_full((n,), c)) for c in range(classes)
        ])  # fmt: skip
        return (torch.logsumexp(per_caption, 0) - math.log(classes)).reshape(lead)

    @torch.no_grad()
    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)[: -len(self.event_shape)]
        n, classes = math.prod(shape), self.prior.config.num_classes
        device = next(self.prior.parameters()).device
        captions = torch.randint(classes, (n,), device=device) if classes else None
        tokens = self.prior.sample(None if classes else n, captions)
        one_hot = F.one_hot(tokens, self.prior.config.vocab_size).to(self.code_dtype)
        return one_hot.reshape(*shape, *self.event_shape)


class PriorLatent(nn.Module):
    """A discrete VAE's latent family with a learned :class:`TokenPrior` in place of the
    uniform prior: the posterior, tokens and codes are the VAE's own latent's; the prior
    is :class:`TokenCodes`. For evaluation and generation (``vae.eval()``): the prior is
    fitted to the codes of a trained VAE and does not train with it, so training mode,
    whose relaxed codes the prior cannot score, is refused."""

    def __init__(self, latent, prior: TokenPrior):
        super().__init__()
        self.base, self.token_prior = latent, prior
        for name in ("code_shape", "classes", "event_shape", "encoder_features",
                     "decoder_features", "relaxed", "spatial", "straight_through"):  # fmt: skip
            setattr(self, name, getattr(latent, name))

    @property
    def codebook_size(self) -> int:
        return self.base.codebook_size

    @property
    def temperature(self) -> float:
        return self.base.temperature

    def prior(self, batch_shape: torch.Size, like: torch.Tensor, temperature=None) -> TokenCodes:
        """The learned prior over ``batch_shape`` data points' codes."""
        if self.training:
            raise UsageError(
                "a VAE with a learned token prior is for evaluation and generation: call "
                "vae.eval(); train the VAE with its uniform prior, then fit_prior on its tokens"
            )
        return TokenCodes(self.token_prior, batch_shape, self.code_shape, like.dtype)

    def posterior(self, encoded: torch.Tensor, temperature=None):
        return self.base.posterior(encoded, temperature)

    def code(self, encoded: torch.Tensor) -> torch.Tensor:
        return self.base.code(encoded)

    def tokens(self, encoded: torch.Tensor) -> torch.Tensor:
        return self.base.tokens(encoded)

    def one_hot(self, tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.base.one_hot(tokens, dtype)


# ----------------------------------------------------------------------------- loading


class _StoredConfig(dict):
    """A checkpoint's config left as the plain dict it was stored as, so that
    :func:`load_prior` can tell a VAE's checkpoint from a prior's before rebuilding."""

    @classmethod
    def from_dict(cls, values: dict) -> _StoredConfig:
        return cls(values)


def load_prior(path: str | PathLike[str], map_location: str | torch.device = "cpu") -> TokenPrior:
    """Rebuild the token prior of a checkpoint written by :func:`fit_prior` (or
    ``pyro-vae fit-prior``), with its trained weights, on ``map_location``, in eval mode.

    A file that is not a pyro_vae checkpoint, or holds another model (a VAE), is refused
    with a :class:`~pyro_vae.errors.CheckpointError` that says which it is.
    """
    from .checkpoint import load_checkpoint, load_weights
    from .errors import CheckpointError

    state = load_checkpoint(path, map_location, config_type=_StoredConfig)
    stored = state.get("prior_config", state["config"])
    if not isinstance(stored, dict) or "vocab_size" not in stored:
        what = "a VAE" if isinstance(stored, dict) and "latent" in stored else "another model"
        raise CheckpointError(
            f"{path} holds {what}, not a token prior; give the checkpoint.pt of a "
            "pyro-vae fit-prior run"
        )
    try:
        state["config"] = TokenPriorConfig.from_dict(dict(stored))
    except (TypeError, ValueError) as error:  # UsageError is a ValueError
        raise CheckpointError(f"{path} holds an invalid token prior config: {error}") from None
    prior = load_weights(TokenPrior(state["config"]), state, path)
    return prior.to(map_location).eval()
