"""``lorakit serve``: its options (one per `ServeConfig` field, defaults and help taken from the dataclass)
and its handler."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import types
import typing
from pathlib import Path

from ..serve.config import ServeConfig

log = logging.getLogger(__name__)

#: options of ServeConfig fields that are not plain numbers on the command line
_SECRET = {"admin_token"}  # never printed as a default in --help


def _value_type(hint: typing.Any) -> type:
    """``int`` for ``int | None`` and so on: the type argparse converts the option's text with."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def add_config_options(p: argparse.ArgumentParser) -> None:
    """``--max-batch``... one option per `ServeConfig` field, its default the field's default."""
    hints = typing.get_type_hints(ServeConfig)
    group = p.add_argument_group("server limits")
    for f in dataclasses.fields(ServeConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in _SECRET:
            group.add_argument(flag, default=None, help=f.metadata["help"] + " (default: $LORAKIT_ADMIN_TOKEN)")
            continue
        group.add_argument(flag, type=_value_type(hints[f.name]), default=f.default,
                           help=f.metadata["help"] + " (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The `ServeConfig` the parsed options describe (the admin token also from ``$LORAKIT_ADMIN_TOKEN``)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)}
    values["admin_token"] = values["admin_token"] or os.environ.get("LORAKIT_ADMIN_TOKEN") or None
    return ServeConfig(**values)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="smollm2", help="base model: packaged name, HF folder or hub id "
                                                     "(default: %(default)s)")
    p.add_argument("--task", default="causal-lm", choices=("causal-lm", "sequence-classification"),
                   help="(default: %(default)s)")
    p.add_argument("--num-labels", type=int, default=None, help="classes of a new classification head")
    p.add_argument("--name", default=None, help="the base's model id in the API (default: --base)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="adapter loaded at start (repeat); a bare PATH is named after its folder")
    p.add_argument("--adapter-dir", default=None, help="folder of adapter folders, loaded by name on first use")
    p.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", help="(default: %(default)s)")
    add_config_options(p)


def adapters_from_args(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` (or a bare PATH, named after its folder) -> {name: path}."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        adapters[name] = path
    return adapters


def run(args: argparse.Namespace) -> int:
    """Serve a base model and many adapters over an OpenAI-compatible HTTP API, with continuous batching."""
    import torch
    import uvicorn

    from ..serve.http import create_app
    from ..serve.launch import build_engine

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    adapters = adapters_from_args(args.adapter)
    engine = build_engine(args.base, args.task, adapters, args.adapter_dir, args.name, args.num_labels,
                          config_from_args(args))
    log.info("serving %s (%s) with %d adapter(s) on http://%s:%d", engine.base_name, engine.task, len(adapters),
             args.host, args.port)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


def register(subparsers: typing.Any) -> None:
    """Add ``lorakit serve`` to the ``lorakit`` sub-command parsers."""
    p = subparsers.add_parser("serve", help=(run.__doc__ or "").splitlines()[0])
    configure(p)
    p.set_defaults(_run=run)

