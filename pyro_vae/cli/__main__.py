"""``python -m pyro_vae.cli <command> ...``: the ``pyro-vae`` command without its launcher."""

import sys

from .main import main

sys.exit(main())
