"""The ``lorakit`` command.

One module per command group, each with ``register(subparsers)`` adding its sub-commands and their handlers
(``set_defaults(_run=handler)``; a handler returns the exit code). The CLI imports the library; library
modules never import the CLI. Every `LorakitError` (a bad recipe key or value, a missing file...) ends as one
line ``lorakit: error: ...`` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..errors import LorakitError
from . import evidence, files, generate, multitask, plan, recipes, runs, targets, train

#: command modules of this package, in the order ``lorakit --help`` lists them
COMMAND_MODULES = (train, runs, generate, targets, recipes, files, evidence, plan, multitask)

# -- transition: commands still registered by their library module ------------------------------------------
#: sub-command name -> (configure parser, run), filled by `command` when such a module is imported
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Decorator registering ``run(args) -> exit code`` as ``lorakit NAME`` (transitional: new commands live in
    a ``lorakit.cli`` module with ``register``)."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (configure, run)
        return run

    return register


def _import_legacy_commands() -> None:
    """Import the library modules that still register their sub-commands through `command`."""
    from .. import serve  # noqa: F401 - imported for its registrations


def build_parser() -> argparse.ArgumentParser:
    """The ``lorakit`` argument parser with every sub-command."""
    from .. import __version__  # here: `import lorakit` may be what is importing this module

    parser = argparse.ArgumentParser(prog="lorakit", description="Low-Rank Adaptation for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    _import_legacy_commands()
    for name, (configure, run) in COMMANDS.items():
        if name in sub.choices:
            continue
        p = sub.add_parser(name, help=(run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else None)
        configure(p)
        p.set_defaults(_run=run)  # not `run`: a sub-command may have a positional named run
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
