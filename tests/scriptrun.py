"""Run a command-line script of scripts/ in this process, as ``python scripts/NAME ...``
would, without paying for a fresh interpreter that imports torch and Pyro again."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run_script(name: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """The exit status of ``scripts/name`` run with ``args``; its output goes to capsys."""
    monkeypatch.syspath_prepend(str(SCRIPTS))  # the scripts import their sibling _cli
    monkeypatch.setattr(sys, "argv", [name, *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    return exit_info.value.code
