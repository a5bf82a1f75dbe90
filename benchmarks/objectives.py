#!/usr/bin/env python
"""Test NLL after equal wall-clock training with the ELBO, IWAE and DReG objectives.

The network is the one of the 85.42 run in docs/benchmarks.md: MLP 784-500-500-50,
Bernoulli likelihood, dynamically binarized MNIST, Adam at 1e-3, batch 100, a KL warm-up
over the first 10 epochs. One process trains one objective, an epoch at a time, until its
training steps have taken ``--minutes`` of wall-clock time (a stopped run resumes from its
checkpoint and goes on to the same budget; ``--lr`` with a larger ``--minutes`` continues
at another rate, as the 85.42 run's step decay did); then it evaluates the held-out bound with
K = 5000 importance samples per test image and the active units, and writes
``<out>/<objective>/result.json``. Run the objectives side by side (one thread each) so that
they share the machine alike, then ``--report`` prints the table:

    for o in elbo iwae dreg; do
        python benchmarks/objectives.py --objective $o --minutes 45 --out runs/objectives &
    done; wait
    python benchmarks/objectives.py --report --out runs/objectives
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch

from pyro_vae import VAE, Run, fit, load_checkpoint
from pyro_vae.data import load_mnist
from pyro_vae.evaluate import evaluate_vae
from pyro_vae.objectives import IWAE_ELBO

OBJECTIVES = ("elbo", "iwae", "dreg")


def elbo_of(objective: str, particles: int):
    if objective == "elbo":
        return "trace"
    return IWAE_ELBO(particles, "iwae" if objective == "iwae" else "dreg")


def trained_seconds(checkpoint: Path) -> float:
    if not checkpoint.exists():
        return 0.0
    return sum(row["seconds"] for row in load_checkpoint(checkpoint).get("history", []))


def train(args: argparse.Namespace, folder: Path) -> VAE:
    train_images = load_mnist(args.data_dir, "train").images
    pyro.set_rng_seed(0)
    vae = VAE(latent_dim=50, hidden=500, depth=2)
    checkpoint = folder / "checkpoint.pt"
    run = Run(lr=args.lr, seed=0, accelerator="cpu", checkpoint=checkpoint, progress=False)
    epoch = 0
    if checkpoint.exists():
        epoch = load_checkpoint(checkpoint)["progress"]["epoch"]
    while trained_seconds(checkpoint) < args.minutes * 60:
        epoch += 1
        history = fit(
            vae, train_images, batch_size=100, warmup=10,
            elbo=elbo_of(args.objective, args.particles),
            run=run.replace(epochs=epoch, resume=epoch > 1),
        )  # fmt: skip
        record = history.epochs[-1]
        print(f"{args.objective}: epoch {record.epoch} loss {record.train_loss:.2f} "
              f"({trained_seconds(checkpoint):.0f} s)", flush=True)  # fmt: skip
    return vae


def main(args: argparse.Namespace) -> None:
    if args.report:
        report(args.out)
        return
    torch.set_num_threads(args.threads)
    folder = args.out / args.objective
    folder.mkdir(parents=True, exist_ok=True)
    vae = train(args, folder)
    if args.train_only:
        return
    state = load_checkpoint(folder / "checkpoint.pt")
    vae.load_state_dict(state["model"])
    vae.eval()
    test = load_mnist(args.data_dir, "test").images[: args.test_images]
    start = time.perf_counter()
    result = evaluate_vae(vae, test, num_particles=args.eval_particles, progress=False)
    record = {
        "objective": args.objective,
        "particles": None if args.objective == "elbo" else args.particles,
        "epochs": state["progress"]["epoch"],
        "train_seconds": trained_seconds(folder / "checkpoint.pt"),
        "evaluation_seconds": time.perf_counter() - start,
        **result.to_dict(),
    }
    (folder / "result.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


def report(out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    print("| objective | epochs | training (s) | test images | K | test NLL | ELBO | active |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name = r["objective"] + ("" if r["particles"] is None else f" k={r['particles']}")
        print(
            f"| {name} | {r['epochs']} | {r['train_seconds']:.0f} | {r['num_images']} | "
            f"{r['num_particles']} | {-r['log_likelihood']:.2f} ± {r['log_likelihood_se']:.2f} | "
            f"{r['elbo']:.2f} | {r['active_units']} of {len(r['activity'])} |"
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objective", choices=OBJECTIVES, default="elbo")
    p.add_argument("--particles", type=int, default=5, help="k of iwae and dreg")
    p.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--lr", type=float, default=1e-3, help="Adam's rate (a resumed run takes the new one)"
    )
    p.add_argument("--train-only", action="store_true", help="train to --minutes, no evaluation")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--test-images", type=int, default=10_000)
    p.add_argument("--eval-particles", type=int, default=5000)
    p.add_argument("--out", type=Path, default=Path("runs/objectives"))
    p.add_argument("--report", action="store_true", help="print the table of finished runs")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
