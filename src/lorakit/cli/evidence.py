"""``lorakit compare``, ``sweep``, ``recommend`` and ``inspect``: the evidence commands (argument parsing and
printing; the measuring is in `lorakit.evidence` and `lorakit.analyze`, which also check every recipe, setting
and this machine's devices before a model, a dataset or a run starts)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..evidence.compare import FULL_LR_RATIO
from ..evidence.ranks import RACE_FACTOR
from ..tasks import MODEL_TASKS


def register(subparsers: Any) -> None:
    """Add ``lorakit compare``, ``sweep``, ``recommend`` and ``inspect``."""
    p = subparsers.add_parser("compare", help=_first_line(run_compare), description=run_compare.__doc__)
    _recipe_args(p)
    p.add_argument("--data-fractions", type=_floats, default=[0.1, 0.25, 0.5, 1.0],
                   help="fractions of the recipe's training examples (default: 0.1,0.25,0.5,1.0)")
    p.add_argument("--full-lr", type=float, default=None, help=f"default: LoRA lr x {FULL_LR_RATIO}")
    p.add_argument("--lora-lr", type=float, default=None, help="default: the recipe's train.lr")
    p.add_argument("--keep-weights", action="store_true", help="keep the full fine-tuned model folders")
    p.add_argument("--no-probe", action="store_true", help="skip the knowledge-preservation probe")
    p.set_defaults(_run=run_compare)

    p = subparsers.add_parser("sweep", help=_first_line(run_sweep), description=run_sweep.__doc__)
    _recipe_args(p)
    p.add_argument("--ranks", type=_ints, default=[1, 2, 4, 8, 16, 32, 64],
                   help="LoRA ranks, comma-separated (default: 1,2,4,8,16,32,64)")
    p.add_argument("--lrs", type=_floats, default=None, help="learning rates (default: the recipe's train.lr)")
    p.set_defaults(_run=run_sweep)

    p = subparsers.add_parser("recommend", help=_first_line(run_recommend), description=run_recommend.__doc__)
    _recipe_args(p)
    p.add_argument("--grad-batches", type=int, default=32,
                   help="batches whose gradients give the rank (default: %(default)s)")
    p.add_argument("--energy", type=float, default=0.9,
                   help="share of gradient energy a layer's rank must hold (default: %(default)s)")
    p.add_argument("--lr-steps", type=int, default=40,
                   help="steps of the learning-rate range test (default: %(default)s)")
    p.add_argument("--max-rank", type=int, default=64, help="largest rank suggested (default: %(default)s)")
    p.add_argument("--sweep", default=None, help="a sweep folder: train the suggestion and compare with its best")
    p.add_argument("--race", action="store_true",
                   help=f"train the suggestion and a {RACE_FACTOR}x rank (same r x lr) at the recipe's budget and "
                        "keep the better on the validation split (two training runs more)")
    p.set_defaults(_run=run_recommend)
    _register_inspect(subparsers)


def _register_inspect(subparsers: Any) -> None:
    p = subparsers.add_parser("inspect", help=_first_line(run_inspect), description=run_inspect.__doc__)
    p.add_argument("adapter", help="adapter folder (or a training output folder holding adapter/)")
    p.add_argument("--against", default=None, help="a second adapter on the same base: subspace similarity")
    p.add_argument("--base", default=None, help="base model (default: from the adapter's provenance/config)")
    p.add_argument("--task", default=None, choices=MODEL_TASKS, help="default: from the adapter")
    p.add_argument("--side", default="right", choices=("right", "left"),
                   help="singular vectors compared: right = input side, as the paper's A (default: right)")
    p.add_argument("--output", "-o", default=None, help="report folder (default: runs/inspect-NAME)")
    p.add_argument("--json", action="store_true", help="print inspect.json instead of the table")
    p.set_defaults(_run=run_inspect)


# -- handlers -----------------------------------------------------------------------------------------------------
def run_compare(args: argparse.Namespace) -> int:
    """Full fine-tuning vs LoRA on a recipe: claims table with computed verdicts, plots, report."""
    from ..evidence import compare

    result = compare(args.recipe, args.overrides, args.data_fractions, args.output, args.full_lr, args.lora_lr,
                     args.keep_weights, probe=not args.no_probe)
    for row in result["claims"]:
        print(f"  {row['verdict']:<14} {row['claim']}: full {row['full']} | LoRA {row['lora']}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    """LoRA rank (x learning-rate) sweep with metric-vs-rank and metric-vs-parameters plots."""
    from ..evidence import sweep

    sweep(args.recipe, args.ranks, args.lrs, args.overrides, args.output)
    return 0


def run_recommend(args: argparse.Namespace) -> int:
    """Suggest a LoRA rank (gradient spectrum) and learning rate (range test), with the evidence."""
    from ..evidence import recommend

    result = recommend(args.recipe, args.overrides, args.output, args.grad_batches, args.energy, args.lr_steps,
                       max_rank=args.max_rank, sweep_dir=args.sweep, race=args.race)
    print(f"suggested: lora.r={result['rank']} lora.alpha={result['alpha']:g} train.lr={result['lr']:.3g}")
    check = result.get("check")
    if check:
        print(f"check: held-out {check['held_out']:.4f} vs sweep best {check['sweep_best']['held_out']:.4f} "
              f"(r={check['sweep_best']['r']}): {check['verdict']}; cost {100 * check['cost_fraction']:.0f}% of "
              "the sweep")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Per-layer ‖ΔW‖/‖W‖, spectra, effective rank, amplification and subspace similarity of adapters."""
    from ..analyze import format_table, inspect_adapter, write_inspection_report

    adapter, against = _adapter_folder(args.adapter), _adapter_folder(args.against)
    result = inspect_adapter(adapter, against, base=args.base, task=args.task, side=args.side)
    default = Path("runs") / f"inspect-{adapter.parent.name if adapter.name == 'adapter' else adapter.name}"
    out = write_inspection_report(result, args.output or default)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_table(result))
    print(f"\nreport: {out / 'report.html'}")
    return 0


# -- arguments ------------------------------------------------------------------------------------------------
def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe name (`lorakit recipes` lists them) or a YAML file")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. train.max_train_examples=3200")
    p.add_argument("--output", "-o", default=None, help="report folder (default: runs/COMMAND-RECIPE)")


def _adapter_folder(path: str | None) -> Path | None:
    """An adapter folder, or a training run's ``adapter/`` when given the run folder."""
    if path is None:
        return None
    folder = Path(path)
    return folder / "adapter" if (folder / "adapter" / "adapter_config.json").is_file() else folder


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


def _first_line(handler: Any) -> str:
    return (handler.__doc__ or "").strip().splitlines()[0]
