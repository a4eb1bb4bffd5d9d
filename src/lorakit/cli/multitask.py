"""``lorakit multitask`` and ``lorakit continual``: several tasks on one base (`lorakit.multitask`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``lorakit multitask`` and ``lorakit continual``."""
    p = subparsers.add_parser("multitask", description=run_multitask.__doc__,
                              help="train several tasks on one base at once (one adapter per task in mixed batches, "
                                   "or shared + per task)")
    _recipe_args(p)
    p.add_argument("--benchmark", type=int, default=0, metavar="STEPS",
                   help="first time STEPS steps of mixed batches against the same steps one task after another")
    p.add_argument("--benchmark-repeats", type=int, default=3, metavar="N", help="alternate the two N times")
    p.add_argument("--benchmark-only", action="store_true", help="stop after the benchmark (no training run)")
    p.set_defaults(_run=run_multitask)
    p = subparsers.add_parser("continual", help="tasks one after another: the forgetting matrix of full "
                                                "fine-tuning, one LoRA and one adapter per task",
                              description=run_continual.__doc__)
    _recipe_args(p)
    p.set_defaults(_run=run_continual)


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="multi-task recipe name (e.g. multitask-mobilenet) or a YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=20 design=shared")
    p.add_argument("--output", "-o", default=None, help="output folder (default: runs/RECIPE or RECIPE-continual)")


def _check_runtime(recipe: Any) -> None:
    """Each task's device and data files, checked before anything loads (`lorakit.recipes.check_runtime`)."""
    from ..recipes import check_runtime

    for spec in recipe.tasks:
        check_runtime(recipe.task_recipe(spec))


def run_multitask(args: argparse.Namespace) -> int:
    """Train several tasks on one base at once: one adapter per task in mixed batches, or shared + per task;
    writes adapters/TASK, metrics.json and report.md."""
    from .. import distributed
    from ..errors import ConfigError
    from ..multitask import load_multitask_recipe, run_multitask as run

    recipe = load_multitask_recipe(args.recipe, args.overrides)
    _check_runtime(recipe)
    if args.benchmark_only and not args.benchmark:
        raise ConfigError("--benchmark-only needs --benchmark STEPS")
    output = Path(args.output or Path("runs") / recipe.name)
    # torchrun: every process runs this, the main one reports
    world = distributed.setup(recipe.train.device, cpu_collectives=recipe.train.fsdp_cpu_offload)
    try:
        metrics = run(recipe, output, benchmark_steps=args.benchmark, benchmark_repeats=args.benchmark_repeats,
                      benchmark_only=args.benchmark_only)
    finally:
        distributed.teardown(world)
    if world.is_main and not args.benchmark_only:
        print(f"\n{recipe.name}: {recipe.design} design, {metrics['steps']} steps in "
              f"{metrics['train_time_s']:.1f} s; report: {output / 'report.md'}")
    return 0


def run_continual(args: argparse.Namespace) -> int:
    """Tasks one after another: forgetting matrix for full fine-tuning, one LoRA, one adapter per task;
    writes metrics.json and report.md."""
    from .. import distributed
    from ..multitask import STRATEGY_LABELS, load_multitask_recipe, run_continual as run

    recipe = load_multitask_recipe(args.recipe, args.overrides)
    _check_runtime(recipe)
    output = Path(args.output or Path("runs") / f"{recipe.name}-continual")
    world = distributed.setup(recipe.train.device, cpu_collectives=recipe.train.fsdp_cpu_offload)
    try:
        results = run(recipe, output)  # refuses torchrun before loading anything
    finally:
        distributed.teardown(world)
    for strategy, res in results["strategies"].items():
        s = res["summary"]
        print(f"{STRATEGY_LABELS[strategy]:>30}: average final {s['metric']} {s['average_final']:.4f}, "
              f"BWT {s['bwt']:+.4f}")
    print(f"report: {output / 'report.md'}")
    return 0
