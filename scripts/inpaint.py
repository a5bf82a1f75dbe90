#!/usr/bin/env python
"""Complete and denoise held-out images with a fitted VAE's decoder as the prior.

The older name of ``restore.py``, kept so its commands keep working: the task is
inpainting when a mask is given (the default, left-half), else denoising with --noise.

python scripts/inpaint.py --checkpoint runs/bernoulli-mlp/checkpoint.pt --mask left-half
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import restore
from _cli import run_main


def parser() -> argparse.ArgumentParser:
    p = restore.parser("inpaint.py", choose_task=False)
    p.description = __doc__.splitlines()[0]
    p.set_defaults(mask="left-half", noise=0.0, out=Path("inpainting.png"))
    return p


def main(args: argparse.Namespace) -> None:
    args.task = "inpaint" if args.mask != "none" else "denoise"
    args.factor = None
    restore.main(args)


if __name__ == "__main__":
    sys.exit(run_main(main, parser()))
