"""`LoraConfig`: what to adapt and how, convertible to and from PEFT's ``adapter_config.json``.

The math (Hu et al. 2021, "LoRA", section 4.1): for a frozen weight ``W`` of shape ``(out, in)`` the layer
computes ``y = W x + s · B A dropout(x)`` with ``A: (r, in)``, ``B: (out, r)`` and ``s = alpha / r``
(rsLoRA, Kalajdzievski 2023: ``s = alpha / sqrt(r)``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

InitMethod = Literal["default", "gaussian", "pissa"]
BiasMode = Literal["none", "lora_only", "all"]
ALL_LINEAR = "all-linear"

# PEFT's ``init_lora_weights`` values <-> ours.
_INIT_TO_PEFT: dict[str, Any] = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}
_INIT_FROM_PEFT: dict[Any, str] = {True: "default", "gaussian": "gaussian", "pissa": "pissa"}

# adapter_config.json keys PEFT writes that we read, ignore safely (default-valued features we do not
# implement are checked in `from_peft_dict`), or keep for the round trip.
_PEFT_KNOWN_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "bias", "init_lora_weights", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
    "modules_to_save", "fan_in_fan_out", "peft_version", "lora_bias", "target_parameters",
}
# PEFT features we do not implement: accepted only at their neutral value.
_PEFT_NEUTRAL = {
    "use_qalora": False, "megatron_config": None, "loftq_config": {}, "layer_replication": None,
    "runtime_config": {"ephemeral_gpu_offload": False}, "eva_config": None, "corda_config": None,
    "trainable_token_indices": None, "alora_invocation_tokens": None,
    "arrow_config": None, "qalora_group_size": 16, "ensure_weight_tying": False, "megatron_core": "megatron.core",
    "lora_ga_config": None, "use_bdlora": None, "use_mica": False, "monteclora_config": None,
    "velora_config": None, "bdlora_config": None, "kasa_config": None,
}
# what those keys turn on, for the refusal message
_PEFT_FEATURE_NAMES = {
    "use_qalora": "QA-LoRA", "megatron_config": "Megatron parallel layers", "loftq_config": "LoftQ initialisation",
    "layer_replication": "layer replication", "eva_config": "EVA initialisation", "corda_config": "CorDA",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "aLoRA", "arrow_config": "Arrow routing", "lora_ga_config": "LoRA-GA",
    "use_bdlora": "BD-LoRA", "bdlora_config": "BD-LoRA", "use_mica": "MiCA", "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA", "kasa_config": "KaSA",
}


@dataclass
class LoraConfig:
    """Settings of one LoRA adapter.

    Args:
        r: rank of the update ``B A``; ``rank_pattern`` overrides it per module.
        alpha: numerator of the scaling ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). The default
            is PEFT's ``lora_alpha=8`` whatever the rank (so ``s = 1`` at r=8 and 0.5 at r=16); nothing in lorakit
            assumes ``alpha = 2r``: set it explicitly to keep ``s`` fixed while changing ``r``.
        dropout: dropout probability applied to the input of the LoRA path only.
        target_modules: list of module-name suffixes (``"query"`` matches ``encoder.layer.0.attention.self.query``),
            a regex string that must match the full module name, or ``"all-linear"`` (every Linear/Conv1D except
            the output layer and ``modules_to_save``).
        exclude_modules: modules never adapted, in the same syntax as ``target_modules`` (no ``all-linear``).
        layers_to_transform: only adapt modules inside these layer indices (``...layers.3...``).
        layers_pattern: name of the layer list (``"layers"``, ``"h"``...) when ``layers_to_transform`` is set;
            by default any of the common names.
        bias: which biases train: ``"none"``, ``"lora_only"`` (biases of adapted layers) or ``"all"``.
        init: ``"default"`` (Kaiming-uniform A, zero B), ``"gaussian"`` (A ~ N(0, 1/r), zero B) or ``"pissa"``
            (A, B from the top-r singular vectors of W; the residual ``W - s B A`` replaces W, frozen;
            Meng et al. 2024, "PiSSA", section 3).
        use_rslora: scale by ``alpha / sqrt(r)`` (rsLoRA).
        use_dora: weight-decomposed LoRA (Liu et al. 2024, "DoRA", section 4.1): a trained magnitude per output.
        rank_pattern / alpha_pattern: ``{module-name regex suffix: value}`` overriding ``r`` / ``alpha``.
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a classifier head).
        target_parameters: parameters adapted directly (PEFT's ``target_parameters``), named as
            ``module.parameter`` suffixes, e.g. ``["experts.gate_up_proj", "experts.down_proj"]`` for mixture-of-experts
            blocks that hold every expert in one 3-D parameter; 2-D ``(out, in)`` parameters work too. No dropout,
            DoRA or lora_bias there; ``target_modules`` may then be empty.
        lora_bias: B gets a trained bias (PEFT's ``lora_bias``; Linear, Conv1D and convolutions), folded into the
            base bias on merge (a layer without a bias cannot be merged then).
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: str | list[str] | None = None
    bias: BiasMode = "none"
    init: InitMethod = "default"
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    lora_bias: bool = False
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the bad field and how to fix it."""
        _check_rank("r", self.r)
        for pattern, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{pattern!r}]", rank)
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.lora_bias, bool):
            raise ConfigError(f"lora_bias must be true or false, got {self.lora_bias!r}")
        if self.lora_bias and self.use_dora:
            raise ConfigError("lora_bias cannot be combined with use_dora (PEFT refuses it too): turn one off")
        if self.bias not in ("none", "lora_only", "all"):
            raise ConfigError(f"bias must be 'none', 'lora_only' or 'all', got {self.bias!r}")
        if self.init not in ("default", "gaussian", "pissa"):
            raise ConfigError(f"init must be 'default', 'gaussian' or 'pissa', got {self.init!r}")
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        if self.target_parameters is not None and (not isinstance(self.target_parameters, list) or not all(
                isinstance(t, str) and t for t in self.target_parameters)):
            raise ConfigError(f"target_parameters must be a list of parameter names such as "
                              f"['experts.gate_up_proj'], got {self.target_parameters!r}")
        if self.target_parameters and (self.dropout or self.use_dora or self.lora_bias or self.init == "pissa"):
            raise ConfigError("target_parameters takes no dropout, use_dora, lora_bias or init='pissa' (PEFT refuses "
                              "them too): set them off, or adapt those parameters' modules with target_modules")
        if self.target_parameters and not self.target_modules:
            self.target_modules = []
        elif self.target_modules is None or (not isinstance(self.target_modules, str) and not self.target_modules):
            raise ConfigError(
                "target_modules is empty: name the modules to adapt, e.g. target_modules=['query', 'value'], "
                "a regex such as r'.*attn\\.(q|v)_proj', or 'all-linear'"
            )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() != ALL_LINEAR:
                check_module_regex(value, name)
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                check_module_regex(key, f"{name} key")
        if (isinstance(self.target_modules, str) and self.target_modules.lower() != ALL_LINEAR
                and self.layers_to_transform is not None):
            raise ConfigError("layers_to_transform cannot be combined with a regex target_modules (PEFT refuses "
                              r"it too); put the layer indices in the regex, e.g. r'.*\.layers\.(0|1)\.q_proj'")
        if isinstance(self.exclude_modules, str) and self.exclude_modules.lower() == ALL_LINEAR:
            raise ConfigError("exclude_modules cannot be 'all-linear'")

    # -- scaling -------------------------------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        """Rank of the adapter on ``module_name`` (``rank_pattern`` first, then ``r``)."""
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scaling(self, r: int, alpha: float) -> float:
        """``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (`lora_scaling`, which the layers use)."""
        return lora_scaling(r, alpha, self.use_rslora)

    # -- PEFT's adapter_config.json ------------------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The dict PEFT writes as ``adapter_config.json`` (PEFT names; `peft.LoraConfig(**d)` accepts it)."""
        targets = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets.lower() if isinstance(targets, str) and targets.lower() == ALL_LINEAR
            else targets,
            "exclude_modules": self.exclude_modules,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "bias": self.bias,
            "init_lora_weights": _INIT_TO_PEFT[self.init],
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": self.modules_to_save,
            "fan_in_fan_out": False,
            "lora_bias": self.lora_bias,
            "target_parameters": self.target_parameters,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Read PEFT's ``adapter_config.json`` content; refuses settings lorakit cannot reproduce exactly."""
        if data.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"peft_type {data.get('peft_type')!r} is not LoRA; lorakit reads LoRA adapters only "
                              "(VeRA, IA3, LoHa, LoKr, OFT, BOFT, prefix/prompt tuning... are other PEFT methods)")
        problems = []
        for key, value in data.items():
            if key in _PEFT_KNOWN_KEYS or key.startswith("lorakit"):
                continue
            if key in _PEFT_NEUTRAL:
                if value != _PEFT_NEUTRAL[key] and value not in (None, False, {}, []):
                    feature = _PEFT_FEATURE_NAMES.get(key, "a PEFT feature")
                    problems.append(f"{key}={value!r} ({feature}: not LoRA as lorakit implements it)")
                continue
            problems.append(f"{key} (unknown key, possibly from a newer PEFT)")
        init = data.get("init_lora_weights", True)
        if init not in _INIT_FROM_PEFT:
            # Any other init only affects how training starts; the saved weights are still plain LoRA.
            init = True
        if problems:
            raise ConfigError("adapter_config.json has settings lorakit cannot apply: " + "; ".join(problems))
        return cls(
            r=int(data.get("r", 8)),
            alpha=data.get("lora_alpha", 8),
            dropout=float(data.get("lora_dropout", 0.0)),
            target_modules=data.get("target_modules"),
            exclude_modules=data.get("exclude_modules"),
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern"),
            bias=data.get("bias", "none"),
            init=_INIT_FROM_PEFT[init],
            use_rslora=bool(data.get("use_rslora", False)),
            use_dora=bool(data.get("use_dora", False)),
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
            modules_to_save=data.get("modules_to_save"),
            task_type=data.get("task_type"),
            base_model_name_or_path=data.get("base_model_name_or_path"),
            lora_bias=bool(data.get("lora_bias", False)),
            target_parameters=data.get("target_parameters") or None,
        )

    def replace(self, **changes: Any) -> "LoraConfig":
        return dataclasses.replace(self, **changes)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The LoRA scaling ``s = alpha / r`` (Hu et al. 2021, section 4.1), or ``alpha / sqrt(r)`` with rsLoRA
    (Kalajdzievski 2023): the one formula, used by `LoraConfig.scaling` and every LoRA layer."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def check_module_regex(pattern: str, what: str) -> None:
    """Refuse a module-name regex that is invalid, or that repeats a group which itself repeats (``(a+)+``,
    ``(.*x)*``): such patterns take time exponential in the name's length when they fail to match, and they come
    from adapter files users download. PEFT's own selectors (``.*\\.(q|v)_proj``, ``layers\\.(\\d+)\\.``) never
    need the nesting."""
    if not isinstance(pattern, str):
        raise ConfigError(f"{what} must be a string regex, got {pattern!r}")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise ConfigError(f"{what} is not a valid regex ({err}): {pattern!r}") from None
    plain = re.sub(r"\[[^\]]*\]", "x", re.sub(r"\\.", "x", pattern))  # escapes and classes are one character
    repeats = [False]  # per open group: does it hold a repeat?
    for i, char in enumerate(plain):
        if char == "(":
            repeats.append(False)
        elif char == ")" and len(repeats) > 1:
            inner = repeats.pop()
            if inner and plain[i + 1:i + 2] in ("*", "+", "{"):
                raise ConfigError(f"{what} {pattern!r} repeats a group that itself repeats, which can take "
                                  "exponential time on module names (fix: write it without the nested repeat, "
                                  r"e.g. '.*\.(q_proj|v_proj)')")
            repeats[-1] = repeats[-1] or inner
        elif char in "*+{":
            repeats[-1] = True


def _check_rank(what: str, r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{what} must be a positive integer rank, got {r!r} (typical values: 4, 8, 16)")


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rule: a key matches when it matches a dotted suffix of the module name (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
