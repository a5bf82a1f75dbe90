#!/usr/bin/env python
"""Turn images into tokens with a discrete VAE, or tokens back into images:
``pyro-vae tokenize``, under its older name.

python scripts/tokenize.py --checkpoint runs/grid/checkpoint.pt --split test --out tokens.pt
python scripts/tokenize.py --checkpoint runs/grid/checkpoint.pt --decode tokens.pt --out grid.png
"""

import sys

if __name__ == "__main__":
    from pyro_vae.cli.tokens import run

    sys.exit(run(prog="tokenize.py"))
else:
    # Run as a script, this folder is first on sys.path, so the standard library's
    # ``tokenize`` (imported by ``inspect``, hence by torch) would find this file instead
    # and every script here would break. Imported under that name, this file puts the
    # real module in its place.
    import importlib.machinery
    import importlib.util
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    _path = [p for p in sys.path if Path(p or ".").resolve() != _here]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
