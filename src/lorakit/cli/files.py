"""``lorakit info``, ``lorakit merge`` and ``lorakit export``: adapter folders inspected, folded into their base
model, or converted for a serving target (the library side: `lorakit.export`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..files import json_default


def register(subparsers: Any) -> None:
    """Add ``lorakit info``, ``lorakit merge`` and ``lorakit export``."""
    p = subparsers.add_parser("info", help="show an adapter's config, ranks, targets, size, fingerprint and "
                                           "provenance", description=info.__doc__)
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--base", default=None, help="a base model folder to compare the adapter's size with (the base "
                                                "named inside the adapter is shown, never opened)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(_run=info)

    p = subparsers.add_parser("merge", help="fold an adapter into its base model and write a plain model folder",
                              description=merge.__doc__)
    p.add_argument("base", help="base model: packaged name (minilm, smollm2, mobilenet-v2), folder or hub id")
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("output", help="folder for the merged model (written atomically)")
    p.add_argument("--task", default=None, help="default: from the adapter (task_type / provenance)")
    p.add_argument("--num-labels", type=int, default=None, help="default: from the adapter's classifier head")
    p.add_argument("--force", action="store_true", help="merge even if the base-model fingerprint differs")
    p.add_argument("--allow-pickle", action="store_true", help="accept a pickle adapter_model.bin")
    p.set_defaults(_run=merge)

    p = subparsers.add_parser("export", help="check an adapter against a serving target (vllm, peft) and write a "
                                             "converted copy", description=export.__doc__)
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--target", required=True, choices=("vllm", "peft"))
    p.add_argument("--output", "-o", default=None, help="write the (converted) copy here; without it only check")
    p.set_defaults(_run=export)


def info(args: argparse.Namespace) -> int:
    """Show an adapter's config, ranks, targets, size, fingerprint and provenance, from its config and the
    safetensors header (no tensor is read; nothing outside the folder is looked at)."""
    from ..export import adapter_info, format_info

    result = adapter_info(args.adapter, base=args.base)
    print(json.dumps(result, indent=2, default=json_default) if args.json else format_info(result))
    return 0


def merge(args: argparse.Namespace) -> int:
    """Fold an adapter into its base model and write a plain model folder (safetensors), with the measured
    difference between merged and unmerged outputs on real tokens."""
    from ..export import merge_to_folder

    print(merge_to_folder(args.base, args.adapter, args.output, task=args.task, num_labels=args.num_labels,
                          force=args.force, allow_pickle=args.allow_pickle))
    return 0


def export(args: argparse.Namespace) -> int:
    """Check an adapter against a serving target (vllm, peft) and, with --output, write a converted copy.
    Exit code 1 when the target cannot serve it."""
    from ..export import export_adapter

    report = export_adapter(args.adapter, args.target)
    if report.ok and args.output is not None:
        report = export_adapter(args.adapter, args.target, args.output)
    print(report)
    return 0 if report.ok else 1
