"""What the tests share: where MNIST is, and running a script in-process."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import pytest

from pyro_vae.data import default_data_dir

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def mnist_root() -> Path:
    """``$PYRO_VAE_MNIST_DIR``, else the project's shared data beside the checkout, else the
    user's data folder (where torchvision downloads MNIST when it is online)."""
    if "PYRO_VAE_MNIST_DIR" in os.environ:
        return Path(os.environ["PYRO_VAE_MNIST_DIR"])
    shared = REPO.parent / "shared" / "data"
    return shared if (shared / "MNIST" / "raw").is_dir() else default_data_dir()


def run_script(name: str, *args) -> int:
    """Run ``scripts/name`` as ``python scripts/name args...`` would, in this process (the
    imports stay warm), and return its exit status; its output goes to pytest's capture."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(SCRIPTS))  # as python puts a script's folder first
        patch.setattr(sys, "argv", [name, *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    return exit_info.value.code


def pyro_vae(capsys, *args) -> tuple[int, str, str]:
    """``pyro-vae args...`` in this process: (exit status, stdout, stderr)."""
    from pyro_vae.cli.main import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:  # argparse's --help and errors, Ctrl-C's 130
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *expected: str) -> None:
    """Status 2 and one ``error:`` line, without a traceback, naming every ``expected``."""
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert " error: " in line and all(part in line for part in expected), err
