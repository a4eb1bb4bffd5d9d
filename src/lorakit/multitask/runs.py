"""`lorakit multitask`: all tasks of a recipe trained together, scored, exported and reported."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import yaml

from .. import distributed
from ..errors import ConfigError
from ..fingerprint import base_fingerprint
from ..files import write_bytes, write_json
from ..peft_format import adapter_modules
from ..train import format_metrics
from .adapters import adapter_parameters, add_task_adapters, evaluate_combinations, evaluate_task, export_task
from .data import sharded, start_run
from .recipe import SHARED, MultitaskRecipe
from .reports import write_multitask_report
from .training import benchmark, train_mixed


def run_multitask(recipe: MultitaskRecipe, output_dir: str | Path, benchmark_steps: int = 0,
                  benchmark_repeats: int = 3, benchmark_only: bool = False) -> dict[str, Any]:
    """Train all tasks of ``recipe`` together into ``output_dir``: ``adapters/TASK/`` (plain PEFT LoRA per task),
    ``parts/`` (``design: shared``: shared and task parts), ``metrics.json``, ``report.md``; returns the metrics.
    With ``benchmark_steps`` the `benchmark` runs first; ``benchmark_only`` stops after it.

    Under torchrun (``train.sharding``: ddp | fsdp) the model is wrapped once, after every adapter is added
    (`lorakit.distributed.wrap`); each process trains on its share of every task's rows, every process scores
    the tasks (a sharded forward is a collective), each adapter is gathered and checked (FSDP) and the main
    process writes the files."""
    out, tasks, base = start_run(recipe, output_dir, one_process=(
        "lorakit multitask --benchmark times one process (fix: run the benchmark without torchrun)"
        if benchmark_steps else None))
    model, tokenizer, world = base.model, base.tokenizer, base.world
    is_sharded = sharded(recipe, world)  # then the base is scored once sharded, on the device (`load_base`)
    base_eval = {} if benchmark_only or is_sharded else {
        t.name: evaluate_task(model, t, None, tokenizer) for t in tasks}
    names = add_task_adapters(model, recipe, base.path)
    shared = [SHARED] if recipe.design == "shared" else []
    steps = max(t.steps() for t in tasks)
    metrics: dict[str, Any] = {"recipe": recipe.name, "design": recipe.design, "task": recipe.task,
                               "model": recipe.model, "tasks": [dataclasses.asdict(t.spec) for t in tasks],
                               "train_rows": {t.name: len(t.train) for t in tasks}, "steps": steps,
                               "base_eval": base_eval, "world_size": world.size}
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
    # of the whole base, before it is sharded; the main process writes the files
    fingerprints = {n: base_fingerprint(model, adapter_modules(model, n), tokenizer) for n in names
                    } if is_sharded and world.is_main else {}
    args = recipe.train
    train_model = distributed.wrap(model, world, args.sharding, args.fsdp_blocks, args.precision,
                                   args.fsdp_cpu_offload)
    if is_sharded:  # this process's part of the frozen base, and the whole base; the base's scores (adapters off)
        from ..sharding import shard_bytes

        metrics["frozen_bytes_per_process"], metrics["frozen_bytes"] = shard_bytes(model)
        base_eval.update({t.name: evaluate_task(model, t, None, tokenizer, world.device) for t in tasks})
    started = time.perf_counter()
    metrics["history"] = train_mixed(train_model, tasks, steps, tokenizer, shared, progress=recipe.name, world=world)
    metrics["train_time_s"] = time.perf_counter() - started
    metrics["trainable_params"] = {n: sum(p.numel() for p in adapter_parameters(model, n)) for n in names}
    _score(model, recipe, tasks, metrics, tokenizer, world)
    _save_adapters(model, recipe, tasks, out, steps, metrics, tokenizer, world, fingerprints if is_sharded else None)
    if world.is_main:
        write_json(out / "metrics.json", metrics)
        write_bytes(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False).encode("utf-8"))
        write_multitask_report(metrics, out)
    distributed.barrier(world)
    return metrics


def _score(model: Any, recipe: MultitaskRecipe, tasks: Any, metrics: dict[str, Any], tokenizer: Any,
           world: distributed.World) -> None:
    """Held-out metrics of every task with its adapter(s); the shared design's exports, or the combinations.
    Every process runs them (under FSDP each forward is a collective)."""
    shared = [SHARED] if recipe.design == "shared" else []
    metrics["eval"] = {}
    for task in tasks:
        metrics["eval"][task.name] = evaluate_task(model, task, [*shared, task.name], tokenizer, world.device)
        if world.is_main:
            print(f"[{recipe.name}] {task.name}: {format_metrics(metrics['eval'][task.name])}", flush=True)
    if shared:
        metrics["export_eval"] = {}
        for task in tasks:
            export_task(model, task.name, f"{task.name}-export")
            metrics["export_eval"][task.name] = evaluate_task(model, task, [f"{task.name}-export"], tokenizer)
    else:
        metrics["combinations"] = evaluate_combinations(model, tasks, recipe.combine, tokenizer)


def _save_adapters(model: Any, recipe: MultitaskRecipe, tasks: Any, out: Path, steps: int, metrics: dict[str, Any],
                   tokenizer: Any, world: distributed.World, fingerprints: dict[str, Any] | None) -> None:
    """``adapters/TASK`` for every task (shared design: the exported shared + task LoRA) and, for the shared
    design, the parts under ``parts/``. ``fingerprints`` (FSDP: the base's, per adapter, taken before sharding
    on the main process; None when the model is whole): each adapter is gathered and checked on every process."""
    shared = recipe.design == "shared"
    for task in tasks:
        provenance = {"recipe": recipe.to_dict(), "task": task.name, "dataset": task.spec.data,
                      "dataset_hash": task.train.fingerprint(), "steps": steps, "design": recipe.design,
                      "eval": metrics["eval"][task.name]}
        _write(model, out / "adapters" / task.name, f"{task.name}-export" if shared else task.name, provenance,
               tokenizer, world, fingerprints)
        if shared:
            _write(model, out / "parts" / task.name, task.name, provenance, tokenizer, world, fingerprints)
    if shared:
        _write(model, out / "parts" / SHARED, SHARED, {"recipe": recipe.to_dict()}, tokenizer, world, fingerprints)


def _write(model: Any, folder: Path, name: str, provenance: dict[str, Any], tokenizer: Any,
           world: distributed.World, fingerprints: dict[str, Any] | None) -> None:
    """Adapter ``name`` written into ``folder`` by the main process. Sharded (``fingerprints`` given): only its
    tensors are gathered, on every process (`lorakit.sharding.gather_adapter`), and checked against the shards
    (`lorakit.sharding.check_adapter`: never an empty or partial adapter) before the main process writes them."""
    from ..io import save_adapter

    kwargs: dict[str, Any] = {}
    if fingerprints is not None:
        from ..sharding import check_adapter, gather_adapter

        tensors = gather_adapter(model, name)
        check_adapter(model, tensors, name)
        kwargs = {"tensors": tensors, "fingerprint": fingerprints.get(name)}
    if world.is_main:
        save_adapter(model, folder, name, provenance=provenance, tokenizer=tokenizer, **kwargs)
