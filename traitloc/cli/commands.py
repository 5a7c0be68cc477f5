"""The ``traitloc`` command: the parser built from the command modules, and the dispatch.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args, argv) -> int``
(:data:`SUBCOMMAND_MODULES`). Each prints progress on long work (``--quiet`` silences it), exits non-zero with a
one-line reason on bad input (:class:`traitloc.pipelines.options.CliError` and the library's input errors: exit
status 2), and writes ``run.json`` beside its outputs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType

from traitloc.pipelines.options import CliError, Parser

__all__ = ["COMMANDS", "SUBCOMMAND_MODULES", "CliError", "build_parser", "main"]

#: modules (under ``traitloc``) that add one subcommand each: ``add_parser(subparsers)`` and ``run(args, argv) -> int``
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "pipelines.localize",
    "pipelines.train",
    "pipelines.explain",
    "pipelines.evaluate",
    "pipelines.evaluate_text",
    "pipelines.audit",
    "pipelines.export",
    "cli.app",
)
#: command name -> its run function; filled by :func:`build_parser`
COMMANDS: dict[str, Callable[[argparse.Namespace, Sequence[str]], int]] = {}


def build_parser() -> argparse.ArgumentParser:
    """The ``traitloc`` parser with every subcommand of :data:`SUBCOMMAND_MODULES` (registered in :data:`COMMANDS`)."""
    from traitloc import __version__

    parser = Parser(
        prog="traitloc",
        description="Localize visual traits in images and audit species classifiers with Finer-CAM.",
    )
    parser.add_argument("--version", action="version", version=f"traitloc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        mod = importlib.import_module(f"traitloc.{name}")
        before = set(sub.choices)
        mod.add_parser(sub)
        for command in set(sub.choices) - before:
            COMMANDS[command] = _module_runner(mod)
    return parser


def _module_runner(mod: ModuleType) -> Callable[[argparse.Namespace, Sequence[str]], int]:
    def runner(args: argparse.Namespace, argv: Sequence[str]) -> int:
        return int(mod.run(args, argv))

    return runner


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``traitloc`` console script: parse ``argv``, run the command, return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="traitloc: %(message)s")
    if getattr(args, "quiet", False):
        warnings.filterwarnings("ignore", category=UserWarning, module="open_clip")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from traitloc.io.store import StoreError
    from traitloc.models.clip import ModelLoadError
    from traitloc.models.text import PromptError
    from traitloc.pipelines.distributed import RayUnavailableError

    try:
        return COMMANDS[args.command](args, argv)
    except (CliError, ModelLoadError, PromptError, StoreError, RayUnavailableError) as err:
        print(f"traitloc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"traitloc {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
