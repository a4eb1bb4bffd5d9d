"""A recipe at another LoRA rank, as `sweep` and `recommend` train it: alpha keeps the recipe's alpha / r (the
update scale s fixed), and layers whose weight allows fewer directions than the rank are capped there."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import torch


def alpha_ratio(recipe: Any) -> float:
    """The recipe's alpha / r, kept by every rank `sweep` and `recommend` try."""
    return float(recipe.lora.get("alpha", 2 * recipe.lora.get("r", 8))) / float(recipe.lora.get("r", 8))


def rank_limits(recipe: Any, model: torch.nn.Module | None = None) -> dict[str, int]:
    """Targeted layers whose weight allows fewer than 64 directions (e.g. a 3x3 conv on 3 channels: 27),
    by name: where a sweep's rank exceeds them, the rank is capped there."""
    from ..inject import targeting_report
    from ..layers import wrapper_for

    if model is None:
        from ..data import load_dataset
        from ..models import load_model

        labels = load_dataset(recipe.data, seed=recipe.train.seed).train.labels if recipe.task != "causal-lm" else None
        model = load_model(recipe.model, task=recipe.task, num_labels=len(labels) if labels else None).model
    config = recipe_from(recipe, 1, 1.0, {}).lora_config()
    modules = dict(model.named_modules())
    limits = {}
    for row in targeting_report(model, config).targeted:
        limit = wrapper_for(modules[row.name]).max_rank(modules[row.name])
        if limit < 64:
            limits[row.name] = limit
    return limits


def rank_overrides(rank: int, ratio: float, limits: dict[str, int]) -> list[str]:
    """Recipe overrides for LoRA rank ``rank``, alpha = ratio x rank (the scale s fixed), capped per `rank_limits`."""
    lora = lora_at_rank({}, rank, ratio, limits)
    out = [f"lora.r={rank}", f"lora.alpha={ratio * rank:g}"]
    for key in ("rank_pattern", "alpha_pattern"):
        if lora.get(key):
            out.append(f"lora.{key}={json.dumps(lora[key])}")  # JSON is YAML: the override parser reads it
    return out


def lora_at_rank(lora: dict[str, Any], rank: int, ratio: float, limits: dict[str, int]) -> dict[str, Any]:
    """The ``lora`` section at rank ``rank`` (alpha = ratio x rank), with per-layer caps as patterns."""
    capped = {re.escape(name): limit for name, limit in limits.items() if limit < rank}
    changed = {**lora, "r": rank, "alpha": ratio * rank}
    if capped:
        changed["rank_pattern"] = {**lora.get("rank_pattern", {}), **capped}
        changed["alpha_pattern"] = {**lora.get("alpha_pattern", {}),
                                    **{key: ratio * limit for key, limit in capped.items()}}
    return changed


def recipe_from(recipe: Any, rank: int, ratio: float, limits: dict[str, int]) -> Any:
    """The recipe with another rank (alpha keeps the recipe's alpha / r ratio), capped per layer by ``limits``."""
    changed = copy.deepcopy(recipe)
    changed.lora = lora_at_rank(changed.lora, rank, ratio, limits)
    return changed


#: the race's second arm: this many times the spectrum's rank
RACE_FACTOR = 4


def race_arms(rank: int, lr: float, max_rank: int = 64) -> list[tuple[int, float]]:
    """The race's arms: the spectrum's rank at the range test's learning rate, and `RACE_FACTOR` x that rank
    (capped at ``max_rank``) at the same rank x lr. At fixed alpha / r, Adam moves every entry of B by about lr
    per step, so the initial change of s·B·A grows with r: equal r x lr starts both arms with the same step."""
    wide = min(max_rank, RACE_FACTOR * rank)
    return [(rank, lr)] + ([(wide, float(f"{lr * rank / wide:.3g}"))] if wide > rank else [])
