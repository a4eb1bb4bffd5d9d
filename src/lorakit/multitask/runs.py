"""`lorakit multitask`: all tasks of a recipe trained together, scored, exported and reported."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..files import write_bytes, write_json
from ..train import format_metrics
from .adapters import adapter_parameters, add_task_adapters, evaluate_combinations, evaluate_task, export_task
from .data import start_run
from .recipe import SHARED, MultitaskRecipe
from .reports import write_multitask_report
from .training import benchmark, train_mixed


def run_multitask(recipe: MultitaskRecipe, output_dir: str | Path, benchmark_steps: int = 0,
                  benchmark_repeats: int = 3, benchmark_only: bool = False) -> dict[str, Any]:
    """Train all tasks of ``recipe`` together into ``output_dir``: ``adapters/TASK/`` (plain PEFT LoRA per task),
    ``parts/`` (``design: shared``: shared and task parts), ``metrics.json``, ``report.md``; returns the metrics.
    With ``benchmark_steps`` the `benchmark` runs first; ``benchmark_only`` stops after it."""
    out, tasks, base = start_run(recipe, output_dir)
    model, tokenizer = base.model, base.tokenizer
    base_eval = {} if benchmark_only else {t.name: evaluate_task(model, t, None, tokenizer) for t in tasks}
    names = add_task_adapters(model, recipe, base.path)
    shared = [SHARED] if recipe.design == "shared" else []
    steps = max(t.steps() for t in tasks)
    metrics: dict[str, Any] = {"recipe": recipe.name, "design": recipe.design, "task": recipe.task,
                               "model": recipe.model, "tasks": [dataclasses.asdict(t.spec) for t in tasks],
                               "train_rows": {t.name: len(t.train) for t in tasks}, "steps": steps,
                               "base_eval": base_eval}
    if benchmark_steps:
        if shared:
            raise ConfigError("--benchmark compares per-task adapters with training them alone; use design=per-task")
        b = metrics["benchmark"] = benchmark(model, tasks, benchmark_steps, tokenizer, benchmark_repeats)
        print(f"[{recipe.name}] benchmark, {b['steps']} steps: mixed {b['mixed_s']:.2f} s, one after another "
              f"{b['one_after_another_s']:.2f} s ({b['speedup']:.2f}x; CPU time {b['cpu_speedup']:.2f}x); "
              f"adapters differ by at most {b['max_abs_diff']:.2e}", flush=True)
    if benchmark_only:
        write_json(out / "metrics.json", metrics)
        write_multitask_report(metrics, out)
        return metrics
    started = time.perf_counter()
    metrics["history"] = train_mixed(model, tasks, steps, tokenizer, shared, progress=recipe.name)
    metrics["train_time_s"] = time.perf_counter() - started
    metrics["trainable_params"] = {n: sum(p.numel() for p in adapter_parameters(model, n)) for n in names}
    metrics["eval"] = {}
    for task in tasks:
        metrics["eval"][task.name] = evaluate_task(model, task, [*shared, task.name], tokenizer)
        print(f"[{recipe.name}] {task.name}: {format_metrics(metrics['eval'][task.name])}", flush=True)
    if shared:
        metrics["export_eval"] = {}
        for task in tasks:
            export_task(model, task.name, f"{task.name}-export")
            metrics["export_eval"][task.name] = evaluate_task(model, task, [f"{task.name}-export"], tokenizer)
    else:
        metrics["combinations"] = evaluate_combinations(model, tasks, recipe.combine, tokenizer)
    _save_adapters(model, recipe, tasks, out, steps, metrics, tokenizer)
    write_json(out / "metrics.json", metrics)
    write_bytes(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False).encode("utf-8"))
    write_multitask_report(metrics, out)
    return metrics


def _save_adapters(model: Any, recipe: MultitaskRecipe, tasks: Any, out: Path, steps: int, metrics: dict[str, Any],
                   tokenizer: Any) -> None:
    """``adapters/TASK`` for every task (shared design: the exported shared + task LoRA) and, for the shared
    design, the parts under ``parts/``."""
    from ..io import save_adapter

    shared = recipe.design == "shared"
    for task in tasks:
        provenance = {"recipe": recipe.to_dict(), "task": task.name, "dataset": task.spec.data,
                      "dataset_hash": task.train.fingerprint(), "steps": steps, "design": recipe.design,
                      "eval": metrics["eval"][task.name]}
        save_adapter(model, out / "adapters" / task.name, f"{task.name}-export" if shared else task.name,
                     provenance=provenance, tokenizer=tokenizer)
        if shared:
            save_adapter(model, out / "parts" / task.name, task.name, provenance=provenance, tokenizer=tokenizer)
    if shared:
        save_adapter(model, out / "parts" / SHARED, SHARED, provenance={"recipe": recipe.to_dict()},
                     tokenizer=tokenizer)
