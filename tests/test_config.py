"""LoraConfig validation and its round trip through PEFT's adapter_config.json."""

from __future__ import annotations

import peft
import pytest

from lorakit import ConfigError, LoraConfig


@pytest.mark.parametrize("kwargs,message", [
    (dict(alpha=0), "alpha must be a positive number"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(bias="some"), "bias must be"),
    (dict(init="loftq"), "init must be"),
    (dict(target_modules=[]), "target_modules is empty"),
    (dict(target_modules=None), "target_modules is empty"),
    (dict(target_modules="(unclosed"), "not a valid regex"),
    (dict(exclude_modules="all-linear"), "exclude_modules cannot be"),
    (dict(target_modules=r".*q", layers_to_transform=[0]), "put the layer indices in the regex"),
    (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\] must be a positive integer"),
])
def test_invalid_values_name_the_field(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**{"target_modules": ["q"], **kwargs})


def test_rank_and_alpha_pattern_use_peft_suffix_rule() -> None:
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q"], rank_pattern={r"layers\.1\.q": 2}, alpha_pattern={"q": 1})
    assert cfg.rank_for("model.layers.1.q") == 2
    assert cfg.rank_for("model.layers.11.q") == 4  # not a dotted-suffix match
    assert cfg.alpha_for("a.q") == 1 and cfg.alpha_for("a.qq") == 8


@pytest.mark.parametrize("cfg", [
    LoraConfig(r=4, alpha=16, dropout=0.1, target_modules=["query", "value"], use_rslora=True),
    LoraConfig(r=8, target_modules="all-linear", use_dora=True, modules_to_save=["classifier"],
               task_type="SEQ_CLS", init="gaussian"),
    LoraConfig(r=2, target_modules=["q_proj"], rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 2},
               layers_to_transform=[0, 1], layers_pattern="layers", bias="lora_only", init="pissa"),
    LoraConfig(r=4, target_modules=["fc"], lora_bias=True),
    LoraConfig(r=2, target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
])
def test_round_trip_through_peft(cfg: LoraConfig) -> None:
    data = cfg.to_peft_dict()
    peft_cfg = peft.LoraConfig(**{k: v for k, v in data.items() if k != "peft_type"})
    assert peft_cfg.r == cfg.r and peft_cfg.lora_alpha == cfg.alpha and peft_cfg.use_dora == cfg.use_dora
    back = LoraConfig.from_peft_dict(peft_cfg.to_dict())
    assert back == cfg


def test_from_peft_refuses_what_it_cannot_apply() -> None:
    data = LoraConfig(target_modules=["q"]).to_peft_dict()
    for key, value, name in [("kasa_config", {"r": 2}, "KaSA"), ("velora_config", {"rank": 4}, "VeLoRA"),
                             ("trainable_token_indices", [1, 2], "trainable tokens"), ("use_qalora", True, "QA-LoRA")]:
        with pytest.raises(ConfigError, match=f"{key}=.*{name}"):
            LoraConfig.from_peft_dict({**data, key: value})
    with pytest.raises(ConfigError, match="lora_bias cannot be combined with use_dora"):
        LoraConfig.from_peft_dict({**data, "lora_bias": True, "use_dora": True})
    with pytest.raises(ConfigError, match="VeRA, IA3"):
        LoraConfig.from_peft_dict({**data, "peft_type": "VERA"})
    with pytest.raises(ConfigError, match="unknown key, possibly from a newer PEFT"):
        LoraConfig.from_peft_dict({**data, "brand_new_option": 3})
    with pytest.raises(ConfigError, match="not LoRA"):
        LoraConfig.from_peft_dict({**data, "peft_type": "IA3"})


def test_one_scaling_formula_and_alpha_default() -> None:
    from lorakit.config import lora_scaling

    assert LoraConfig(target_modules=["q"]).alpha == 8  # PEFT's lora_alpha default, whatever r
    assert LoraConfig(r=16, target_modules=["q"]).scaling(16, 8) == lora_scaling(16, 8) == 0.5
    assert LoraConfig(r=16, target_modules=["q"], use_rslora=True).scaling(16, 8) == lora_scaling(16, 8, True) == 2.0


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "rank_pattern", "alpha_pattern"])
def test_regexes_with_nested_repeats_are_refused(field: str) -> None:
    """``(.+)+x`` takes exponential time on a module name it does not match (a downloaded adapter_config.json
    could hang `load_adapter`): refused in every place a regex is read, from a PEFT file too."""
    pattern = r"(.+)+x"
    value = {pattern: 2} if field.endswith("pattern") else pattern
    with pytest.raises(ConfigError, match="repeats a group that itself repeats"):
        LoraConfig(**{"target_modules": ["q"], field: value})
    with pytest.raises(ConfigError, match="repeats a group that itself repeats"):
        LoraConfig.from_peft_dict({**LoraConfig(target_modules=["q"]).to_peft_dict(), field: value})


@pytest.mark.parametrize("pattern", [r".*\.(q|v)_proj", r"^(?!.*vision).*\.(q_proj|v_proj)$",
                                     r"model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj", r".*(attn|mlp)\.[^.]+_proj"])
def test_usual_peft_regexes_are_accepted(pattern: str) -> None:
    assert LoraConfig(target_modules=pattern).target_modules == pattern
