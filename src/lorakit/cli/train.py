"""``lorakit train``: train a recipe into a run folder (adapter or model, metrics, the recipe as run)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..recipes import DEFAULT_RECIPE


def register(subparsers: Any) -> None:
    """Add ``lorakit train``."""
    p = subparsers.add_parser("train", help="train a recipe (default: sentiment-minilm) into a run folder",
                              description=run.__doc__, epilog=override_keys())
    p.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE,
                   help=f"a shipped recipe's name (`lorakit recipes`) or a YAML file (default: {DEFAULT_RECIPE})")
    p.add_argument("overrides", nargs="*",
                   help="key=value overrides, e.g. train.lr=1e-3 lora.r=16 method=full data=my.csv")
    p.add_argument("--output", "-o", default=None, help="output folder (default: runs/RECIPE)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.safetensors (the exact state of the interrupted run)")
    p.set_defaults(_run=run)


def override_keys() -> str:
    """The keys ``key=value`` overrides can set, section by section (for ``--help``)."""
    import dataclasses

    from ..config import LoraConfig
    from ..recipes import DataOptions, EvalArgs, Recipe, TrainArgs

    top = [f.name for f in dataclasses.fields(Recipe) if f.name not in ("data_options", "train", "eval", "lora")]
    lora = [f.name for f in dataclasses.fields(LoraConfig) if f.name not in ("task_type", "base_model_name_or_path")]
    sections = {"": top, "data.": ["path", *(f.name for f in dataclasses.fields(DataOptions))],
                "train.": [f.name for f in dataclasses.fields(TrainArgs)],
                "eval.": [f.name for f in dataclasses.fields(EvalArgs)], "lora.": lora}
    lines = [", ".join(prefix + key for key in keys) for prefix, keys in sections.items()]
    return "override keys (`lorakit recipes show NAME` shows a recipe's values): " + "; ".join(lines)


def recipe_and_overrides(recipe: str, overrides: list[str]) -> tuple[str, list[str]]:
    """``lorakit train train.lr=1e-3`` has no recipe: a first positional with ``=`` is an override."""
    if "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        return DEFAULT_RECIPE, [recipe, *overrides]
    return recipe, list(overrides)


def run(args: argparse.Namespace) -> int:
    """Train a recipe and write the adapter (or model), metrics.json and recipe.yaml into the run folder.
    Every recipe key and value is checked before a model or dataset is read."""
    from .. import distributed
    from ..recipes import check_runtime, load_recipe
    from ..train import train

    name, overrides = recipe_and_overrides(args.recipe, args.overrides)
    recipe = load_recipe(name, overrides)
    check_runtime(recipe)
    output = Path(args.output or Path("runs") / recipe.name)
    world = distributed.setup(recipe.train.device, cpu_collectives=recipe.train.fsdp_cpu_offload)
    try:
        metrics = train(recipe, output, resume=args.resume)
    except KeyboardInterrupt:
        return 130
    finally:
        distributed.teardown(world)
    if world.is_main:
        print_summary(metrics, output)
    return 0


def print_summary(metrics: dict[str, Any], output: Path) -> None:
    """The few lines a user reads after training: the task's metric before/after, size, time, where it went."""
    from ..tasks import primary_metric

    name = primary_metric(metrics["task"]).name
    print(f"\n{metrics['recipe']}: {metrics['method']} on {metrics['model']} / {metrics['data']}")
    print(f"  held-out {name}: {metrics['base_eval'][name]:.4f} before -> {metrics['eval'][name]:.4f} after")
    for extra in ("perplexity", "chrf"):
        if extra in metrics["eval"]:
            print(f"  held-out {extra}: {metrics['base_eval'].get(extra, float('nan')):.2f} before -> "
                  f"{metrics['eval'][extra]:.2f} after")
    print(f"  trained {metrics['trainable_params']:,} of {metrics['total_params']:,} parameters "
          f"({100 * metrics['trainable_fraction']:.3f}%) in {metrics['train_time_s']:.1f} s, "
          f"peak memory {metrics['peak_memory_mb']:.0f} MB")
    print(f"  saved {metrics['adapter_bytes'] / 1e6:.2f} MB to {output} (metrics.json)")
