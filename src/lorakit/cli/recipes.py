"""``lorakit recipes``: list the shipped recipes, show one, copy one to a file to edit, validate a file.

``validate`` runs every check `lorakit train` runs before it loads anything (keys, values, devices), without
loading a model or a dataset.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``lorakit recipes`` with its actions ``list``, ``show``, ``copy``, ``validate``."""
    p = subparsers.add_parser("recipes", help="list, show, copy or validate recipes", description=__doc__)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    p.set_defaults(_run=list_recipes)
    actions.add_parser("list", help="the shipped recipes with their descriptions").set_defaults(_run=list_recipes)
    show = actions.add_parser("show", help="print a recipe's YAML")
    show.add_argument("name", help="a shipped recipe's name or a YAML file")
    show.set_defaults(_run=show_recipe)
    copy = actions.add_parser("copy", help="copy a shipped recipe to a file to edit")
    copy.add_argument("name", help="a shipped recipe's name")
    copy.add_argument("file", help="the new YAML file (not overwritten if it exists)")
    copy.set_defaults(_run=copy_recipe)
    check = actions.add_parser("validate", help="check a recipe (file or name, with overrides) without loading")
    check.add_argument("name", help="a YAML file or a shipped recipe's name")
    check.add_argument("overrides", nargs="*", help="key=value overrides, as for `lorakit train`")
    check.set_defaults(_run=validate_recipe)


def list_recipes(args: argparse.Namespace) -> int:
    """One line per shipped recipe: name, task and description."""
    import yaml

    from ..recipes import recipe_names, recipe_path

    names = recipe_names()
    width = max(map(len, names), default=0)
    for name in names:
        data = yaml.safe_load(recipe_path(name).read_text()) or {}
        print(f"{name:<{width}}  {data.get('task', '?'):<24}  {data.get('description', '')}")
    return 0


def show_recipe(args: argparse.Namespace) -> int:
    """Print a recipe file as it is (comments included)."""
    from ..recipes import recipe_path

    print(recipe_path(args.name).read_text(), end="")
    return 0


def copy_recipe(args: argparse.Namespace) -> int:
    """Copy a recipe to a new file; never overwrites."""
    from ..errors import ConfigError
    from ..recipes import recipe_path

    source = recipe_path(args.name)
    target = Path(args.file).expanduser()
    if target.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"{target}: a recipe file ends in .yaml (fix: {target.with_suffix('.yaml')})")
    if not target.parent.is_dir():
        raise ConfigError(f"{target.parent} is not a folder (fix: create it first)")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # O_EXCL: never clobber a file
    except FileExistsError:
        raise ConfigError(f"{target} exists (fix: another file name, or delete it first)") from None
    with os.fdopen(fd, "w") as f:
        f.write(source.read_text())
    print(f"copied {source.stem} to {target}; edit it, then `lorakit recipes validate {target}` and "
          f"`lorakit train {target}`")
    return 0


def validate_recipe(args: argparse.Namespace) -> int:
    """Run every check `lorakit train` runs before loading; print what would be trained."""
    from ..recipes import check_runtime, load_recipe, read_recipe_yaml, recipe_path
    from .train import recipe_and_overrides

    name, overrides = recipe_and_overrides(args.name, list(args.overrides))
    if "tasks" in read_recipe_yaml(recipe_path(name)):  # a multi-task recipe: its own schema
        from ..multitask.recipe import load_multitask_recipe

        several = load_multitask_recipe(name, overrides)
        for spec in several.tasks:
            check_runtime(several.task_recipe(spec))
        print(f"ok: {several.name} — {several.design} on {several.model}, tasks "
              f"{', '.join(f'{s.name} ({s.data})' for s in several.tasks)}")
        return 0
    recipe = load_recipe(name, overrides)
    check_runtime(recipe)
    print(f"ok: {recipe.name} — {recipe.method} on {recipe.model} / {recipe.data} ({recipe.task})")
    return 0
