#!/usr/bin/env python
"""Complete and denoise held-out images with a fitted VAE's decoder as the prior.

The older name of ``restore.py`` (``pyro-vae restore``), kept so its commands keep
working: the task is inpainting when a mask is given (the default, left-half), else
denoising with --noise.

python scripts/inpaint.py --checkpoint runs/bernoulli-mlp/checkpoint.pt --mask left-half
"""

import sys

from pyro_vae.cli.restore import inpaint_main as main
from pyro_vae.cli.restore import inpaint_parser as parser
from pyro_vae.cli.restore import run_inpaint as run

__all__ = ["main", "parser", "run"]

if __name__ == "__main__":
    sys.exit(run(prog="inpaint.py"))
