#!/usr/bin/env python
"""Fit the M2 semi-supervised VAE: ``pyro-vae fit-ssvae``, under its older name.

python scripts/fit_ssvae.py --labels-per-class 10 --epochs 40 --out runs/ssvae

The options and the work are pyro_vae.cli.fit_ssvae's; this file keeps the commands
that name it working.
"""

import sys

from pyro_vae.cli.fit_ssvae import main, parser, run

__all__ = ["main", "parser", "run"]

if __name__ == "__main__":
    sys.exit(run(prog="fit_ssvae.py"))
