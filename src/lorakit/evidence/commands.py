"""The evidence commands: ``lorakit compare``, ``sweep`` and ``recommend`` (argument parsing and printing only;
the work is in `lorakit.evidence`)."""

from __future__ import annotations

import argparse

from ..cli import command
from .compare import FULL_LR_RATIO, compare
from .ranks import RACE_FACTOR
from .recommend import recommend
from .sweep import sweep


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe name under recipes/ or a YAML file")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. train.max_train_examples=3200")
    p.add_argument("--output", "-o", default=None, help="report folder (default: runs/COMMAND-RECIPE)")


def _compare_args(p: argparse.ArgumentParser) -> None:
    _recipe_args(p)
    p.add_argument("--data-fractions", type=_floats, default=[0.1, 0.25, 0.5, 1.0],
                   help="fractions of the recipe's training examples (default 0.1,0.25,0.5,1.0)")
    p.add_argument("--full-lr", type=float, default=None, help=f"default: LoRA lr x {FULL_LR_RATIO}")
    p.add_argument("--lora-lr", type=float, default=None, help="default: the recipe's train.lr")
    p.add_argument("--keep-weights", action="store_true", help="keep the full fine-tuned model folders")
    p.add_argument("--no-probe", action="store_true", help="skip the knowledge-preservation probe")


@command("compare", _compare_args)
def _compare_cli(args: argparse.Namespace) -> int:
    """Full fine-tuning vs LoRA on a recipe: claims table with computed verdicts, plots, report."""
    result = compare(args.recipe, args.overrides, args.data_fractions, args.output, args.full_lr, args.lora_lr,
                     args.keep_weights, probe=not args.no_probe)
    for row in result["claims"]:
        print(f"  {row['verdict']:<14} {row['claim']}: full {row['full']} | LoRA {row['lora']}")
    return 0


def _sweep_args(p: argparse.ArgumentParser) -> None:
    _recipe_args(p)
    p.add_argument("--ranks", type=_ints, default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--lrs", type=_floats, default=None, help="default: the recipe's train.lr")


@command("sweep", _sweep_args)
def _sweep_cli(args: argparse.Namespace) -> int:
    """LoRA rank (x learning-rate) sweep with metric-vs-rank and metric-vs-parameters plots."""
    sweep(args.recipe, args.ranks, args.lrs, args.overrides, args.output)
    return 0


def _recommend_args(p: argparse.ArgumentParser) -> None:
    _recipe_args(p)
    p.add_argument("--grad-batches", type=int, default=32, help="batches whose gradients give the rank")
    p.add_argument("--energy", type=float, default=0.9, help="share of gradient energy a layer's rank must hold")
    p.add_argument("--lr-steps", type=int, default=40, help="steps of the learning-rate range test")
    p.add_argument("--max-rank", type=int, default=64)
    p.add_argument("--sweep", default=None, help="a sweep folder: train the suggestion and compare with its best")
    p.add_argument("--race", action="store_true",
                   help=f"train the suggestion and a {RACE_FACTOR}x rank (same r x lr) at the recipe's budget and "
                        "keep the better on the validation split (two training runs more)")


@command("recommend", _recommend_args)
def _recommend_cli(args: argparse.Namespace) -> int:
    """Suggest a LoRA rank (gradient spectrum) and learning rate (range test), with the evidence."""
    result = recommend(args.recipe, args.overrides, args.output, args.grad_batches, args.energy, args.lr_steps,
                       max_rank=args.max_rank, sweep_dir=args.sweep, race=args.race)
    print(f"suggested: lora.r={result['rank']} lora.alpha={result['alpha']:g} train.lr={result['lr']:.3g}")
    check = result.get("check")
    if check:
        print(f"check: held-out {check['held_out']:.4f} vs sweep best {check['sweep_best']['held_out']:.4f} "
              f"(r={check['sweep_best']['r']}): {check['verdict']}; cost {100 * check['cost_fraction']:.0f}% of the sweep")
    return 0
