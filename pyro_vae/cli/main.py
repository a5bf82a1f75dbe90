"""``pyro-vae``: one command, with a subcommand per task.

pyro-vae fit --data-dir ../shared/data --out runs/quickstart
pyro-vae evaluate --checkpoint runs/quickstart/checkpoint.pt --data-dir ../shared/data
pyro-vae <command> --help

A small dispatch table rather than argparse's subparsers: each command module parses
its own options (``--config`` replays need the command's own parser), and only the
module of the command asked for is imported.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: command -> (module under pyro_vae.cli, one line for ``pyro-vae --help``).
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("fit", "fit a VAE and write a run folder (config, history, metrics, pictures)"),
    "fit-ssvae": ("fit_ssvae", "fit the M2 semi-supervised VAE on MNIST with a few labels"),
    "evaluate": ("evaluate", "held-out IWAE log-likelihood, ELBO, KL, active units, pictures"),
    "ppc": ("ppc", "posterior predictive checks: p-values, an ArviZ file and figures"),
    "restore": ("restore", "inpaint, denoise or upscale held-out images with a fitted VAE"),
    "tokenize": ("tokens", "turn images into a discrete VAE's tokens, or tokens into images"),
    "fit-prior": ("fit_prior", "fit a learned prior (a small transformer) over a VAE's tokens"),
    "generate": ("generate", "draw or complete images with a discrete VAE and its token prior"),
}
PROG = "pyro-vae"


def usage() -> str:
    """The text of ``pyro-vae --help``: the commands, one line each."""
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {PROG} <command> [options]",
        "",
        "Variational autoencoders in Pyro: fit, evaluate and use them from the command line.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()),
        "",
        f"'{PROG} <command> --help' lists a command's options.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pyro-vae`` with ``argv`` (default: the command line); return the exit status.

    The first argument names the command; the rest are its options. A missing or
    unknown command is a one-line error with status 2, as a bad option is.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        print(f"{PROG}: error: name a command: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help", "help"):
        print(usage())
        return 0
    if command == "--version":
        from pyro_vae import __version__

        print(f"{PROG} {__version__}")
        return 0
    if command not in COMMANDS:
        print(
            f"{PROG}: error: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(f"pyro_vae.cli.{COMMANDS[command][0]}")
    return module.run(rest, prog=f"{PROG} {command}")


if __name__ == "__main__":
    sys.exit(main())
