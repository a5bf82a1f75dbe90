#!/usr/bin/env python
"""Fit a learned prior over a discrete VAE's tokens: ``pyro-vae fit-prior``, as a script.

python scripts/fit_prior.py --checkpoint runs/grid/checkpoint.pt --out runs/prior

The options and the work are pyro_vae.cli.fit_prior's; this file runs them from a checkout.
"""

import sys

from pyro_vae.cli.fit_prior import main, parser, run

__all__ = ["main", "parser", "run"]

if __name__ == "__main__":
    sys.exit(run(prog="fit_prior.py"))
