"""The multi-task recipe: several tasks on one base, built on `lorakit.recipes` (the same `TrainArgs`,
`EvalArgs`, YAML reading, ``key=value`` overrides and checks; each task must be a valid single-task recipe).

``train.batch_size`` means what it means in `lorakit train`: rows of one task in one micro-batch. A mixed batch
holds one such micro-batch of every task (N tasks: N x ``batch_size`` rows), so each task trains on exactly the
rows its own single-task run (`MultitaskRecipe.task_recipe`) would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..config import LoraConfig
from ..errors import ConfigError
from ..recipes import (EvalArgs, Recipe, TrainArgs, build_section, check_lora, read_recipe_yaml, recipe_from_dict,
                       recipe_path)

DESIGNS = ("per-task", "shared")
STRATEGIES = ("full", "lora", "per-task")
COMBINE_METHODS = ("linear", "cat", "svd")
SHARED = "shared"  # adapter name of the shared part in ``design: shared``


@dataclass
class TaskSpec:
    """One task: its adapter name, its dataset, and optional per-task caps."""

    name: str
    data: str
    max_train_examples: int | None = None
    max_length: int | None = None  # causal LM: token budget per row (default: train.max_length)


@dataclass
class CombineArgs:
    """Combinations of the per-task adapters to score: every method with every weight (the same for each task)."""

    methods: list[str] = field(default_factory=lambda: list(COMBINE_METHODS))
    weights: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class ContinualArgs:
    """`lorakit continual`: the strategies compared, and full fine-tuning's own learning rate."""

    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    full_lr: float | None = None  # learning rate of full fine-tuning (default: train.lr)


@dataclass
class MultitaskRecipe:
    """Several tasks on one base. ``train`` applies to every task (``train.batch_size``: rows of each task per
    micro-batch, see the module docstring); ``lora`` configures each task's adapter and ``shared_lora`` the
    shared one (``design: shared``)."""

    name: str
    task: str
    model: str
    tasks: list[TaskSpec]
    design: str = "per-task"
    lora: dict[str, Any] = field(default_factory=dict)
    shared_lora: dict[str, Any] = field(default_factory=dict)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    combine: CombineArgs = field(default_factory=CombineArgs)
    continual: ContinualArgs = field(default_factory=ContinualArgs)
    image_size: int | None = None
    description: str = ""

    def task_recipe(self, spec: TaskSpec, method: str = "lora") -> Recipe:
        """The single-task recipe of ``spec`` (what `lorakit train` would run for it alone)."""
        train = dataclasses.replace(
            self.train, max_train_examples=spec.max_train_examples or self.train.max_train_examples,
            max_length=spec.max_length or self.train.max_length)
        if method == "full" and self.continual.full_lr is not None:
            train = dataclasses.replace(train, lr=self.continual.full_lr)
        return Recipe(name=f"{self.name}-{spec.name}", task=self.task, model=self.model, data=spec.data,
                      method=method, lora=dict(self.lora), train=train, eval=self.eval, image_size=self.image_size,
                      description=self.description)

    def shared_config(self, base_model_name: str | None = None) -> LoraConfig:
        """The shared adapter's config: ``shared_lora`` alone (nothing inherited from ``lora``)."""
        return dataclasses.replace(self.task_recipe(self.tasks[0]), lora=dict(self.shared_lora)).lora_config(
            base_model_name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_multitask_recipe(name_or_path: str, overrides: Sequence[str] = ()) -> MultitaskRecipe:
    """Read a multi-task recipe; ``key=value`` overrides as for `lorakit train` (``train.max_steps=20``,
    ``design=shared``, ``continual.strategies=[lora,per-task]``); a number indexes a list
    (``tasks.1.max_train_examples=400``)."""
    path = recipe_path(name_or_path)
    return multitask_recipe_from_dict(read_recipe_yaml(path, overrides), source=str(path))


def multitask_recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> MultitaskRecipe:
    """A checked `MultitaskRecipe` from its mapping: sections as `lorakit.recipes` builds them, unique task
    names, known designs/strategies/methods, every task a valid single-task recipe, no LoRA bias (it would be
    shared by all tasks)."""
    data = dict(data)
    if "data" in data:
        raise ConfigError(f"{source}: a multi-task recipe lists its datasets under tasks: [{{name, data}}, ...]")
    missing = [k for k in ("name", "task", "model", "tasks") if k not in data]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {missing}")
    if not isinstance(data["tasks"], list) or not data["tasks"]:
        raise ConfigError(f"{source}: tasks must be a non-empty list of {{name, data}}")
    data["tasks"] = [build_section(TaskSpec, t, f"tasks[{i}]", source) for i, t in enumerate(data["tasks"])]
    for key, cls in (("train", TrainArgs), ("eval", EvalArgs), ("combine", CombineArgs),
                     ("continual", ContinualArgs)):
        data[key] = build_section(cls, data.get(key) or {}, key, source)
    recipe = build_section(MultitaskRecipe, data, "top-level", source)
    names = [t.name for t in recipe.tasks]
    for spec in recipe.tasks:
        if not spec.name or "." in spec.name or spec.name == SHARED or names.count(spec.name) > 1:
            raise ConfigError(f"{source}: task names must be unique, without dots and not {SHARED!r}; got {names}")
    if recipe.design not in DESIGNS:
        raise ConfigError(f"{source}: design must be one of {DESIGNS}, got {recipe.design!r}")
    for where, chosen, allowed in (("continual.strategies", recipe.continual.strategies, STRATEGIES),
                                   ("combine.methods", recipe.combine.methods, COMBINE_METHODS)):
        if not isinstance(chosen, list) or not set(chosen) <= set(allowed):
            raise ConfigError(f"{source}: {where} must be a list of {allowed}, got {chosen!r}")
    for spec in recipe.tasks:  # each task must be a valid single-task recipe
        recipe_from_dict(recipe.task_recipe(spec).to_dict(), source=f"{source} (task {spec.name})")
    config = recipe.task_recipe(recipe.tasks[0]).lora_config()
    if config.bias != "none":
        raise ConfigError(f"{source}: lora.bias must be 'none' here: trained biases would be shared by all tasks")
    if recipe.train.checkpoint_every or recipe.train.early_stopping_patience is not None:
        raise ConfigError(f"{source}: train.checkpoint_every and train.early_stopping_patience belong to a single "
                          "`lorakit train` run; multi-task runs have no checkpoints or validation epochs (remove them)")
    if recipe.train.train_norm_stats:
        raise ConfigError(f"{source}: train.train_norm_stats is not supported by multi-task runs: the base's "
                          "normalisation layers keep their running statistics here (remove it)")
    if recipe.design == "shared":
        check_lora(recipe.shared_lora, source, "shared_lora")
        shared = recipe.shared_config()
        if shared.modules_to_save or shared.bias != "none":
            raise ConfigError(f"{source}: shared_lora takes no modules_to_save and no bias (heads are per task)")
    return recipe
