"""A recipe at another LoRA rank, as `sweep` and `recommend` train it: alpha keeps the recipe's update scale s
(`FixedScale`), and layers whose weight allows fewer directions than the rank are capped there."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..config import LoraConfig


@dataclass(frozen=True)
class FixedScale:
    """The one rule for alpha at another rank: keep the recipe's scale ``s = LoraConfig.scaling(r, alpha)``
    (``alpha / r``; ``alpha / sqrt(r)`` with rsLoRA), so only the rank changes between runs. ``r`` and ``alpha``
    are the recipe's own, or `LoraConfig`'s defaults where the recipe leaves them out (PEFT's ``lora_alpha=8``):
    nothing here assumes alpha = 2r."""

    config: LoraConfig  # the recipe's adapter settings

    @classmethod
    def of(cls, recipe: Any) -> "FixedScale":
        return cls(recipe.lora_config())

    @property
    def scale(self) -> float:
        return self.config.scaling(self.config.r, self.config.alpha)

    def alpha(self, rank: int) -> float:
        """The alpha at which rank ``rank`` has the recipe's scale (scaling is linear in alpha)."""
        return float(f"{self.scale / self.config.scaling(rank, 1.0):.12g}")

    def describe(self) -> str:
        return (f"alpha = {self.scale:g} x sqrt(r) (rsLoRA)" if self.config.use_rslora
                else f"alpha = {self.scale:g} x r")


def rank_limits(recipe: Any, model: torch.nn.Module | None = None) -> dict[str, int]:
    """Targeted layers whose weight allows fewer than 64 directions (e.g. a 3x3 conv on 3 channels: 27),
    by name: where a sweep's rank exceeds them, the rank is capped there. Without ``model``, the recipe's model is
    loaded unquantized (only the shapes are read)."""
    from ..inject import targeting_report
    from ..layers import wrapper_for

    if model is None:
        from ..recipes import load_recipe_model

        model = load_recipe_model(dataclasses.replace(recipe, quantize=None)).model
    config = recipe_from(recipe, 1, FixedScale.of(recipe), {}).lora_config()
    modules = dict(model.named_modules())
    limits = {}
    for row in targeting_report(model, config).targeted:
        if row.parameter:  # a parameter target: per expert a full matrix, no cap
            continue
        limit = wrapper_for(modules[row.name]).max_rank(modules[row.name])
        if limit < 64:
            limits[row.name] = limit
    return limits


def rank_overrides(rank: int, scale: FixedScale, limits: dict[str, int]) -> list[str]:
    """Recipe overrides for LoRA rank ``rank`` at the recipe's scale, capped per `rank_limits`."""
    lora = lora_at_rank({}, rank, scale, limits)
    out = [f"lora.r={rank}", f"lora.alpha={scale.alpha(rank):g}"]
    for key in ("rank_pattern", "alpha_pattern"):
        if lora.get(key):
            out.append(f"lora.{key}={json.dumps(lora[key])}")  # JSON is YAML: the override parser reads it
    return out


def lora_at_rank(lora: dict[str, Any], rank: int, scale: FixedScale, limits: dict[str, int]) -> dict[str, Any]:
    """The ``lora`` section at rank ``rank`` and the recipe's scale, with per-layer caps as patterns."""
    capped = {re.escape(name): limit for name, limit in limits.items() if limit < rank}
    changed = {**lora, "r": rank, "alpha": scale.alpha(rank)}
    if capped:
        changed["rank_pattern"] = {**lora.get("rank_pattern", {}), **capped}
        changed["alpha_pattern"] = {**lora.get("alpha_pattern", {}),
                                    **{key: scale.alpha(limit) for key, limit in capped.items()}}
    return changed


def recipe_from(recipe: Any, rank: int, scale: FixedScale, limits: dict[str, int]) -> Any:
    """The recipe with another rank at the same scale, capped per layer by ``limits``."""
    changed = copy.deepcopy(recipe)
    changed.lora = lora_at_rank(changed.lora, rank, scale, limits)
    return changed


#: the race's second arm: this many times the spectrum's rank
RACE_FACTOR = 4


def race_arms(rank: int, lr: float, max_rank: int = 64) -> list[tuple[int, float]]:
    """The race's arms: the spectrum's rank at the range test's learning rate, and `RACE_FACTOR` x that rank
    (capped at ``max_rank``) at the same rank x lr. At fixed alpha / r, Adam moves every entry of B by about lr
    per step, so the initial change of s·B·A grows with r: equal r x lr starts both arms with the same step."""
    wide = min(max_rank, RACE_FACTOR * rank)
    return [(rank, lr)] + ([(wide, float(f"{lr * rank / wide:.3g}"))] if wide > rank else [])
