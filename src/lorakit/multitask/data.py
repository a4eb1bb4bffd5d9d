"""Each task's rows and their batches, and the one base model all tasks share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import distributed
from ..errors import ConfigError
from ..recipes import Recipe, load_recipe_model
from ..batching import DataOrder, MicroBatch, encode_rows, row_lengths, run_steps
from ..checkpoints import clean_stale_temp_files
from ..train import load_run_data, seed_everything
from .recipe import MultitaskRecipe, TaskSpec


@dataclass
class TaskData:
    """A task's rows and its batch order: the `lorakit.train.DataOrder` its single-task recipe would use
    (seeded, grouped by length when ``train.group_by_length``, cycled through epochs until ``max_steps``)."""

    spec: TaskSpec
    recipe: Recipe  # the task's single-task recipe
    train: Any  # data.Dataset
    test: Any
    _order: DataOrder | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def steps(self) -> int:
        """Optimizer steps of this task's run (`lorakit.train.run_steps`: ``max_steps`` when set, else epochs)."""
        try:
            return run_steps(len(self.train), self.recipe.train)[1]
        except ConfigError as err:
            raise ConfigError(f"task {self.name}: {err}") from None

    def order(self, tokenizer: Any = None) -> DataOrder:
        if self._order is None:
            r = self.recipe
            lengths = row_lengths(r.task, self.train, tokenizer) if r.train.group_by_length else None
            self._order = DataOrder(len(self.train), r.train, lengths)
        return self._order

    def batches(self, step: int, tokenizer: Any, world: distributed.World) -> list[MicroBatch]:
        """The micro-batches of optimizer step ``step`` (counted from 0), encoded, on ``world.device``: this
        process's share of each (rows ``rank::size``, as `lorakit train` splits a step over processes)."""
        r = self.recipe
        return encode_rows(r.task, self.train, self.order(tokenizer).micro_batches(step), tokenizer, r.train,
                           r.image_size, world)


def load_tasks(recipe: MultitaskRecipe, method: str = "lora") -> list[TaskData]:
    """Every task's training rows (capped per task) and held-out test rows (capped by ``eval.max_examples``)."""
    tasks = []
    for spec in recipe.tasks:
        task_recipe = recipe.task_recipe(spec, method)
        data = load_run_data(task_recipe)
        tasks.append(TaskData(spec, task_recipe, data.train, data.test))
    return tasks


@dataclass
class Base:
    """The loaded base model, ready for adapters (dropout per train.model_dropout, on the device)."""

    model: torch.nn.Module
    tokenizer: Any
    path: str | None
    world: distributed.World


def load_base(recipe: MultitaskRecipe, tasks: Sequence[TaskData]) -> Base:
    """The base model for all tasks (`lorakit.recipes.load_recipe_model`); a classification head gets as many
    classes as the largest task has; ``train.model_dropout`` and ``train.gradient_checkpointing`` applied (the
    mixed step routes inside backward, so recomputed forwards are routed too). Under torchrun every process
    loads the whole base into CPU memory; `lorakit.distributed.wrap` shards it (moving it to the device block by
    block, never whole) or replicates it once the adapters are added."""
    world = distributed.setup(recipe.train.device, cpu_collectives=recipe.train.fsdp_cpu_offload)
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    largest = max(tasks, key=lambda t: len(t.train.labels or []))
    loaded = load_recipe_model(largest.recipe, labels=largest.train.labels or None,
                               device=None if sharded(recipe, world) else world.device)
    if recipe.train.model_dropout is not None:
        for module in loaded.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = recipe.train.model_dropout
    model = loaded.model
    if recipe.train.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Base(model, loaded.tokenizer, loaded.path or loaded.name, world)


def check_processes(recipe: MultitaskRecipe, world: distributed.World, one_process: str | None = None) -> None:
    """Refuse, before anything loads, a torchrun launch or sharding this run cannot use: ``one_process`` is why
    the run needs a single, unsharded process (None: it can use many). Each process takes rows ``rank::size``
    of every task's micro-batch, so every process must get at least one row of every task: a task's adapter
    without rows on one process would have no gradient there, and the processes' gradient reductions would no
    longer match."""
    args = recipe.train
    offload = args.fsdp_cpu_offload  # FSDP of one process, its shards in CPU memory
    if one_process is not None and world.distributed:
        raise ConfigError(one_process)
    if one_process is not None and offload:
        raise ConfigError("train.fsdp_cpu_offload offloads a sharded model; this run does not shard (fix: "
                          "train.fsdp_cpu_offload=false)")
    if world.distributed and args.batch_size < world.size:
        raise ConfigError(f"train.batch_size={args.batch_size} rows of each task per micro-batch cannot be "
                          f"shared by {world.size} processes: every process needs rows of every task (fix: "
                          f"train.batch_size>={world.size}, or fewer processes)")
    if not sharded(recipe, world):
        return
    if recipe.design == "shared":  # its export adds a combined adapter to the model: needs whole adapters
        raise ConfigError("train.sharding=fsdp: design=shared exports each task as shared + task merged into one "
                          "new adapter, which needs the adapters unsharded (fix: design=per-task, or "
                          "train.sharding=ddp)")
    if recipe.combine.methods:
        raise ConfigError("train.sharding=fsdp: scoring combinations of the task adapters (combine.methods) adds "
                          "new adapters to the model, which needs them unsharded (fix: combine.methods=[] and "
                          "combine the saved adapters in one process, or train.sharding=ddp)")


def sharded(recipe: MultitaskRecipe, world: distributed.World) -> bool:
    """Whether `lorakit.distributed.wrap` shards the model with FSDP2: ``train.sharding: fsdp`` under torchrun,
    or in one process that offloads its shards to CPU memory (``train.fsdp_cpu_offload``)."""
    return distributed.is_sharded(recipe.train.sharding, world, recipe.train.fsdp_cpu_offload)


def start_run(recipe: MultitaskRecipe, output_dir: str | Path, one_process: str | None = None
              ) -> tuple[Path, list[TaskData], Base]:
    """The start every multi-task and continual run shares: the processes checked (`check_processes`; the
    message ``one_process`` refuses torchrun), the output folder (stale temp files of a killed run removed by
    the main process), the seeded RNGs, the tasks' data and the base model."""
    world = distributed.setup(recipe.train.device, cpu_collectives=recipe.train.fsdp_cpu_offload)
    check_processes(recipe, world, one_process)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        clean_stale_temp_files(out)
    seed_everything(recipe.train.seed)
    tasks = load_tasks(recipe)
    return out, tasks, load_base(recipe, tasks)
