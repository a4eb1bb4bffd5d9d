"""The ``lorakit`` command. Each sub-command is a small function registered in `COMMANDS`."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import LorakitError

#: sub-command name -> (configure parser, run). Modules add theirs with `command`.
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Decorator registering ``run(args) -> exit code`` as ``lorakit NAME``."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (configure, run)
        return run

    return register


def _targets_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder, packaged model name (minilm, smollm2, mobilenet-v2) or hub id")
    p.add_argument("--target", "-t", nargs="+", required=True,
                   help="module-name suffixes, one regex (--regex), or all-linear")
    p.add_argument("--regex", action="store_true", help="treat the single --target as a full-match regex")
    p.add_argument("--exclude", nargs="+", default=None, help="module-name suffixes never adapted")
    p.add_argument("--rank", "-r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="default: 2 x rank")
    p.add_argument("--dora", action="store_true")
    p.add_argument("--task", default="base", help="base | sequence-classification | causal-lm | image-classification")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


@command("targets", _targets_args)
def _targets(args: argparse.Namespace) -> int:
    """Print which modules a target spec selects, with shapes, ranks and added parameters."""
    import json

    from .config import LoraConfig
    from .inject import targeting_report
    from .models import load_model

    target: list[str] | str = args.target
    if args.regex or (len(args.target) == 1 and args.target[0].lower() == "all-linear"):
        if len(args.target) != 1:
            raise LorakitError("--regex takes exactly one pattern")
        target = args.target[0]
    config = LoraConfig(r=args.rank, alpha=args.alpha or 2 * args.rank, target_modules=target,
                        exclude_modules=args.exclude, use_dora=args.dora)
    model = load_model(args.model, task=args.task).model
    report = targeting_report(model, config)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    # importing these modules registers their sub-commands
    for module in ("lorakit.train", "lorakit.export", "lorakit.evidence.commands", "lorakit.analyze", "lorakit.multitask",
                   "lorakit.serve"):
        try:
            __import__(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    parser = argparse.ArgumentParser(prog="lorakit", description="Low-Rank Adaptation for PyTorch models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (configure, run) in COMMANDS.items():
        p = sub.add_parser(name, help=(run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else None)
        configure(p)
        p.set_defaults(_run=run)  # not `run`: a sub-command may have a positional named run
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        if "train" in COMMANDS:  # no arguments: the main job, the default recipe
            args = parser.parse_args(["train", *(argv or [])])
        else:
            parser.print_help()
            return 2
    try:
        return int(args._run(args) or 0)
    except LorakitError as err:
        print(f"lorakit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m lorakit.cli` (e.g. under torchrun): commands register on the importable module, not __main__
    from lorakit.cli import main as _main

    sys.exit(_main())
