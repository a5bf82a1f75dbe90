"""What the tests of issue 5 share: where MNIST is, and running a script in-process."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def mnist_root() -> Path:
    """The folder holding MNIST/raw: $PYRO_VAE_MNIST_DIR, else the repository's ../shared/data.
    Missing data fails the test loudly rather than skipping it."""
    root = Path(os.environ.get("PYRO_VAE_MNIST_DIR", ROOT.parent / "shared" / "data"))
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(f"MNIST not found in {root}/MNIST/raw; set PYRO_VAE_MNIST_DIR", pytrace=False)
    return root


def run_script(name: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run ``scripts/name`` with ``args`` as ``python scripts/name ...`` would, without
    paying for a fresh interpreter; returns its exit status (its output goes to capsys)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))  # the scripts import their sibling _cli
    monkeypatch.setattr(sys, "argv", [name, *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    return exit_info.value.code
