"""The ``traitloc`` command line: argument parsing and dispatch to :mod:`traitloc.pipelines`.

Imports: anything in traitloc; nothing in traitloc imports it.
"""

from traitloc.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
