#!/usr/bin/env python
"""Posterior predictive checks of a fitted VAE: ``pyro-vae ppc``, under its older name.

python scripts/ppc.py --checkpoint runs/bernoulli-mlp/checkpoint.pt --images 100 --draws 100

The options and the work are pyro_vae.cli.ppc's; this file keeps the commands that
name it working.
"""

import sys

from pyro_vae.cli.ppc import main, parser, run

__all__ = ["main", "parser", "run"]

if __name__ == "__main__":
    sys.exit(run(prog="ppc.py"))
