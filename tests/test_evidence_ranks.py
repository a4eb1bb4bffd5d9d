"""`lorakit.evidence.ranks`: alpha at another rank keeps the recipe's scale s (LoraConfig's own formula and
defaults, rsLoRA included — never alpha = 2r), the overrides a sweep passes, and the race's arms."""

from __future__ import annotations

import copy
import json

import pytest

from lorakit.evidence.ranks import FixedScale, race_arms, rank_overrides, recipe_from
from lorakit.recipes import load_recipe


def test_alpha_keeps_the_recipes_scale() -> None:
    recipe = load_recipe("sentiment-minilm")  # r 8, alpha 16: s = 2
    scale = FixedScale.of(recipe)
    assert scale.scale == 2.0 and scale.alpha(32) == 64.0
    assert rank_overrides(32, scale, {})[:2] == ["lora.r=32", "lora.alpha=64"]
    # no alpha in the recipe: LoraConfig's default (PEFT's lora_alpha=8) at r=8 is s = 1, not alpha = 2r
    no_alpha = copy.deepcopy(recipe)
    del no_alpha.lora["alpha"]
    assert FixedScale.of(no_alpha).alpha(32) == 32.0
    assert recipe_from(no_alpha, 4, FixedScale.of(no_alpha), {}).lora_config().alpha == 4.0
    # rsLoRA: s = alpha / sqrt(r) is kept, so alpha grows with sqrt(r)
    rs = copy.deepcopy(recipe)
    rs.lora["use_rslora"] = True
    rs_scale = FixedScale.of(rs)
    config = rs.lora_config()
    for rank in (1, 4, 32):
        assert config.scaling(rank, rs_scale.alpha(rank)) == pytest.approx(config.scaling(8, 16))
    assert rs_scale.alpha(32) == pytest.approx(32.0) and "sqrt" in rs_scale.describe()


def test_capped_layers_keep_the_scale_too() -> None:
    scale = FixedScale.of(load_recipe("vision-mobilenet-mnist"))  # r 8, alpha 16
    overrides = rank_overrides(64, scale, {"features.0.0": 27, "features.1.conv.1": 128})
    patterns = {o.split("=", 1)[0]: json.loads(o.split("=", 1)[1]) for o in overrides[2:]}
    assert patterns == {"lora.rank_pattern": {r"features\.0\.0": 27}, "lora.alpha_pattern": {r"features\.0\.0": 54.0}}


def test_race_arms_keep_rank_times_lr() -> None:
    assert race_arms(8, 4e-3) == [(8, 4e-3), (32, 1e-3)]
    assert race_arms(32, 1.96e-3) == [(32, 1.96e-3), (64, 0.00098)]  # capped at max_rank
    assert race_arms(64, 1e-3) == [(64, 1e-3)]  # nothing wider to try
