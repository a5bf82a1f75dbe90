#!/usr/bin/env python
"""Draw or complete images with a discrete VAE and its token prior: ``pyro-vae generate``,
as a script.

python scripts/generate.py --checkpoint runs/grid/checkpoint.pt \\
    --prior runs/prior/checkpoint.pt --caption 7 --out sevens.png

The options and the work are pyro_vae.cli.generate's; this file runs them from a checkout.
"""

import sys

from pyro_vae.cli.generate import main, parser, run

__all__ = ["main", "parser", "run"]

if __name__ == "__main__":
    sys.exit(run(prog="generate.py"))
