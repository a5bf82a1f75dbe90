"""The command line: ``pyro-vae <command> [options]``, one module per command.

The library (every module of :mod:`pyro_vae` outside this package) takes its settings as
arguments and objects (:class:`~pyro_vae.VAEConfig`, :class:`~pyro_vae.run.Run`) and
never parses a command line; this package turns options into those objects, prints
users' mistakes as one line, and writes run folders. :mod:`pyro_vae.cli.main` is the
``pyro-vae`` command; the files in ``scripts/`` are thin fronts to the same modules, kept
so that ``python scripts/fit.py ...`` works as it always did.

Each command module has ``parser(prog)`` (its options), ``main(args)`` (the work, from
parsed options) and ``run(argv, prog) -> int`` (both, with one-line errors: the exit
status).
"""
