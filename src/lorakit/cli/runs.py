"""``lorakit eval`` and ``lorakit predict``: use a trained run folder (``lorakit train``'s output)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``lorakit eval`` and ``lorakit predict``."""
    p = subparsers.add_parser("eval", help="evaluate a trained run on a held-out split", description=evaluate.__doc__)
    p.add_argument("run", help="a training output folder (holds recipe.yaml and adapter/ or model/)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"],
                   help="which split of the run's dataset (default: %(default)s)")
    p.add_argument("--max-examples", type=_positive_int, default=None, help="evaluate the first N rows only")
    p.set_defaults(_run=evaluate)

    p = subparsers.add_parser("predict", help="classify texts with a trained run", description=predict.__doc__)
    p.add_argument("run", help="a training output folder of a text-classification recipe")
    p.add_argument("texts", nargs="+", help="texts to classify")
    p.set_defaults(_run=predict)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def evaluate(args: argparse.Namespace) -> int:
    """Evaluate a trained run on a held-out split of its dataset; prints the metrics as JSON."""
    from ..evaluate import evaluate as run_evaluation
    from ..recipes import load_recipe_data, load_run, read_run_recipe

    splits = load_recipe_data(read_run_recipe(args.run))  # read once: the rows, and the head's classes
    recipe, loaded = load_run(args.run, labels=splits.train.labels)
    rows = getattr(splits, args.split)
    if args.max_examples is not None and len(rows) > args.max_examples:
        rows = rows.take(args.max_examples)
    metrics = run_evaluation(loaded.model, recipe.task, rows, loaded.tokenizer, batch_size=recipe.eval.batch_size,
                             max_length=recipe.train.max_length, image_size=recipe.image_size,
                             generate_examples=recipe.eval.generate_examples,
                             max_new_tokens=recipe.eval.max_new_tokens)
    print(json.dumps(metrics, indent=2))
    return 0


def predict(args: argparse.Namespace) -> int:
    """Classify texts with a trained run: label, probability and text per line (tab-separated)."""
    import torch

    from ..errors import ConfigError
    from ..evaluate import encode, forward
    from ..recipes import load_recipe_data, load_run, read_run_recipe

    recipe = read_run_recipe(args.run)  # checked before the model loads
    if recipe.task != "sequence-classification":
        raise ConfigError(f"predict classifies text; run {args.run} is a {recipe.task} run "
                          "(fix: `lorakit eval` for its metrics, `lorakit generate` for a causal LM)")
    labels = load_recipe_data(recipe).train.labels
    recipe, loaded = load_run(args.run, labels=labels)
    rows = [{"text": t, "label": 0} for t in args.texts]
    batch = encode(recipe.task, rows, loaded.tokenizer, recipe.train.max_length, None)
    with torch.no_grad():
        probs = forward(loaded.model, recipe.task, batch).softmax(-1)
    for text, p in zip(args.texts, probs):
        k = int(p.argmax())
        print(f"{labels[k]}\t{float(p[k]):.3f}\t{text}")
    return 0
