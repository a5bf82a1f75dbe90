#!/usr/bin/env python
"""Where a training step's time goes: Pyro's Trace_ELBO against the hand-written loss.

Times, interleaved in rounds and reported as medians, the forward pass of the
hand-written loss of ``speed.py``, the pieces of ``Trace_ELBO.differentiable_loss`` on
the package's model and guide (tracing the guide, replaying the model against it, the
whole loss), and a full step (forward, backward, Adam) of both. At a tiny batch the
arithmetic is nil and what remains is each side's fixed cost per step.

    python benchmarks/step_overhead.py --batch 2 --threads 1
    python benchmarks/step_overhead.py --batch 256 --threads 2
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from speed import plain_loss

from pyro_vae import VAE

NUM_DATA = 60_000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50, help="calls per timing")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = VAE()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x = (torch.rand(args.batch, 1, 28, 28) < 0.3).float()
    # the bodies fit() runs: no param-store registration, no mean image
    model = functools.partial(VAE._model_body, vae)
    guide = functools.partial(VAE.guide.__wrapped__, vae)
    elbo = Trace_ELBO()

    def pyro_loss() -> torch.Tensor:
        return elbo.differentiable_loss(model, guide, x, num_data=NUM_DATA)

    def step(loss_fn) -> None:
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    guide_trace = poutine.trace(guide).get_trace(x, num_data=NUM_DATA)
    pieces = {
        "hand-written loss, forward": lambda: plain_loss(vae, x, NUM_DATA),
        "Trace_ELBO loss, forward": pyro_loss,
        "  trace the guide": lambda: poutine.trace(guide).get_trace(x, num_data=NUM_DATA),
        "  replay the model": lambda: poutine.trace(
            poutine.replay(model, trace=guide_trace)
        ).get_trace(x, num_data=NUM_DATA),
        "hand-written step": lambda: step(lambda: plain_loss(vae, x, NUM_DATA)),
        "Trace_ELBO step": lambda: step(pyro_loss),
    }
    times: dict[str, list[float]] = {name: [] for name in pieces}
    with pyro.validation_enabled(False), pyro.get_param_store().scope():
        for fn in pieces.values():  # warm-up
            for _ in range(10):
                fn()
        for r in range(args.rounds):
            order = list(pieces.items())
            for name, fn in order if r % 2 == 0 else reversed(order):
                start = time.perf_counter()
                for _ in range(args.repeats):
                    fn()
                times[name].append((time.perf_counter() - start) / args.repeats * 1e3)
    print(f"batch {args.batch}, torch threads {torch.get_num_threads()}, medians of {args.rounds}")
    for name, values in times.items():
        print(f"{name:30s} {statistics.median(values):7.3f} ms")


if __name__ == "__main__":
    main()
