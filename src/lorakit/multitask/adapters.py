"""The tasks' adapters: one per task (plus a shared one), their tensors, plain-LoRA export of shared + task,
combinations, and each task's held-out metrics with a given set of adapters."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..adapters import (add_weighted_adapter, copy_modules_to_save, delete_adapter, disable_adapters, lora_modules,
                        lora_state, set_adapter)
from ..evaluate import evaluate
from ..inject import add_adapter
from ..precision import keep_trainable_fp32
from .data import TaskData
from .recipe import SHARED, CombineArgs, MultitaskRecipe


def add_task_adapters(model: nn.Module, recipe: MultitaskRecipe, base_path: str | None = None) -> list[str]:
    """Add one adapter per task (and the shared one for ``design: shared``); returns the names, shared first.
    The shared adapter is initialised from seed ``train.seed``, task k's from ``train.seed + 1 + k``. On a base
    stored in bf16/fp16 (``train.dtype``) the adapters and heads are kept in fp32, as `lorakit train` keeps them."""
    names = []
    if recipe.design == "shared":
        torch.manual_seed(recipe.train.seed)
        add_adapter(model, SHARED, recipe.shared_config(base_path))
        names.append(SHARED)
    for k, spec in enumerate(recipe.tasks):
        torch.manual_seed(recipe.train.seed + 1 + k)
        add_adapter(model, spec.name, recipe.task_recipe(spec).lora_config(base_path))
        names.append(spec.name)
    set_adapter(model, names)
    if recipe.train.dtype != "fp32":
        keep_trainable_fp32(model)
    return names


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Every tensor of adapter ``name``: LoRA factors, DoRA magnitudes and ``modules_to_save`` copies."""
    return [p for _, module in lora_modules(model) if name in module.adapter_names()
            for p in module.adapter_parameters(name)]


def export_task(model: nn.Module, task: str, name: str, shared: str = SHARED) -> None:
    """Adapter ``name`` = shared + ``task`` as one plain LoRA (``cat``: ranks concatenated, exactly the sum of
    both updates), with the task's ``modules_to_save`` copies."""
    add_weighted_adapter(model, [shared, task], [1.0, 1.0], name, method="cat")
    copy_modules_to_save(model, task, name)


def snapshot(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    """Copies of the tensors of adapters ``names``, by parameter name (`restore` puts them back)."""
    keep = {id(p) for name in names for p in adapter_parameters(model, name)}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in keep}


def restore(model: nn.Module, saved: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def evaluate_task(model: nn.Module, task: TaskData, adapters: Sequence[str] | None, tokenizer: Any = None,
                  device: torch.device | None = None) -> dict[str, float]:
    """Held-out metrics of ``task`` with ``adapters`` active (None: the model as it is, adapters disabled).
    ``device``: where the inputs go (default: the first parameter's; give the run's device when the model's
    shards live elsewhere, as with FSDP's CPU offload)."""
    r = task.recipe
    kwargs = dict(tokenizer=tokenizer, batch_size=r.eval.batch_size, max_length=r.train.max_length,
                  image_size=r.image_size, generate_examples=r.eval.generate_examples,
                  max_new_tokens=r.eval.max_new_tokens, device=device)
    if adapters is None:
        if lora_state(model) is not None and lora_state(model).configs:
            with disable_adapters(model):
                return evaluate(model, r.task, task.test, **kwargs)
        return evaluate(model, r.task, task.test, **kwargs)
    set_adapter(model, list(adapters))
    return evaluate(model, r.task, task.test, **kwargs)


def evaluate_combinations(model: nn.Module, tasks: Sequence[TaskData], combine: CombineArgs,
                          tokenizer: Any = None) -> list[dict[str, Any]]:
    """Each task scored with every ``add_weighted_adapter`` combination of all task adapters (each task keeps its
    own ``modules_to_save`` head: the combination is of the low-rank updates)."""
    names = [t.name for t in tasks]
    rows = []
    for method in combine.methods:
        for weight in combine.weights:
            name = f"combined-{method}"
            add_weighted_adapter(model, names, [weight] * len(names), name, method=method)
            rank = lora_state(model).configs[name].r
            scores = {}
            for task in tasks:
                copy_modules_to_save(model, task.name, name)
                scores[task.name] = evaluate_task(model, task, [name], tokenizer)
            delete_adapter(model, name)
            rows.append({"method": method, "weight": weight, "rank": rank, "eval": scores})
    return rows
