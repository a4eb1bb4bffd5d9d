"""Training several tasks' adapters, through `lorakit.train`'s one step and loop: in mixed batches (every
task's rows in one forward, each row routed to its task's adapter) or one task after another (the reference),
and the benchmark of the two."""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .. import distributed
from ..adapters import set_adapter
from ..batching import MicroBatch
from ..train import StepResult, StepSettings, build_optimizer, build_scheduler, run_training
from .adapters import adapter_parameters, restore, snapshot
from .data import TaskData


def concat_batches(batches: Sequence[dict[str, Tensor]], pad_id: int | None) -> dict[str, Tensor]:
    """Stack per-task batches row-wise; token batches are right-padded to the longest (mask 0, label -100)."""
    if "input_ids" not in batches[0]:
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    length = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id or 0, "attention_mask": 0, "labels": -100}

    def pad(t: Tensor, value: int) -> Tensor:
        return nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    return {k: torch.cat([pad(b[k], fill[k]) for b in batches]) for k in batches[0]}


def mixed_batches(tasks: Sequence[TaskData], step: int, tokenizer: Any, world: distributed.World,
                  shared: Sequence[str] = ()) -> list[MicroBatch]:
    """The micro-batches of mixed step ``step``: micro-batch i holds this process's rows (``rank::size``) of
    micro-batch i of every task's own step ``step``, each task's rows a loss group routed to its adapter
    (``shared`` adapters on every row). Every process lists every task's group, in the recipe's order, so the
    processes' per-group loss counts (`lorakit.train.train_step`) line up."""
    per_task = [t.batches(step, tokenizer, world) for t in tasks]  # [task][micro]
    pad_id = getattr(tokenizer, "pad_token_id", None)
    out = []
    for i in range(len(per_task[0])):
        parts = [per_task[k][i].inputs for k in range(len(tasks))]
        sizes = [int(p["labels"].shape[0]) for p in parts]
        out.append(MicroBatch(concat_batches(parts, pad_id), groups=tuple((t.name, n) for t, n in zip(tasks, sizes)),
                              adapters=[t.name for t, n in zip(tasks, sizes) for _ in range(n)], shared=tuple(shared)))
    return out


def _world(model: nn.Module, world: distributed.World | None) -> distributed.World:
    return world if world is not None else distributed.World(device=next(model.parameters()).device)


def train_mixed(model: nn.Module, tasks: Sequence[TaskData], steps: int, tokenizer: Any = None,
                shared: Sequence[str] = (), progress: str | None = None, world: distributed.World | None = None
                ) -> list[dict[str, Any]]:
    """Train every task's adapter (and the ``shared`` ones) together for ``steps`` mixed-batch steps
    (`lorakit.train.run_training`): one AdamW over all of them, the loss ``sum_t L_t / N_t``, gradient norms
    clipped per adapter. Returns the history: per step ``{"step", "loss": {task: loss}, "lr", "grad_norm"}``
    (the norm over all adapters before clipping).

    ``model``: the module a step runs. Under torchrun (``world``) that is `lorakit.distributed.wrap` of the
    model with every adapter already added (DDP, or sharded in place by FSDP2); each process then trains on
    its share of every task's rows, and the result equals one process's."""
    inner = getattr(model, "module", model)  # DDP's wrapper holds the model; FSDP shards it in place
    world = _world(inner, world)
    args = tasks[0].recipe.train
    names = [*shared, *(t.name for t in tasks)]
    set_adapter(inner, names)
    optimizer = build_optimizer(inner, args)
    scheduler = build_scheduler(optimizer, args, steps)
    settings = StepSettings.from_args(tasks[0].recipe.task, args, world,
                                      clip_groups=[adapter_parameters(inner, name) for name in names])
    results = run_training(model, optimizer, scheduler, lambda step: mixed_batches(tasks, step, tokenizer, world,
                                                                                   shared),
                           steps, settings, progress=progress if args.progress else None)
    return [{"step": k + 1, "loss": r.losses, "lr": r.lr, "grad_norm": r.grad_norm} for k, r in enumerate(results)]


def train_one_after_another(model: nn.Module, tasks: Sequence[TaskData], steps: int, tokenizer: Any = None,
                            world: distributed.World | None = None) -> list[dict[str, Any]]:
    """The reference: each task's adapter trained alone by `lorakit.train.run_training` with its own AdamW and
    schedule, on the same rows as `train_mixed` (one process)."""
    world = _world(model, world)
    history = []
    for task in tasks:
        set_adapter(model, task.name)
        args = task.recipe.train
        optimizer = build_optimizer(model, args)
        scheduler = build_scheduler(optimizer, args, steps)
        settings = StepSettings.from_args(task.recipe.task, args, world)
        results: list[StepResult] = run_training(
            model, optimizer, scheduler, lambda step, task=task: task.batches(step, tokenizer, world), steps,
            settings)
        history += [{"task": task.name, "step": k + 1, "loss": r.loss} for k, r in enumerate(results)]
    return history


def _synchronize(model: nn.Module) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(model: nn.Module, tasks: Sequence[TaskData], steps: int, tokenizer: Any = None,
              repeats: int = 3) -> dict[str, Any]:
    """Time ``steps`` steps of mixed batches against the same steps one task after another, both from the same
    initial adapters, alternating ``repeats`` times; the fastest of each counts, in wall time and in this
    process's CPU time (steadier on a shared machine, where waiting for a core only adds wall time). Also
    returns the largest difference between the adapters the two produce."""
    names = [t.name for t in tasks]
    initial = snapshot(model, names)
    times: dict[str, list[float]] = {"mixed": [], "one_after_another": []}
    cpu: dict[str, list[float]] = {"mixed": [], "one_after_another": []}
    results: dict[str, dict[str, Tensor]] = {}
    for _ in range(repeats):
        for kind, run in (("mixed", train_mixed), ("one_after_another", train_one_after_another)):
            restore(model, initial)
            _synchronize(model)
            started, started_cpu = time.perf_counter(), time.process_time()
            run(model, tasks, steps, tokenizer)
            _synchronize(model)  # GPU work is asynchronous: count it all
            times[kind].append(time.perf_counter() - started)
            cpu[kind].append(time.process_time() - started_cpu)
            results.setdefault(kind, snapshot(model, names))
    restore(model, initial)
    mixed, sequential = results["mixed"], results["one_after_another"]
    return {"steps": steps, "repeats": repeats,
            "rows_per_step": sum(t.recipe.train.batch_size * t.recipe.train.grad_accum for t in tasks),
            "mixed_s": min(times["mixed"]), "one_after_another_s": min(times["one_after_another"]),
            "speedup": min(times["one_after_another"]) / min(times["mixed"]), "times_s": times,
            "mixed_cpu_s": min(cpu["mixed"]), "one_after_another_cpu_s": min(cpu["one_after_another"]),
            "cpu_speedup": min(cpu["one_after_another"]) / min(cpu["mixed"]), "cpu_times_s": cpu,
            "max_abs_diff": max(float((mixed[k] - sequential[k]).abs().max()) for k in initial),
            "max_abs_change": max(float((mixed[k] - initial[k]).abs().max()) for k in initial),
            "tensors": len(initial)}
