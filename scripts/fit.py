#!/usr/bin/env python
"""Fit a VAE and write a run folder: ``pyro-vae fit``, under its older name.

python scripts/fit.py --likelihood gaussian --epochs 10 --out runs/gaussian

The options and the work are pyro_vae.cli.fit's; this file keeps the commands that
name it working.
"""

import sys

from pyro_vae.cli.fit import main, parser, run

__all__ = ["main", "parser", "run"]

if __name__ == "__main__":
    sys.exit(run(prog="fit.py"))
