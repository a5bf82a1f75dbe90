#!/usr/bin/env python
"""Test NLL after equal wall-clock training with the ELBO, IWAE and DReG objectives.

The network is the one of the 85.42 run in docs/benchmarks.md: MLP 784-500-500-50,
Bernoulli likelihood, dynamically binarized MNIST, Adam at 1e-3, batch 100, a KL warm-up
over the first 10 epochs. One process trains one objective, an epoch at a time, until its
training steps have taken ``--minutes`` of wall-clock time (a stopped run resumes from its
checkpoint and goes on to the same budget; ``--schedule 1e-3:80,3e-4:85,1e-4:90`` is a
step decay like the 85.42 run's, each rate up to that many minutes of training); then it
evaluates the held-out bound with K = 5000 importance samples per test image and the
active units, and writes ``<out>/<objective>/result.json``. Run the objectives side by
side (one thread each) so that they share the machine alike, then ``--report`` prints the
table:

    for o in elbo iwae dreg; do
        python benchmarks/objectives.py --objective $o --minutes 45 --out runs/objectives &
    done; wait
    python benchmarks/objectives.py --report --out runs/objectives
"""

from __future__ import annotations

import argparse
import json
import shutil
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


def parse_schedule(text: str) -> list[tuple[float, float]]:
    """``"1e-3:80,3e-4:85"`` -> ``[(1e-3, 80.0), (3e-4, 85.0)]``: Adam's rate and the
    training minutes up to which it holds, in increasing order of minutes."""
    steps = []
    for part in text.split(","):
        lr, _, minutes = part.partition(":")
        steps.append((float(lr), float(minutes)))
    if any(b[1] <= a[1] for a, b in zip(steps, steps[1:], strict=False)):
        raise SystemExit(f"--schedule {text!r}: the minutes must increase")
    return steps


def train(args: argparse.Namespace, folder: Path) -> VAE:
    """Train, an epoch at a time, through every step of the schedule; at the end of each
    step but the last, keep a copy of the checkpoint (``checkpoint.<seconds>s.pt``)."""
    train_images = load_mnist(args.data_dir, "train").images
    pyro.set_rng_seed(0)
    vae = VAE(latent_dim=50, hidden=500, depth=2)
    checkpoint = folder / "checkpoint.pt"
    run = Run(seed=0, accelerator="cpu", checkpoint=checkpoint, progress=False)
    epoch = 0
    if checkpoint.exists():
        epoch = load_checkpoint(checkpoint)["progress"]["epoch"]
    schedule = parse_schedule(args.schedule or f"{args.lr}:{args.minutes}")
    for number, (lr, minutes) in enumerate(schedule, start=1):
        while trained_seconds(checkpoint) < minutes * 60:
            epoch += 1
            history = fit(
                vae, train_images, batch_size=100, warmup=10,
                elbo=elbo_of(args.objective, args.particles),
                run=run.replace(lr=lr, epochs=epoch, resume=epoch > 1),
            )  # fmt: skip
            record, seconds = history.epochs[-1], trained_seconds(checkpoint)
            print(f"{args.objective}: epoch {record.epoch} lr {lr:g} loss "
                  f"{record.train_loss:.2f} ({seconds:.0f} s)", flush=True)  # fmt: skip
        kept = folder / f"checkpoint.{minutes * 60:.0f}s.pt"
        if number < len(schedule) and not kept.exists():
            shutil.copyfile(checkpoint, kept)
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
    p.add_argument(
        "--schedule",
        help="step decay as LR:MINUTES,... (train at each rate up to that many minutes of "
        "training; replaces --lr and --minutes), e.g. 1e-3:80.2333,3e-4:85,1e-4:90",
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
