#!/usr/bin/env python
"""Time to draw token grids from the autoregressive prior, with and without its KV cache.

The prior of the default size (4 blocks of width 128, 4 heads) over 7 x 7 grids of a
codebook of ``--vocab`` (32), an MNIST conv VAE's codes, draws ``--num`` sequences: once with
``TokenPrior.sample`` (key/value cache, one new position per step: L steps over one
position each) and once by running the whole prefix through the network at every step
(L steps over 1, 2, ..., L positions). Repeats alternate the two, so that load on a
shared machine hits them alike; the table gives each repeat and the medians.

    python benchmarks/prior_sampling.py --num 1000 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pyro_vae.prior import TokenPrior, TokenPriorConfig


def uncached(prior: TokenPrior, n: int) -> torch.Tensor:
    """Token by token, the whole prefix through the network each time."""
    length = prior.config.length
    starts = torch.zeros(n, dtype=torch.long, device=prior.net.head.weight.device)
    tokens = torch.zeros(n, length, dtype=torch.long, device=starts.device)
    with torch.no_grad():
        for i in range(length):
            logits = prior.net(starts, tokens[:, :i])[:, -1]
            tokens[:, i] = torch.multinomial(logits.softmax(-1), 1).squeeze(-1)
    return tokens


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=1000, help="sequences drawn at once")
    p.add_argument("--grid", type=int, default=7, help="grid side (L = grid^2 tokens)")
    p.add_argument("--vocab", type=int, default=32, help="codebook size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-uncached", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = TokenPriorConfig(vocab_size=args.vocab, length=args.grid**2)
    prior = TokenPrior(config).to(args.device).eval()
    prior.sample(8)  # warm-up
    rows = {"cached": [], "uncached": []}
    for _ in range(args.repeats):
        rows["cached"].append(timed(lambda: prior.sample(args.num)))
        if not args.skip_uncached:
            rows["uncached"].append(timed(lambda: uncached(prior, args.num)))
    print(
        f"{args.num} sequences of {config.length} tokens, device {args.device}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    for name, seconds in rows.items():
        if seconds:
            shown = " ".join(f"{s:.2f}" for s in seconds)
            print(f"{name:>9}: {shown}  median {statistics.median(seconds):.2f} s")
    if rows["uncached"]:
        ratios = [u / c for c, u in zip(rows["cached"], rows["uncached"], strict=True)]
        shown = " ".join(f"{r:.2f}" for r in ratios)
        print(f"uncached / cached, each repeat: {shown}  median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
