"""Many tasks on one base model: multi-task LoRA in mixed batches, continual learning, adapter combination.

One recipe lists the tasks (``recipes/multitask-*.yaml``); two commands use it:

- ``lorakit multitask RECIPE`` trains every task at once. ``design: per-task`` gives each task its own adapter
  and routes every batch row to its task's adapter (`lorakit.route`), so N adapters train in one pass over the
  base. ``design: shared`` adds one shared adapter on every row plus a small adapter per task (task-agnostic +
  task-specific low-rank modules: Agiza et al. 2024, "MTLoRA", section 3.2), and exports each task as one plain
  PEFT LoRA: ``cat`` of shared and task part, exactly their sum. Per-task adapters are then combined with
  `add_weighted_adapter` (linear / cat / svd) and every task is scored with each combination.
- ``lorakit continual RECIPE`` trains the tasks one after another and writes the forgetting matrix (metric on
  every task after each stage) for full fine-tuning, one LoRA adapter trained in sequence, and one adapter per
  task.

Why a mixed batch trains each adapter exactly as training it alone would: adapters share no parameter and the
loss is ``sum_t L_t / N_t`` (task t's summed loss over its own count of rows or answer tokens), so adapter t's
gradient is its own task's mean-loss gradient; gradient norms are clipped per adapter; AdamW is elementwise, so
one optimizer over all adapters moves each as its own optimizer would; and every step holds the same rows of each
task as a single-task run (each task keeps its own seeded order, drawn as `lorakit train` draws it). LoRA biases
(``bias: lora_only/all``) would be shared between tasks and are refused. With dropout > 0 the masks differ, so the
equality then holds in distribution only.

The frozen base's BatchNorm layers run in eval mode (running statistics) here: batch statistics would couple rows
of different tasks, and updating running statistics would change the base under earlier tasks' adapters.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import Tensor, nn

from . import distributed
from .adapters import (add_weighted_adapter, delete_adapter, disable_adapters, lora_modules, lora_state, route,
                       set_adapter)
from .cli import command
from .config import LoraConfig
from .errors import ConfigError
from .evaluate import encode, evaluate, forward, loss_sum, to_device
from .inject import add_adapter
from .layers import ModulesToSave
from .train import (EvalArgs, Recipe, TrainArgs, TrainingError, _cap, _fmt, _optimizer, _progress,
                    _scheduler, _seed_everything, _step, _write_json, build_section, read_recipe_yaml, recipe_from_dict,
                    recipe_path)

DESIGNS = ("per-task", "shared")
STRATEGIES = ("full", "lora", "per-task")
COMBINE_METHODS = ("linear", "cat", "svd")
SHARED = "shared"  # adapter name of the shared part in ``design: shared``


# -- recipes ---------------------------------------------------------------------------------------------------
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
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    full_lr: float | None = None  # learning rate of full fine-tuning (default: train.lr)


@dataclass
class MultitaskRecipe:
    """Several tasks on one base. ``train.batch_size`` is rows *per task* in each step; ``lora`` configures each
    task's adapter and ``shared_lora`` the shared one (``design: shared``)."""

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
    if recipe.design == "shared":
        shared = recipe.shared_config()
        if shared.modules_to_save or shared.bias != "none":
            raise ConfigError(f"{source}: shared_lora takes no modules_to_save and no bias (heads are per task)")
    return recipe


# -- tasks and their batches --------------------------------------------------------------------------------
@dataclass
class TaskData:
    """A task's rows and its seeded batch order (the order `lorakit train` uses: epoch e is
    ``randperm(n, seed + e)``, cut into micro-batches of ``batch_size``)."""

    spec: TaskSpec
    recipe: Recipe
    train: Any  # data.Dataset
    test: Any
    _orders: dict[int, Tensor] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def steps_per_epoch(self) -> int:
        args = self.recipe.train
        steps = len(self.train) // (args.batch_size * args.grad_accum)
        if steps == 0:
            raise ConfigError(f"task {self.name}: {len(self.train)} training rows are fewer than one step needs "
                              f"(batch_size {args.batch_size} x grad_accum {args.grad_accum})")
        return steps

    def steps(self, epochs: float | None = None) -> int:
        """Optimizer steps for ``epochs`` passes (default: train.epochs), capped by train.max_steps."""
        args = self.recipe.train
        steps = math.ceil((args.epochs if epochs is None else epochs) * self.steps_per_epoch)
        return steps if args.max_steps is None else min(steps, args.max_steps)

    def micro_batches(self, step: int) -> list[Tensor]:
        """Row indices of optimizer step ``step`` (counted from 0 over all epochs), one tensor per micro-batch."""
        args = self.recipe.train
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(len(self.train),
                                                  generator=torch.Generator().manual_seed(args.seed + epoch))}
        order = self._orders[epoch]
        first = k * args.grad_accum
        return [order[(first + i) * args.batch_size:(first + i + 1) * args.batch_size] for i in range(args.grad_accum)]

    def encode(self, indices: Tensor, tokenizer: Any) -> dict[str, Tensor]:
        r = self.recipe
        return encode(r.task, [self.train[i] for i in indices.tolist()], tokenizer, r.train.max_length, r.image_size)

    def answer_count(self, labels: Tensor) -> int:
        """Loss terms in a batch, counted as `lorakit.train` counts them: rows, or answer tokens (causal LM)."""
        return int((labels[:, 1:] != -100).sum()) if self.recipe.task == "causal-lm" else int(labels.numel())


def load_tasks(recipe: MultitaskRecipe, method: str = "lora") -> list[TaskData]:
    from .data import load_dataset

    tasks = []
    for spec in recipe.tasks:
        task_recipe = recipe.task_recipe(spec, method)
        splits = load_dataset(spec.data, seed=recipe.train.seed)
        limit = task_recipe.train.max_train_examples
        train_rows = splits.train if limit is None else splits.train.take(limit)
        tasks.append(TaskData(spec, task_recipe, train_rows, _cap(splits.test, recipe.eval.max_examples)))
    return tasks


@dataclass
class Base:
    """The loaded base model, ready for adapters (dropout per train.model_dropout, on the device)."""

    model: nn.Module
    tokenizer: Any
    path: str | None
    world: distributed.World


def load_base(recipe: MultitaskRecipe, tasks: Sequence[TaskData]) -> Base:
    """The base model for all tasks; a classification head gets as many classes as the largest task has."""
    from .models import load_model

    world = distributed.setup(recipe.train.device)
    if world.distributed:
        raise ConfigError("multitask and continual runs use one process; run them without torchrun")
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    num_labels = None
    if recipe.task != "causal-lm":
        num_labels = max(len(t.train.labels or []) for t in tasks) or None
    loaded = load_model(recipe.model, task=recipe.task, num_labels=num_labels, seed=recipe.train.seed)
    if recipe.train.model_dropout is not None:
        for module in loaded.model.modules():
            if isinstance(module, nn.Dropout):
                module.p = recipe.train.model_dropout
    return Base(loaded.model.to(world.device), loaded.tokenizer, loaded.path or loaded.name, world)


def train_mode(model: nn.Module) -> None:
    """Train mode, except BatchNorm, which keeps the base's running statistics (see the module docstring)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


# -- adapters --------------------------------------------------------------------------------------------------
def add_task_adapters(model: nn.Module, recipe: MultitaskRecipe, base_path: str | None = None) -> list[str]:
    """Add one adapter per task (and the shared one for ``design: shared``); returns the names, shared first.
    The shared adapter is initialised from seed ``train.seed``, task k's from ``train.seed + 1 + k``."""
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
    return names


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Every tensor of adapter ``name``: LoRA factors, DoRA magnitudes and ``modules_to_save`` copies."""
    return [p for _, module in lora_modules(model) if name in module.adapter_names()
            for p in module.adapter_parameters(name)]


def copy_saved_modules(model: nn.Module, source: str, target: str) -> None:
    """Give adapter ``target`` a copy of ``source``'s ``modules_to_save`` (e.g. its classifier head)."""
    state = lora_state(model)
    for _, module in lora_modules(model):
        if isinstance(module, ModulesToSave) and source in module.modules_to_save:
            if target not in module.modules_to_save:
                module.add(target)
            module.modules_to_save[target].load_state_dict(module.modules_to_save[source].state_dict())
            module.modules_to_save[target].requires_grad_(False)
    state.configs[target] = dataclasses.replace(state.configs[target],
                                                modules_to_save=state.configs[source].modules_to_save)


def export_task(model: nn.Module, task: str, name: str, shared: str = SHARED) -> None:
    """Adapter ``name`` = shared + ``task`` as one plain LoRA (``cat``: ranks concatenated, exactly the sum of
    both updates), with the task's ``modules_to_save`` copies."""
    add_weighted_adapter(model, [shared, task], [1.0, 1.0], name, method="cat")
    copy_saved_modules(model, task, name)


def _snapshot(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    keep = {id(p) for name in names for p in adapter_parameters(model, name)}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in keep}


def _restore(model: nn.Module, snapshot: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)


# -- training --------------------------------------------------------------------------------------------------
def _concat(batches: Sequence[dict[str, Tensor]], pad_id: int | None) -> dict[str, Tensor]:
    """Stack per-task batches row-wise; token batches are right-padded to the longest (mask 0, label -100)."""
    if "input_ids" not in batches[0]:
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    length = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id or 0, "attention_mask": 0, "labels": -100}

    def pad(t: Tensor, value: int) -> Tensor:
        return nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    return {k: torch.cat([pad(b[k], fill[k]) for b in batches]) for k in batches[0]}


def mixed_step(model: nn.Module, tasks: Sequence[TaskData], step: int, tokenizer: Any,
               optimizer: torch.optim.Optimizer, scheduler: Any, groups: dict[str, list[nn.Parameter]],
               shared: Sequence[str] = (), device: torch.device | None = None) -> dict[str, float]:
    """One optimizer step on a mixed batch: each task's rows of step ``step``, routed to its adapter (plus the
    ``shared`` adapters on every row); loss ``sum_t L_t / N_t``; gradient norms clipped per adapter in ``groups``.
    Returns each task's mean loss."""
    args = tasks[0].recipe.train
    device = device or next(model.parameters()).device
    micro = [t.micro_batches(step) for t in tasks]  # [task][micro]
    encoded = [[to_device(t.encode(idx, tokenizer), device) for idx in micro[k]] for k, t in enumerate(tasks)]
    counts = [sum(t.answer_count(b["labels"]) for b in encoded[k]) for k, t in enumerate(tasks)]
    for t, n in zip(tasks, counts):
        if n == 0:
            raise TrainingError(f"task {t.name}: no answer token in step {step + 1}; raise max_length")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    optimizer.zero_grad(set_to_none=True)
    totals = [torch.zeros((), dtype=torch.float64) for _ in tasks]
    for i in range(args.grad_accum):
        parts = [encoded[k][i] for k in range(len(tasks))]
        batch = _concat(parts, pad_id)
        sizes = [p["labels"].shape[0] for p in parts]
        rows = [t.name for t, n in zip(tasks, sizes) for _ in range(n)]
        with route(model, rows, shared=shared):  # backward inside: recomputation (checkpointing) routes too
            logits = forward(model, tasks[0].recipe.task, batch)
            loss, start = 0.0, 0
            for k, n in enumerate(sizes):
                part, _ = loss_sum(tasks[0].recipe.task, logits[start:start + n], batch["labels"][start:start + n])
                loss = loss + part * (1.0 / counts[k])
                totals[k] += part.detach().double().cpu()
                start += n
            loss.backward()
    losses = {t.name: float(total) / n for t, total, n in zip(tasks, totals, counts)}
    if not all(math.isfinite(v) for v in losses.values()):
        optimizer.zero_grad(set_to_none=True)
        return losses
    if args.max_grad_norm:
        for params in groups.values():
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    optimizer.step()
    scheduler.step()
    return losses


def train_mixed(model: nn.Module, tasks: Sequence[TaskData], steps: int, tokenizer: Any = None,
                shared: Sequence[str] = (), progress: str | None = None) -> list[dict[str, Any]]:
    """Train every task's adapter (and the shared ones) together for ``steps`` mixed-batch steps; one AdamW over
    all of them. Returns the loss history."""
    args = tasks[0].recipe.train
    names = [*shared, *(t.name for t in tasks)]
    set_adapter(model, names)
    optimizer = _optimizer(model, args)
    scheduler = _scheduler(optimizer, args, steps)
    groups = {name: adapter_parameters(model, name) for name in names}
    bar = _progress(distributed.World(), args, steps, 0, progress) if progress else None
    history = []
    for step in range(steps):
        train_mode(model)
        losses = mixed_step(model, tasks, step, tokenizer, optimizer, scheduler, groups, shared)
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingError(f"loss became non-finite at step {step + 1} ({losses}); lower train.lr")
        history.append({"step": step + 1, "loss": losses, "lr": scheduler.get_last_lr()[0]})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses.values()) / len(losses):.4f}")
    if bar is not None:
        bar.close()
    return history


def train_one_after_another(model: nn.Module, tasks: Sequence[TaskData], steps: int, tokenizer: Any = None,
                            world: distributed.World | None = None) -> list[dict[str, Any]]:
    """The reference: each task's adapter trained alone with `lorakit.train`'s step, its own AdamW and schedule,
    on the same rows as `train_mixed`."""
    world = world or distributed.World(device=next(model.parameters()).device)
    history = []
    for task in tasks:
        set_adapter(model, task.name)
        optimizer = _optimizer(model, task.recipe.train)
        scheduler = _scheduler(optimizer, task.recipe.train, steps)
        for step in range(steps):
            train_mode(model)
            loss = _step(model, task.recipe, world, task.train, task.micro_batches(step), tokenizer, optimizer,
                         scheduler, model)
            history.append({"task": task.name, "step": step + 1, "loss": loss})
    return history


# -- evaluation ------------------------------------------------------------------------------------------------
def evaluate_task(model: nn.Module, task: TaskData, adapters: Sequence[str] | None, tokenizer: Any = None
                  ) -> dict[str, float]:
    """Held-out metrics of ``task`` with ``adapters`` active (None: the model as it is, adapters disabled)."""
    r = task.recipe
    kwargs = dict(tokenizer=tokenizer, batch_size=r.eval.batch_size, max_length=r.train.max_length,
                  image_size=r.image_size, generate_examples=r.eval.generate_examples,
                  max_new_tokens=r.eval.max_new_tokens)
    if adapters is None:
        if lora_state(model) is not None and lora_state(model).configs:
            with disable_adapters(model):
                return evaluate(model, r.task, task.test, **kwargs)
        return evaluate(model, r.task, task.test, **kwargs)
    set_adapter(model, list(adapters))
    return evaluate(model, r.task, task.test, **kwargs)


def primary_metric(task: str) -> tuple[str, bool]:
    """The metric a report ranks by, and whether higher is better."""
    return ("loss", False) if task == "causal-lm" else ("accuracy", True)


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
                copy_saved_modules(model, task.name, name)
                scores[task.name] = evaluate_task(model, task, [name], tokenizer)
            delete_adapter(model, name)
            rows.append({"method": method, "weight": weight, "rank": rank, "eval": scores})
    return rows


# -- lorakit multitask ------------------------------------------------------------------------------------------
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
    initial = _snapshot(model, names)
    times: dict[str, list[float]] = {"mixed": [], "one_after_another": []}
    cpu: dict[str, list[float]] = {"mixed": [], "one_after_another": []}
    results: dict[str, dict[str, Tensor]] = {}
    for _ in range(repeats):
        for kind, run in (("mixed", train_mixed), ("one_after_another", train_one_after_another)):
            _restore(model, initial)
            _synchronize(model)
            started, started_cpu = time.perf_counter(), time.process_time()
            run(model, tasks, steps, tokenizer)
            _synchronize(model)  # GPU work is asynchronous: count it all
            times[kind].append(time.perf_counter() - started)
            cpu[kind].append(time.process_time() - started_cpu)
            results.setdefault(kind, _snapshot(model, names))
    _restore(model, initial)
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


def run_multitask(recipe: MultitaskRecipe, output_dir: str | Path, benchmark_steps: int = 0,
                  benchmark_repeats: int = 3, benchmark_only: bool = False) -> dict[str, Any]:
    """Train all tasks of ``recipe`` together into ``output_dir``: ``adapters/TASK/`` (plain PEFT LoRA per task),
    ``parts/`` (``design: shared``: shared and task parts), ``metrics.json``, ``report.md``; returns the metrics.
    With ``benchmark_steps`` the `benchmark` runs first; ``benchmark_only`` stops after it."""
    from .io import save_adapter

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _seed_everything(recipe.train.seed)
    tasks = load_tasks(recipe)
    base = load_base(recipe, tasks)
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
              "adapters differ by at most "
              f"{b['max_abs_diff']:.2e}", flush=True)
    if benchmark_only:
        _write_json(out / "metrics.json", metrics)
        write_multitask_report(metrics, out)
        return metrics
    started = time.perf_counter()
    metrics["history"] = train_mixed(model, tasks, steps, tokenizer, shared, progress=recipe.name)
    metrics["train_time_s"] = time.perf_counter() - started
    metrics["trainable_params"] = {n: sum(p.numel() for p in adapter_parameters(model, n)) for n in names}
    metrics["eval"] = {}
    for task in tasks:
        metrics["eval"][task.name] = evaluate_task(model, task, [*shared, task.name], tokenizer)
        print(f"[{recipe.name}] {task.name}: {_fmt(metrics['eval'][task.name])}", flush=True)
    if shared:
        metrics["export_eval"] = {}
        for task in tasks:
            export_task(model, task.name, f"{task.name}-export")
            metrics["export_eval"][task.name] = evaluate_task(model, task, [f"{task.name}-export"], tokenizer)
    else:
        metrics["combinations"] = evaluate_combinations(model, tasks, recipe.combine, tokenizer)
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
    _write_json(out / "metrics.json", metrics)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    write_multitask_report(metrics, out)
    return metrics


# -- lorakit continual ------------------------------------------------------------------------------------------
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


def continual_strategy(model: nn.Module, recipe: MultitaskRecipe, tasks: Sequence[TaskData], strategy: str,
                       tokenizer: Any = None, base_path: str | None = None) -> dict[str, Any]:
    """Train ``tasks`` in order with ``strategy`` (full | lora | per-task); after each stage score every task.
    ``matrix[0]`` is the base model, ``matrix[i]`` the model after stage i (task i-1)."""
    world = distributed.World(device=next(model.parameters()).device)
    heads_of = recipe.task_recipe(tasks[0].spec).lora_config().modules_to_save or []
    if strategy == "full":
        model.requires_grad_(True)
    elif strategy == "lora":
        torch.manual_seed(recipe.train.seed)
        add_adapter(model, "default", tasks[0].recipe.lora_config(base_path))
        set_adapter(model, "default")
    bank = HeadBank(model, heads_of) if strategy != "per-task" and heads_of else None

    def score(stage: int) -> list[dict[str, float]]:
        row = []
        for j, other in enumerate(tasks):
            if bank is not None:
                bank.use(other.name)
            adapters = {"lora": ["default"], "full": None}.get(strategy, [other.name] if j < stage else None)
            row.append(evaluate_task(model, other, adapters, tokenizer))
        return row

    matrix, times, histories = [score(0)], [], []
    for i, task in enumerate(tasks):
        task_recipe = recipe.task_recipe(task.spec, "full" if strategy == "full" else "lora")
        if strategy == "per-task":
            torch.manual_seed(recipe.train.seed + 1 + i)
            add_adapter(model, task.name, task_recipe.lora_config(base_path))
            set_adapter(model, task.name)
        elif strategy == "lora":
            set_adapter(model, "default")
        if bank is not None:
            bank.use(task.name)
        steps = task.steps()
        optimizer = _optimizer(model, task_recipe.train)
        scheduler = _scheduler(optimizer, task_recipe.train, steps)
        bar = _progress(world, task_recipe.train, steps, 0, f"{strategy}: {task.name}")
        started, losses = time.perf_counter(), []
        for step in range(steps):
            train_mode(model)
            losses.append(_step(model, task_recipe, world, task.train, task.micro_batches(step), tokenizer,
                                optimizer, scheduler, model))
            if not math.isfinite(losses[-1]):
                raise TrainingError(f"{strategy}/{task.name}: loss became {losses[-1]} at step {step + 1}; lower lr")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if bar is not None:
            bar.close()
        times.append(time.perf_counter() - started)
        histories.append(losses)
        if bank is not None:
            bank.keep(task.name)
        matrix.append(score(i + 1))
        metric = primary_metric(recipe.task)[0]
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
    metric, higher = primary_metric(task)
    n = len(matrix) - 1
    learned = [matrix[j + 1][j][metric] for j in range(n)]
    final = [matrix[n][j][metric] for j in range(n)]
    sign = 1.0 if higher else -1.0
    forgetting = [sign * (a - b) for a, b in zip(learned, final)]
    return {"metric": metric, "higher_is_better": higher, "learned": learned, "final": final,
            "forgetting": forgetting, "average_final": sum(final) / n,
            "bwt": -sum(forgetting[:-1]) / max(1, n - 1)}


def run_continual(recipe: MultitaskRecipe, output_dir: str | Path) -> dict[str, Any]:
    """Every strategy of ``recipe.continual`` from the same base: ``metrics.json`` and ``report.md``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _seed_everything(recipe.train.seed)
    tasks = load_tasks(recipe)
    base = load_base(recipe, tasks)
    pristine = copy.deepcopy(base.model)
    results: dict[str, Any] = {"recipe": recipe.name, "task": recipe.task, "model": recipe.model,
                               "tasks": [dataclasses.asdict(t.spec) for t in tasks],
                               "train_rows": {t.name: len(t.train) for t in tasks},
                               "metric": primary_metric(recipe.task)[0], "strategies": {}}
    for strategy in recipe.continual.strategies:
        _seed_everything(recipe.train.seed)
        model = copy.deepcopy(pristine)
        results["strategies"][strategy] = continual_strategy(model, recipe, tasks, strategy, base.tokenizer,
                                                             base.path)
        del model
        _write_json(out / "metrics.json", results)  # partial results survive an interrupted run
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    write_continual_report(results, out)
    return results


# -- reports (rendering only: every number comes from metrics.json) ------------------------------------------------
STRATEGY_LABELS = {"full": "full fine-tuning in sequence", "lora": "one LoRA in sequence",
                   "per-task": "one adapter per task"}


def _stage_labels(tasks: Sequence[str]) -> list[str]:
    return ["base"] + [f"after {t}" for t in tasks]


def write_continual_report(results: dict[str, Any], out: str | Path) -> Path:
    from .report import Report, heatmap

    tasks = [t["name"] for t in results["tasks"]]
    metric = results["metric"]
    report = Report(f"Continual learning: {results['recipe']}")
    report.text(f"Tasks in order: {', '.join(tasks)} on {results['model']}. Each cell is the held-out {metric} "
                f"of a task (column) after a stage (row); row 'base' is before any training.")
    summary_rows = []
    for strategy, res in results["strategies"].items():
        s = res["summary"]
        summary_rows.append([STRATEGY_LABELS[strategy], f"{s['average_final']:.4f}", f"{s['bwt']:+.4f}",
                             ", ".join(f"{t} {f:+.4f}" for t, f in zip(tasks, s["forgetting"])),
                             f"{sum(res['train_time_s']):.1f}"])
    report.heading("Summary")
    report.table(["strategy", f"average final {metric}", "BWT", "forgetting per task (+ = worse)", "train s"],
                 summary_rows)
    for strategy, res in results["strategies"].items():
        report.heading(STRATEGY_LABELS[strategy])
        values = [[row[j][metric] for j in range(len(tasks))] for row in res["matrix"]]
        report.table(["stage", *tasks], [[label, *(f"{v:.4f}" for v in row)]
                                         for label, row in zip(_stage_labels(tasks), values)])
        report.figure(heatmap(values, _stage_labels(tasks), tasks, f"{STRATEGY_LABELS[strategy]}: {metric}",
                              "task", "stage", metric), f"forgetting-{strategy}.png")
    report.heading("Each task through the stages")
    curves = {STRATEGY_LABELS[s]: [[row[j][metric] for row in r["matrix"]] for j in range(len(tasks))]
              for s, r in results["strategies"].items()}
    report.figure(stage_curves(curves, tasks, metric), "stages.png",
                  f"Held-out {metric} of each task after every stage; a line that moves after its own task's stage "
                  "is forgetting (or transfer)")
    report.write(out)
    return Path(out) / "report.md"


def stage_curves(curves: dict[str, list[list[float]]], tasks: Sequence[str], metric: str) -> Any:
    """One panel per task: its metric after each stage (x), one line per strategy; the task's own stage marked."""
    from .report import _CYCLE, plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    stages = _stage_labels(tasks)
    for j, (ax, task) in enumerate(zip(axes[0], tasks)):
        for i, (label, per_task) in enumerate(curves.items()):
            ax.plot(range(len(stages)), per_task[j], marker="o", color=_CYCLE[i % len(_CYCLE)], label=label)
        ax.axvspan(j + 0.5, j + 1.5, color="#eee", zorder=0)
        ax.set_xticks(range(len(stages)))
        ax.set_xticklabels(stages, rotation=30, ha="right", fontsize=8)
        ax.set_title(task)
        ax.set_ylabel(f"held-out {metric}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_multitask_report(metrics: dict[str, Any], out: str | Path) -> Path:
    from .report import Report, loss_curves

    tasks = [t["name"] for t in metrics["tasks"]]
    metric = primary_metric(metrics["task"])[0]
    report = Report(f"Multi-task LoRA: {metrics['recipe']} ({metrics['design']})")
    if "eval" in metrics:
        _multitask_results(report, metrics, tasks, metric)
    if "benchmark" in metrics:
        b = metrics["benchmark"]
        report.heading("Mixed batch vs one adapter after another")
        report.text(f"The same {b['steps']} steps from the same initial adapters, alternated {b['repeats']} times; "
                    "the fastest run of each counts.")
        rows = [["wall", f"{b['mixed_s']:.2f}", f"{b['one_after_another_s']:.2f}", f"{b['speedup']:.2f}x"]]
        if "cpu_speedup" in b:
            rows.append(["CPU", f"{b['mixed_cpu_s']:.2f}", f"{b['one_after_another_cpu_s']:.2f}",
                         f"{b['cpu_speedup']:.2f}x"])
        report.table(["time", "mixed s", "one after another s", "speed-up"], rows)
        report.text(f"{b['rows_per_step']} rows per step; the adapters of the two runs differ by at most "
                    f"{b['max_abs_diff']:.2e} (largest change from the initial values: {b['max_abs_change']:.2e}).")
    if "history" in metrics:
        curves = {t: [(h["step"], h["loss"][t]) for h in metrics["history"]] for t in tasks}
        report.figure(loss_curves(curves, "Training loss per task (mixed batches)"), "multitask-loss.png")
    report.write(out)
    return Path(out) / "report.md"


def _multitask_results(report: Any, metrics: dict[str, Any], tasks: list[str], metric: str) -> None:
    from .report import grouped_bars

    report.text(f"{len(tasks)} tasks on {metrics['model']}, {metrics['steps']} mixed-batch steps in "
                f"{metrics['train_time_s']:.1f} s. Held-out {metric} per task.")
    series = {"base": [metrics["base_eval"][t][metric] for t in tasks],
              "own adapter" if metrics["design"] == "per-task" else "shared + task":
                  [metrics["eval"][t][metric] for t in tasks]}
    if "export_eval" in metrics:
        series["exported plain LoRA"] = [metrics["export_eval"][t][metric] for t in tasks]
    for row in metrics.get("combinations", []):
        series[f"{row['method']} x{row['weight']:g}"] = [row["eval"][t][metric] for t in tasks]
    report.table(["", *tasks], [[label, *(f"{v:.4f}" for v in values)] for label, values in series.items()])
    by_task = {t: [values[k] for values in series.values()] for k, t in enumerate(tasks)}
    report.figure(grouped_bars(list(series), by_task, f"held-out {metric}", f"Held-out {metric} per task"),
                  "multitask-eval.png", "combinations: add_weighted_adapter of all task adapters, method x weight"
                  if metrics.get("combinations") else f"held-out {metric} per task")


# -- command line ------------------------------------------------------------------------------------------------
def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="multi-task recipe name under recipes/ or a YAML file (e.g. multitask-mobilenet)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=20 design=shared")
    p.add_argument("--output", "-o", default=None, help="output folder (default: runs/RECIPE or RECIPE-continual)")


def _multitask_args(p: argparse.ArgumentParser) -> None:
    _recipe_args(p)
    p.add_argument("--benchmark", type=int, default=0, metavar="STEPS",
                   help="first time STEPS steps of mixed batches against the same steps one task after another")
    p.add_argument("--benchmark-repeats", type=int, default=3, metavar="N", help="alternate the two N times")
    p.add_argument("--benchmark-only", action="store_true", help="stop after the benchmark (no training run)")


@command("multitask", _multitask_args)
def _multitask_cli(args: argparse.Namespace) -> int:
    """Train several tasks on one base at once: one adapter per task in mixed batches, or shared + per task."""
    recipe = load_multitask_recipe(args.recipe, args.overrides)
    if args.benchmark_only and not args.benchmark:
        raise ConfigError("--benchmark-only needs --benchmark STEPS")
    output = Path(args.output or Path("runs") / recipe.name)
    metrics = run_multitask(recipe, output, benchmark_steps=args.benchmark, benchmark_repeats=args.benchmark_repeats,
                            benchmark_only=args.benchmark_only)
    if args.benchmark_only:
        return 0
    print(f"\n{recipe.name}: {recipe.design} design, {metrics['steps']} steps in {metrics['train_time_s']:.1f} s; "
          f"report: {output / 'report.md'}")
    return 0


@command("continual", _recipe_args)
def _continual_cli(args: argparse.Namespace) -> int:
    """Tasks one after another: forgetting matrix for full fine-tuning, one LoRA, one adapter per task."""
    recipe = load_multitask_recipe(args.recipe, args.overrides)
    output = Path(args.output or Path("runs") / f"{recipe.name}-continual")
    results = run_continual(recipe, output)
    for strategy, res in results["strategies"].items():
        s = res["summary"]
        print(f"{STRATEGY_LABELS[strategy]:>30}: average final {s['metric']} {s['average_final']:.4f}, "
              f"BWT {s['bwt']:+.4f}")
    print(f"report: {output / 'report.md'}")
    return 0
