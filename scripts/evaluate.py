#!/usr/bin/env python
"""Held-out evaluation of a fitted VAE: ``pyro-vae evaluate``, under its older name.

python scripts/evaluate.py --checkpoint runs/bernoulli-mlp/checkpoint.pt --particles 5000

The options and the work are pyro_vae.cli.evaluate's; this file keeps the commands
that name it working.
"""

import sys

from pyro_vae.cli.evaluate import main, parser, run

__all__ = ["main", "parser", "run"]

if __name__ == "__main__":
    sys.exit(run(prog="evaluate.py"))
