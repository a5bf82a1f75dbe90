#!/usr/bin/env python
"""Restore held-out images with a fitted VAE: ``pyro-vae restore``, under its older name.

python scripts/restore.py --checkpoint runs/quickstart/checkpoint.pt --task inpaint --mask left-half
python scripts/restore.py --checkpoint runs/quickstart/checkpoint.pt --task denoise --noise 0.3

The options and the work are pyro_vae.cli.restore's; this file keeps the commands
that name it working.
"""

import sys

from pyro_vae.cli.restore import main, parser, run

__all__ = ["main", "parser", "run"]

if __name__ == "__main__":
    sys.exit(run(prog="restore.py"))
