"""`lorakit continual`: tasks trained one after another with three strategies (full fine-tuning, one LoRA in
sequence, one adapter per task) and the forgetting matrix of each, through `lorakit.train.run_training`."""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import Tensor, nn

from .. import distributed
from ..adapters import set_adapter
from ..errors import ConfigError
from ..files import write_bytes, write_json
from ..inject import add_adapter
from ..precision import keep_trainable_fp32
from ..tasks import primary_metric
from ..train import StepSettings, build_optimizer, build_scheduler, run_training, seed_everything
from .adapters import evaluate_task
from .data import TaskData, start_run
from .recipe import MultitaskRecipe
from .reports import write_continual_report


class HeadBank:
    """Per-task copies of the head parameters (the modules under ``module_names``), so that full fine-tuning and a
    single adapter also keep one classifier per task (task-incremental learning, as one adapter per task does).
    A task not trained yet uses the initial head."""

    def __init__(self, model: nn.Module, module_names: Sequence[str]) -> None:
        self.params = {n: p for n, p in model.named_parameters()
                       if p.requires_grad and any(f".{m}." in f".{n}" for m in module_names)}
        self.initial = self._copy()
        self.saved: dict[str, dict[str, Tensor]] = {}

    def _copy(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def use(self, task: str) -> None:
        with torch.no_grad():
            for name, value in self.saved.get(task, self.initial).items():
                self.params[name].copy_(value)

    def keep(self, task: str) -> None:
        self.saved[task] = self._copy()


def _prepare(model: nn.Module, recipe: MultitaskRecipe, tasks: Sequence[TaskData], strategy: str,
             base_path: str | None) -> HeadBank | None:
    """Make ``model`` trainable for ``strategy``; the head bank of full fine-tuning and of one LoRA."""
    heads_of = recipe.task_recipe(tasks[0].spec).lora_config().modules_to_save or []
    if strategy == "full":
        model.requires_grad_(True)
    elif strategy == "lora":
        torch.manual_seed(recipe.train.seed)
        add_adapter(model, "default", tasks[0].recipe.lora_config(base_path))
        set_adapter(model, "default")
        keep_trainable_fp32(model)  # a bf16/fp16-stored base (train.dtype): the adapter trains in fp32
    return HeadBank(model, heads_of) if strategy != "per-task" and heads_of else None


def continual_strategy(model: nn.Module, recipe: MultitaskRecipe, tasks: Sequence[TaskData], strategy: str,
                       tokenizer: Any = None, base_path: str | None = None) -> dict[str, Any]:
    """Train ``tasks`` in order with ``strategy`` (full | lora | per-task); after each stage score every task.
    ``matrix[0]`` is the base model, ``matrix[i]`` the model after stage i (task i-1)."""
    world = distributed.World(device=next(model.parameters()).device)  # one process (`run_continual`)
    bank = _prepare(model, recipe, tasks, strategy, base_path)

    def score(stage: int) -> list[dict[str, float]]:
        row = []
        for j, other in enumerate(tasks):
            if bank is not None:
                bank.use(other.name)
            adapters = {"lora": ["default"], "full": None}.get(strategy, [other.name] if j < stage else None)
            row.append(evaluate_task(model, other, adapters, tokenizer))
        return row

    matrix, times, histories = [score(0)], [], []
    metric = primary_metric(recipe.task).name
    for i, task in enumerate(tasks):
        task_recipe = recipe.task_recipe(task.spec, "full" if strategy == "full" else "lora")
        if strategy == "per-task":
            torch.manual_seed(recipe.train.seed + 1 + i)
            add_adapter(model, task.name, task_recipe.lora_config(base_path))
            set_adapter(model, task.name)
            keep_trainable_fp32(model)  # a bf16/fp16-stored base (train.dtype): the adapter trains in fp32
        elif strategy == "lora":
            set_adapter(model, "default")
        if bank is not None:
            bank.use(task.name)
        args, steps = task_recipe.train, task.steps()
        optimizer = build_optimizer(model, args)
        scheduler = build_scheduler(optimizer, args, steps)
        settings = StepSettings.from_args(task_recipe.task, args, world)
        started = time.perf_counter()
        results = run_training(model, optimizer, scheduler, lambda step, t=task: t.batches(step, tokenizer, world),
                               steps, settings, progress=f"{strategy}: {task.name}" if args.progress else None)
        times.append(time.perf_counter() - started)
        histories.append([r.loss for r in results])
        if bank is not None:
            bank.keep(task.name)
        matrix.append(score(i + 1))
        print(f"[{recipe.name}] {strategy} after {task.name}: "
              + ", ".join(f"{t.name} {m[metric]:.4f}" for t, m in zip(tasks, matrix[-1])), flush=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"strategy": strategy, "matrix": matrix, "train_time_s": times, "history": histories,
            "steps": [t.steps() for t in tasks], "trainable_params_last_stage": trainable,
            "summary": forgetting_summary(matrix, recipe.task)}


def forgetting_summary(matrix: Sequence[Sequence[dict[str, float]]], task: str) -> dict[str, Any]:
    """From the stage x task matrix: each task's metric right after its stage and at the end, forgetting per task
    (the drop, positive = worse; Chaudhry et al. 2018), average final metric and backward transfer (BWT, Lopez-Paz
    & Ranzato 2017: mean of final - just-learned over all but the last task, in the metric's own direction)."""
    metric = primary_metric(task)
    n = len(matrix) - 1
    learned = [matrix[j + 1][j][metric.name] for j in range(n)]
    final = [matrix[n][j][metric.name] for j in range(n)]
    forgetting = [metric.worse_by(b, a) for a, b in zip(learned, final)]
    return {"metric": metric.name, "higher_is_better": metric.higher_is_better, "learned": learned, "final": final,
            "forgetting": forgetting, "average_final": sum(final) / n,
            "bwt": -sum(forgetting[:-1]) / max(1, n - 1)}


def run_continual(recipe: MultitaskRecipe, output_dir: str | Path) -> dict[str, Any]:
    """Every strategy of ``recipe.continual`` from the same base: ``metrics.json`` and ``report.md``."""
    if "full" in recipe.continual.strategies and recipe.train.dtype != "fp32":
        raise ConfigError(f"train.dtype={recipe.train.dtype} stores a frozen base; the continual strategy 'full' "
                          "trains every weight (fix: continual.strategies=[lora, per-task], or train.dtype=fp32)")
    out, tasks, base = start_run(recipe, output_dir, one_process=(
        "lorakit continual trains in one process: its stages copy and score the whole model (fix: run it without "
        "torchrun, as `lorakit continual RECIPE`)"))
    pristine = copy.deepcopy(base.model)
    results: dict[str, Any] = {"recipe": recipe.name, "task": recipe.task, "model": recipe.model,
                               "tasks": [dataclasses.asdict(t.spec) for t in tasks],
                               "train_rows": {t.name: len(t.train) for t in tasks},
                               "metric": primary_metric(recipe.task).name, "strategies": {}}
    for strategy in recipe.continual.strategies:
        seed_everything(recipe.train.seed)
        model = copy.deepcopy(pristine)
        results["strategies"][strategy] = continual_strategy(model, recipe, tasks, strategy, base.tokenizer,
                                                             base.path)
        del model
        write_json(out / "metrics.json", results)  # partial results survive an interrupted run
    write_bytes(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False).encode("utf-8"))
    write_continual_report(results, out)
    return results
