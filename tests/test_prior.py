"""The token prior: an exact, normalised autoregressive distribution (log_prob against a
slow loop, sums to 1 over every sequence), KV-cached sampling equal to uncached sampling,
a Pyro model (Trace_ELBO, Predictive, condition), and training in the one engine."""

from __future__ import annotations

import itertools
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO

from pyro_vae import Run, UsageError, VAEConfig
from pyro_vae.engine import Batch
from pyro_vae.prior import (
    TokenBatches,
    TokenPrior,
    TokenPriorConfig,
    TokenPriorObjective,
    TokenSequence,
    fit_prior,
    to_grid,
)

TINY = dict(n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny: a second intra-op thread only waits for a core on a
    machine shared with other runs (a training step took 0.2 s with two threads there,
    0.05 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scrambled(prior: TokenPrior, std: float = 0.4) -> TokenPrior:
    """The prior with every weight drawn afresh, large enough that its conditionals are
    far from uniform and differ by position and context (a fresh prior's are near
    uniform, which would let a wrong mask or offset pass unseen)."""
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0.0, std)
    return prior.eval()


def slow_log_prob(prior: TokenPrior, tokens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """sum_i log p(t_i | t_<i): each conditional from a forward pass that sees only the
    prefix t_<i (no later token is an input, so no mask is needed to hide it)."""
    total = torch.zeros(tokens.shape[0])
    for i in range(tokens.shape[1]):
        logits = prior.net(starts, tokens[:, :i])[:, -1]
        total += logits.log_softmax(-1).gather(-1, tokens[:, i : i + 1]).squeeze(-1)
    return total


def slow_sample(prior, starts, length, temperature=1.0, top_k=None) -> torch.Tensor:
    """Token by token, the whole prefix through the network each time (no cache)."""
    tokens = torch.zeros(starts.shape[0], length, dtype=torch.long)
    with torch.no_grad():
        for i in range(length):
            logits = prior.net(starts, tokens[:, :i])[:, -1] / temperature
            if top_k is not None:
                kth = logits.topk(top_k, -1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            tokens[:, i] = torch.multinomial(logits.softmax(-1), 1).squeeze(-1)
    return tokens


def no_sites(*args, **kwargs) -> None:
    """A guide with no sample sites: the ELBO of a fully observed model is its log joint."""


# ---------------------------------------------------------------------------- config
def test_config_round_trips_names_unknown_keys_and_refuses_bad_values():
    config = TokenPriorConfig(vocab_size=10, length=49, num_classes=10, n_embd=32)
    assert TokenPriorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UsageError, match="unknown TokenPriorConfig field.*block_size"):
        TokenPriorConfig.from_dict({**config.to_dict(), "block_size": 3})
    for bad in (dict(vocab_size=1), dict(length=0), dict(num_classes=-1), dict(n_head=3),
                dict(dropout=1.0), dict(name="a b"), dict(n_layer=True)):  # fmt: skip
        with pytest.raises(UsageError):
            TokenPriorConfig(**{"vocab_size": 10, "length": 49, **bad})
    conv = VAEConfig(latent="relaxed-categorical", arch="conv", classes=12)
    assert TokenPriorConfig.for_vae(conv).length == 49
    assert TokenPriorConfig.for_vae(conv).vocab_size == 12
    assert TokenPriorConfig.for_vae(VAEConfig(latent="relaxed-categorical", groups=30)).length == 30
    with pytest.raises(UsageError, match="discrete codes"):
        TokenPriorConfig.for_vae(VAEConfig())


# ---------------------------------------------------------------------------- the distribution
@pytest.mark.parametrize("num_classes", [0, 3])
def test_log_prob_is_the_sum_of_the_per_token_conditionals(num_classes):
    torch.manual_seed(1)
    prior = scrambled(TokenPrior(vocab_size=5, length=7, num_classes=num_classes, **TINY))
    tokens = torch.randint(0, 5, (6, 7))
    captions = torch.randint(0, 3, (6,)) if num_classes else None
    starts = captions if num_classes else torch.zeros(6, dtype=torch.long)
    expected = slow_log_prob(prior, tokens, starts)
    assert torch.allclose(prior.log_prob(tokens, captions), expected, atol=1e-5)
    # and the first token depends on the caption, later ones on earlier tokens
    if num_classes:
        other = prior.log_prob(tokens, (captions + 1) % 3)
        assert not torch.allclose(other, expected, atol=1e-3)
    # a later token is seen by no earlier conditional: changing the last token changes
    # only the last term
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 5
    last = prior.net(starts, tokens[:, :-1])[:, -1].log_softmax(-1)
    expected_change = last.gather(-1, changed[:, -1:]) - last.gather(-1, tokens[:, -1:])
    change = prior.log_prob(changed, captions) - prior.log_prob(tokens, captions)
    assert torch.allclose(change, expected_change.squeeze(-1), atol=1e-5)


def test_a_grid_is_read_in_raster_order():
    prior = scrambled(TokenPrior(vocab_size=4, length=6, **TINY))
    grids = torch.randint(0, 4, (3, 2, 3))
    rows = torch.cat([grids[:, 0], grids[:, 1]], dim=1)  # row by row, left to right
    assert torch.equal(prior.log_prob(grids), prior.log_prob(rows))
    assert torch.equal(to_grid(rows, (2, 3)), grids)
    with pytest.raises(UsageError, match="3 x 3 grids"):
        to_grid(rows, (3, 3))


@pytest.mark.parametrize("options", [{}, dict(temperature=0.6, top_k=2), dict(temperature=2.0)])
def test_probabilities_of_every_sequence_sum_to_one(options):
    """exp(logsumexp over all 3^3 sequences) = 1, for each caption, at any temperature
    and top-k: log_prob is a normalised distribution over whole sequences."""
    torch.manual_seed(2)
    prior = scrambled(TokenPrior(vocab_size=3, length=3, num_classes=2, **TINY))
    every = torch.tensor(list(itertools.product(range(3), repeat=3)))
    for caption in (0, 1):
        captions = torch.full((len(every),), caption)
        fn = prior.distribution(captions, **options)
        total = fn.log_prob(every).logsumexp(0)
        assert total.item() == pytest.approx(0.0, abs=1e-5)


def test_samples_follow_log_prob():
    """Frequencies of 20,000 cached draws match exp(log_prob) over all 27 sequences."""
    torch.manual_seed(3)
    prior = scrambled(TokenPrior(vocab_size=3, length=3, **TINY), std=0.3)
    every = torch.tensor(list(itertools.product(range(3), repeat=3)))
    probs = prior.log_prob(every).exp().detach()
    draws = prior.sample(20_000)
    index = (draws * torch.tensor([9, 3, 1])).sum(-1)
    freq = torch.bincount(index, minlength=27).double() / len(draws)
    assert 0.5 * (freq - probs.double()).abs().sum() < 0.03  # total variation


def test_cached_sampling_draws_what_uncached_sampling_draws_from_the_same_seed():
    torch.manual_seed(4)
    prior = scrambled(TokenPrior(vocab_size=6, length=9, num_classes=3, **TINY))
    captions = torch.arange(12) % 3
    for options in ({}, dict(temperature=0.8, top_k=3)):
        torch.manual_seed(5)
        cached = prior.sample(captions=captions, **options)
        torch.manual_seed(5)
        uncached = slow_sample(prior, captions, 9, **options)
        assert torch.equal(cached, uncached)
        assert len(set(map(tuple, cached.tolist()))) > 6  # really random draws


def test_cached_logits_equal_the_full_forward_and_each_step_runs_one_position():
    """The cache holds what a full pass computes: logits of every position agree, and a
    draw of N sequences of L tokens is L passes of the network over one new position."""
    torch.manual_seed(6)
    prior = scrambled(TokenPrior(vocab_size=5, length=8, **TINY))
    tokens, starts = torch.randint(0, 5, (4, 8)), torch.zeros(4, dtype=torch.long)
    full = prior.net(starts, tokens[:, :-1])
    cache = prior.net.new_cache()
    steps = [prior.net(starts, tokens[:, :i], cache) for i in range(8)]
    assert all(step.shape == (4, 1, 5) for step in steps)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    # a cache filled by several positions at once, then extended (the bottom-right mask)
    cache = prior.net.new_cache()
    head = prior.net(starts, tokens[:, :3], cache)
    tail = prior.net(starts, tokens[:, :7], cache)
    assert torch.allclose(torch.cat([head, tail], 1), full, atol=1e-5)
    widths = []
    hook = prior.net.blocks[0].register_forward_pre_hook(lambda m, a: widths.append(a[0].shape))
    prior.sample(50)
    hook.remove()
    assert widths == [torch.Size((50, 1, 16))] * 8


def test_top_k_one_and_a_tiny_temperature_are_greedy():
    torch.manual_seed(7)
    prior = scrambled(TokenPrior(vocab_size=6, length=8, num_classes=2, **TINY), std=0.6)
    captions = torch.tensor([0, 1, 0, 1])
    greedy = torch.zeros(4, 8, dtype=torch.long)
    for i in range(8):
        greedy[:, i] = prior.net(captions, greedy[:, :i])[:, -1].argmax(-1)
    assert torch.equal(prior.sample(captions=captions, top_k=1), greedy)
    assert torch.equal(prior.sample(captions=captions, temperature=1e-3, top_k=1), greedy)
    assert torch.equal(prior.sample(captions=captions, temperature=1e-4), greedy)
    # greedy is not what plain sampling does
    draws = prior.sample(captions=captions.repeat(25))
    assert not all(torch.equal(d, greedy[i % 4]) for i, d in enumerate(draws))


def test_distribution_shapes_support_and_expand():
    prior = TokenPrior(vocab_size=4, length=5, **TINY)
    fn = prior.distribution(batch_size=3)
    assert isinstance(fn, TokenSequence)
    assert fn.batch_shape == (3,) and fn.event_shape == (5,) and fn.support.is_discrete
    assert fn.sample().shape == (3, 5) and fn.sample((2,)).shape == (2, 3, 5)
    wide = fn.expand((2, 3))
    draws = wide.sample()
    assert draws.shape == (2, 3, 5) and wide.log_prob(draws).shape == (2, 3)
    assert torch.allclose(wide.log_prob(draws), fn.log_prob(draws))
    with pytest.raises(ValueError):  # validation: a token outside the vocabulary
        fn.log_prob(torch.full((3, 5), 4))
    for bad in (dict(temperature=0.0), dict(top_k=5), dict(top_k=0)):
        with pytest.raises(UsageError):
            prior.distribution(batch_size=3, **bad)


# ---------------------------------------------------------------------------- the Pyro model
def test_model_sites_plate_and_subsampling_scale():
    prior = scrambled(TokenPrior(vocab_size=4, length=5, name="codes", **TINY))
    tokens = torch.randint(0, 4, (6, 5))
    trace = poutine.trace(prior.model).get_trace(tokens, num_data=60)
    site = trace.nodes["codes.tokens"]
    assert site["is_observed"] and torch.equal(site["value"], tokens)
    assert [frame.name for frame in site["cond_indep_stack"]] == ["codes.data"]
    assert site["scale"] == pytest.approx(10.0)
    trace.compute_log_prob()
    assert torch.allclose(site["log_prob_sum"] / 10, prior.log_prob(tokens).sum())
    drawn = poutine.trace(prior.model).get_trace(batch_size=4).nodes["codes.tokens"]
    assert not drawn["is_observed"] and drawn["value"].shape == (4, 5)


def test_the_direct_loss_is_trace_elbos_in_value_and_gradient():
    """nll_loss = Trace_ELBO().differentiable_loss(model, a guide of no sites) = -(the
    model's log joint, scaled by num_data / N): the same value and gradient."""
    torch.manual_seed(8)
    prior = scrambled(TokenPrior(vocab_size=5, length=6, num_classes=3, **TINY)).train()
    tokens, captions = torch.randint(0, 5, (8, 6)), torch.randint(0, 3, (8,))
    params = list(prior.parameters())
    pyro_loss = Trace_ELBO().differentiable_loss(
        prior.model, no_sites, tokens, captions, num_data=100
    )
    direct = prior.nll_loss(tokens, captions, num_data=100)
    objective = TokenPriorObjective(prior, num_data=100)
    assert torch.allclose(objective.module(Batch((tokens, captions))), direct)
    trace = poutine.trace(prior.model).get_trace(tokens, captions, num_data=100)
    assert torch.allclose(direct, -trace.log_prob_sum(), rtol=1e-5)
    assert torch.allclose(direct, pyro_loss, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(direct, params), torch.autograd.grad(pyro_loss, params),
                    strict=True):  # fmt: skip
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_predictive_and_condition():
    prior = scrambled(TokenPrior(vocab_size=4, length=5, num_classes=2, **TINY))
    captions = torch.tensor([0, 1, 1])
    for parallel in (False, True):
        draws = Predictive(prior.model, num_samples=7, parallel=parallel)(None, captions)
        tokens = draws["prior.tokens"]
        assert tokens.shape == (7, 3, 5) and tokens.dtype == torch.long
        assert 0 <= tokens.min() and tokens.max() < 4
    given = torch.randint(0, 4, (3, 5))
    conditioned = poutine.condition(prior.model, data={"prior.tokens": given})
    trace = poutine.trace(conditioned).get_trace(None, captions)
    site = trace.nodes["prior.tokens"]
    assert site["is_observed"] and torch.equal(site["value"], given)
    assert torch.allclose(trace.log_prob_sum(), prior.log_prob(given, captions).sum())
    # an unconditional prior finds the batch in the conditioned value itself
    free = scrambled(TokenPrior(vocab_size=4, length=5, name="free", **TINY))
    trace = poutine.trace(poutine.condition(free.model, data={"free.tokens": given})).get_trace()
    assert torch.allclose(trace.log_prob_sum(), free.log_prob(given).sum())


def test_captions_and_tokens_are_checked():
    conditional = TokenPrior(vocab_size=4, length=5, num_classes=3, **TINY)
    unconditional = TokenPrior(vocab_size=4, length=5, name="free", **TINY)
    tokens = torch.randint(0, 4, (2, 5))
    with pytest.raises(UsageError, match="conditioned on 3 classes: pass captions"):
        conditional.model(tokens)
    with pytest.raises(UsageError, match="conditioned on 3 classes"):
        conditional.model(batch_size=2)
    with pytest.raises(UsageError, match="conditioned on 3 classes"):
        fit_prior(conditional, tokens, run=Run(epochs=1, progress=False))
    with pytest.raises(UsageError, match=r"captions must lie in 0\.\.2"):
        conditional.model(tokens, torch.tensor([0, 3]))
    with pytest.raises(UsageError, match="one caption per sequence"):
        conditional.log_prob(tokens, torch.tensor([0, 1, 2]))
    with pytest.raises(UsageError, match="unconditional"):
        unconditional.model(tokens, torch.tensor([0, 1]))
    with pytest.raises(UsageError, match=r"tokens must lie in 0\.\.3"):
        unconditional.model(torch.full((2, 5), 4))
    with pytest.raises(UsageError, match="integer tensor"):
        unconditional.model(tokens.float())
    with pytest.raises(UsageError, match=r"\(N, 5\) sequences"):
        unconditional.model(tokens[0])
    with pytest.raises(UsageError, match="batch_size"):
        unconditional.model()


# ---------------------------------------------------------------------------- training
def test_token_batches_shard_keep_integers_and_pair_captions():
    tokens = torch.arange(10).unsqueeze(1).repeat(1, 4)  # sequence n is all n
    source = TokenBatches(tokens.view(10, 2, 2), batch_size=3, seed=1, captions=torch.arange(10))
    seen = []
    for rank in (0, 1):
        shard = source.prepare(rank, 2, "cpu", torch.float64)
        assert len(shard) == 2 and shard.num_data == 10
        for batch_tokens, batch_captions in shard.epoch(0):
            assert batch_tokens.dtype == torch.long and batch_tokens.shape[1] == 4
            assert torch.equal(batch_tokens[:, 0], batch_captions)
            seen += batch_captions.tolist()
    assert sorted(seen) == list(range(10))  # disjoint shards that cover the data
    assert source.tokens.device.type == "cpu" and source.rank == 0  # the source is unchanged
    resumed = list(source.prepare(0, 1, "cpu").epoch(3, start=2))
    assert torch.equal(resumed[0][0], list(source.prepare(0, 1, "cpu").epoch(3))[2][0])


def rule_data(n: int, seed: int):
    """Sequences of 8 tokens where token i = (caption + 2 i) mod 6: a deterministic rule
    that involves the caption and the position."""
    generator = torch.Generator().manual_seed(seed)
    captions = torch.randint(0, 4, (n,), generator=generator)
    tokens = (captions.unsqueeze(1) + 2 * torch.arange(8)) % 6
    return tokens, captions


def test_fit_prior_learns_a_rule_every_parameter_moves_and_the_checkpoint_holds_the_config(
    tmp_path,
):
    pyro.set_rng_seed(0)
    prior = TokenPrior(vocab_size=6, length=8, num_classes=4, n_layer=1, n_head=2, n_embd=32)
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    train, test = rule_data(256, 0), rule_data(64, 1)
    path = tmp_path / "prior.pt"
    history = fit_prior(
        prior, *train, test=test, batch_size=32,
        run=Run(epochs=6, lr=1e-2, accelerator="cpu", progress=False, checkpoint=str(path)),
    )  # fmt: skip
    bits = history.column("test_bits_per_token")
    assert bits[0] > bits[-1] and bits[-1] < 0.01, bits  # 2.58 bits a token at the start
    assert history.epochs[-1].test_nats == pytest.approx(bits[-1] * 8 * math.log(2))
    assert history.epochs[-1].train_loss < history.epochs[0].train_loss
    for name, value in before.items():
        assert not torch.equal(value, prior.state_dict()[name]), f"{name} did not move"
    assert not prior.training
    captions = torch.arange(200) % 4
    rule = (captions.unsqueeze(1) + 2 * torch.arange(8)) % 6
    assert torch.equal(prior.sample(captions=captions, top_k=1), rule)
    assert (prior.sample(captions=captions) == rule).double().mean() > 0.99
    # the checkpoint stores the prior's own config beside weights that rebuild it
    state = torch.load(path, weights_only=True)
    assert state["prior_config"] == prior.config.to_dict()
    rebuilt = TokenPrior(TokenPriorConfig.from_dict(state["prior_config"]))
    rebuilt.load_state_dict(state["model"])
    assert torch.allclose(rebuilt.log_prob(*test), prior.log_prob(*test))
    # and a resumed run would be refused for another architecture
    objective = TokenPriorObjective(prior, num_data=256)
    assert objective.checkpoint_differences(state) == []
    other = {**state["prior_config"], "n_embd": 16}
    (line,) = objective.checkpoint_differences({**state, "prior_config": other})
    assert "prior_config" in line and "'n_embd': 16" in line


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    path = tmp_path / "prior.pt"
    train, test = rule_data(128, 0), rule_data(32, 1)
    run = Run(epochs=3, lr=1e-2, accelerator="cpu", progress=False, checkpoint=str(path))
    shape = dict(vocab_size=6, length=8, num_classes=4, n_layer=1, n_head=2, n_embd=16)
    pyro.set_rng_seed(0)
    straight = TokenPrior(**shape)
    whole = fit_prior(straight, *train, test=test, batch_size=32, run=run)
    path.unlink()
    pyro.set_rng_seed(0)
    fit_prior(TokenPrior(**shape), *train, test=test, batch_size=32, run=run.replace(epochs=2))
    resumed = TokenPrior(**shape)
    rest = fit_prior(resumed, *train, test=test, batch_size=32, run=run.replace(resume=True))
    assert rest.column("test_nats") == pytest.approx(whole.column("test_nats"))
    for name, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[name])


def test_fit_prior_refuses_what_it_cannot_do(tmp_path):
    prior = TokenPrior(vocab_size=6, length=8, **TINY)
    tokens = torch.randint(0, 6, (16, 8))
    with pytest.raises(UsageError, match="batch_size"):
        fit_prior(prior, tokens, batch_size=0)
    with pytest.raises(UsageError, match="unconditional"):
        fit_prior(prior, tokens, torch.zeros(16, dtype=torch.long))
    with pytest.raises(UsageError, match="tokens must lie"):
        fit_prior(prior, tokens, test=torch.full((2, 8), 6))
    with pytest.raises(UsageError, match="must not be empty"):
        fit_prior(prior, tokens, test=tokens[:0])
    with pytest.raises(UsageError, match="compile"):
        fit_prior(prior, tokens, run=Run(compile=True, progress=False))
    with pytest.raises(UsageError, match="frozen"), prior.frozen():
        fit_prior(prior, tokens)
