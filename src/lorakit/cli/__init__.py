"""The ``lorakit`` command.

One module per command group, each with ``register(subparsers)`` adding its sub-commands and their handlers
(``set_defaults(_run=handler)``; a handler returns the exit code). The CLI imports the library; library
modules never import the CLI. Every `LorakitError` (a bad recipe key or value, a missing file...) ends as one
line ``lorakit: error: ...`` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import LorakitError
from . import evidence, files, generate, multitask, plan, recipes, runs, serve, targets, train

#: command modules of this package, in the order ``lorakit --help`` lists them
COMMAND_MODULES = (train, runs, generate, targets, recipes, files, evidence, plan, multitask, serve)


def build_parser() -> argparse.ArgumentParser:
    """The ``lorakit`` argument parser with every sub-command."""
    from .. import __version__  # here: `import lorakit` may be what is importing this module

    parser = argparse.ArgumentParser(prog="lorakit", description="Low-Rank Adaptation for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``lorakit ARGV``; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):  # `lorakit` alone: say what there is, start nothing
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except LorakitError as err:
        print(f"lorakit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
