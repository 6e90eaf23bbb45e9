"""The ``raggen`` command, one module per command group (``world``, ``index``, ``train``, ``serve``,
``rehearsal``), the parser and entry point (``parser``), and the one-line failures that it and
``jobs/*.py`` print (``failures``). Commands import what they run on first use, so ``--help`` stays quick."""

from raggen.cli.failures import failure_message, run_job
from raggen.cli.parser import build_parser, main

__all__ = ["build_parser", "failure_message", "main", "run_job"]
