"""``lorakit targets``: which modules a target spec selects (a dry run of injection: nothing is trained)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..tasks import MODEL_TASKS


def register(subparsers: Any) -> None:
    """Add ``lorakit targets``."""
    p = subparsers.add_parser("targets", help="show which modules a target spec adapts, with shapes and sizes",
                              description=run.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="model folder, packaged model name (minilm, smollm2, mobilenet-v2) or hub id")
    p.add_argument("--target", "-t", nargs="+", required=True,
                   help="module-name suffixes, one regex (--regex), or all-linear")
    p.add_argument("--regex", action="store_true", help="treat the single --target as a full-match regex")
    p.add_argument("--exclude", nargs="+", default=None, help="module-name suffixes never adapted")
    p.add_argument("--rank", "-r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: LoraConfig's, PEFT's 8)")
    p.add_argument("--dora", action="store_true")
    p.add_argument("--task", default="base", choices=MODEL_TASKS, help="the head the model is loaded with")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(_run=run)


def run(args: argparse.Namespace) -> int:
    """Print which modules a target spec selects, with shapes, ranks and added parameters (and why others are
    skipped). The spec is checked before the model loads."""
    from ..config import LoraConfig
    from ..errors import ConfigError
    from ..inject import targeting_report
    from ..models import load_model

    target: list[str] | str = args.target
    if args.regex or (len(args.target) == 1 and args.target[0].lower() == "all-linear"):
        if len(args.target) != 1:
            raise ConfigError("--regex takes exactly one pattern (fix: quote one regex, or drop --regex)")
        target = args.target[0]
    settings: dict[str, Any] = {"r": args.rank, "target_modules": target, "exclude_modules": args.exclude,
                                "use_dora": args.dora}
    if args.alpha is not None:
        settings["alpha"] = args.alpha
    config = LoraConfig(**settings)
    model = load_model(args.model, task=args.task).model
    report = targeting_report(model, config)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0
