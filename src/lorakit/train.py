"""Training: ONE optimizer step and ONE loop, used by every path that trains (`lorakit train`, multi-task in
mixed batches and one task after another, continual learning, the LR range test, 1 or N processes).

The public API, bottom up:

- ``train_step(model, micro_batches, optimizer, scheduler, settings, lr=None) -> StepResult``: forward (bf16
  autocast when ``settings.precision == "bf16"``), loss summed and divided by the global count of loss terms of
  each group (rows, or answer tokens: `lorakit.evaluate.loss_terms`), backward, gradient clipping (per group of
  parameters when ``settings.clip_groups`` is set), ``optimizer.step()``, ``scheduler.step()``. ``micro_batches``
  are `lorakit.batching.MicroBatch` (inputs + labels; optional loss groups and per-row adapters for mixed
  batches); `lorakit.batching` also holds the data order (`DataOrder`, `run_steps`, `encode_rows`).
- ``run_training(model, optimizer, scheduler, batches, steps, settings, *, start=0, on_step=None, lr_at=None,
  progress=None, stop_on_nonfinite=True) -> list[StepResult]``: the loop. ``batches(step)`` gives a step's
  micro-batches; the model is put in `train_mode` (frozen normalisation layers keep their running statistics)
  before each step; ``on_step(step, result)`` returning True stops; ``lr_at(step)`` sets the learning rate per
  step (an LR range test, with ``scheduler=None``).
- ``train(recipe, output_dir, resume=False, on_step=None) -> metrics``: a recipe run (`RecipeLoop`): data
  order (`lorakit.batching.DataOrder`: seeded, optionally grouped by length, cycled through epochs until
  ``max_steps``), optimizer (`build_optimizer`, LoRA+), schedule (`build_scheduler`), validation at each
  epoch's end with early stopping, checkpoints (`lorakit.checkpoints`: safetensors + JSON, exact resume), a
  per-step log and a plot (`lorakit.runlog`). The model is wrapped for N processes (DDP, or FSDP with
  ``train.sharding=fsdp``) in one place, `lorakit.distributed.wrap`, before the optimizer is built.

A `lorakit.recipes.Recipe` (schema, YAML, overrides and checks live there) says what to train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from . import distributed
from .checkpoints import (CHECKPOINT_FILE, checkpoint_path, clean_stale_temp_files, read_checkpoint,
                          restore_checkpoint, rng_state, save_checkpoint)
from .config import LoraConfig
from .errors import ConfigError, TrainingError
from .batching import DataOrder, MicroBatch, encode_rows, row_lengths, run_steps
from .evaluate import evaluate, forward, loss_sum, loss_terms
from .files import write_bytes, write_json
from .inject import targeting_report
from .recipes import Recipe, TrainArgs, load_recipe_data, load_recipe_model
from .runlog import PLOT_FILE, TrainingLog, plot_training, save_result
from .tasks import primary_metric


# -- one step and one loop ---------------------------------------------------------------------------------------
@dataclass
class StepSettings:
    """How `train_step` runs: the task (its forward and loss), bf16 autocast, clipping, the processes."""

    task: str
    precision: str = "fp32"  # fp32 | bf16 (autocast of the forward; weights, optimizer and loss stay fp32)
    max_grad_norm: float | None = 1.0
    clip_groups: Sequence[Sequence[nn.Parameter]] | None = None  # clipped one by one; None: all trainable ones
    world: distributed.World = field(default_factory=distributed.World)

    @classmethod
    def from_args(cls, task: str, args: TrainArgs, world: distributed.World | None = None,
                  clip_groups: Sequence[Sequence[nn.Parameter]] | None = None) -> "StepSettings":
        return cls(task, args.precision, args.max_grad_norm, clip_groups, world or distributed.World())


@dataclass
class StepResult:
    """What one optimizer step did."""

    loss: float  # mean loss of the step (several groups: the mean of the groups' means)
    losses: dict[str, float]  # each group's mean loss ("" for the single group)
    grad_norm: float | None  # total gradient norm before clipping; None when the step was skipped (non-finite)
    lr: float  # learning rate the step used (first parameter group)
    terms: int  # loss terms of the step over all processes (rows, or answer tokens)

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.losses.values())


class NonFiniteLoss(TrainingError):
    """The loss of a step was NaN or infinite; the step changed nothing."""

    def __init__(self, step: int, result: StepResult) -> None:
        super().__init__(f"loss became {result.loss} at step {step}; lower train.lr, keep train.max_grad_norm "
                         "set, or check the data")
        self.step, self.result = step, result


def train_step(model: nn.Module, micro_batches: Sequence[MicroBatch], optimizer: torch.optim.Optimizer,
               scheduler: Any, settings: StepSettings, lr: float | None = None) -> StepResult:
    """One optimizer step: forward and backward of every micro-batch, the loss of each group summed and divided
    by the group's global count of loss terms (`lorakit.evaluate.loss_terms`, over all micro-batches and
    processes: 1 and N processes, 1 and K micro-batches agree), clipping, ``optimizer.step()`` and
    ``scheduler.step()`` (``scheduler`` may be None).

    The objective is ``sum_g L_g / N_g``: each group's mean loss (one group: the batch mean). ``model`` is the
    module to run (`lorakit.distributed.wrap` of the model under torchrun). ``lr`` sets the learning rate of this
    step first (`set_lr`; pass ``scheduler=None`` then). A non-finite loss skips the update (gradients cleared)
    and is returned for the caller to act on.
    """
    world, task = settings.world, settings.task
    names = list(dict.fromkeys(name for mb in micro_batches for name, _ in mb.segments()))
    local = torch.zeros(len(names), dtype=torch.float64)
    for mb in micro_batches:
        for (name, start, stop) in _spans(mb):
            local[names.index(name)] += loss_terms(task, mb.inputs["labels"][start:stop])
    counts = distributed.all_reduce_sum(local.to(world.device), world).cpu()
    empty = [name or "the batch" for name, count in zip(names, counts.tolist()) if count == 0]
    if empty:
        raise TrainingError(f"a step has no loss term for {empty}: every answer token was cut off (fix: a larger "
                            "train.max_length, or shorter prompts)")
    if lr is not None:
        set_lr(optimizer, lr)
    used_lr = float(optimizer.param_groups[0]["lr"])
    optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(len(names), dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        no_sync = getattr(model, "no_sync", None)  # DDP: all-reduce gradients once, after the last micro-batch
        sync = no_sync() if no_sync is not None and i < len(micro_batches) - 1 else contextlib.nullcontext()
        with sync, _routed(model, mb):  # backward inside: recomputation (checkpointing) is routed too
            with autocast(settings.precision, world.device):
                logits = forward(model, task, mb.inputs)
            objective: Any = 0.0
            for name, start, stop in _spans(mb):
                part, _ = loss_sum(task, logits[start:stop], mb.inputs["labels"][start:stop])  # fp32
                k = names.index(name)
                # DDP averages gradients over processes: scale so the result is the global mean
                objective = objective + part * (world.size / float(counts[k]))
                totals[k] += part.detach().double().cpu()
            objective.backward()
    means = distributed.all_reduce_sum(totals.to(world.device), world).cpu() / counts
    losses = {name: float(v) for name, v in zip(names, means)}
    result = StepResult(sum(losses.values()) / len(losses), losses, None, used_lr, int(counts.sum()))
    if not result.finite:
        optimizer.zero_grad(set_to_none=True)
        return result
    result.grad_norm = _clip(model, settings)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return result


def _spans(mb: MicroBatch) -> list[tuple[str, int, int]]:
    spans, start = [], 0
    for name, rows in mb.segments():
        spans.append((name, start, start + rows))
        start += rows
    return spans


def _routed(model: nn.Module, mb: MicroBatch) -> contextlib.AbstractContextManager:
    if mb.adapters is None:
        return contextlib.nullcontext()
    from .adapters import route

    return route(getattr(model, "module", model), list(mb.adapters), shared=list(mb.shared))


def _clip(model: nn.Module, settings: StepSettings) -> float:
    """Clip each group to ``max_grad_norm`` (None: no clipping); the total norm before clipping."""
    groups = settings.clip_groups or [[p for p in model.parameters() if p.requires_grad]]
    norms = []
    for params in groups:
        if settings.max_grad_norm:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)))
        else:
            grads = [p.grad for p in params if p.grad is not None]
            norms.append(float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0)
    return math.sqrt(sum(n * n for n in norms))


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on the run's device type (cuda or cpu), or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate to ``lr``, keeping each parameter group's ratio to it (LoRA+'s B matrices)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


def has_running_stats(module: nn.Module) -> bool:
    """Whether ``module`` keeps running statistics that training mode would update (BatchNorm*, InstanceNorm
    with ``track_running_stats``, any module with a ``running_mean`` buffer)."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.track_running_stats
    return any(name == "running_mean" for name, _ in module.named_buffers(recurse=False))


def norm_layers(model: nn.Module) -> list[str]:
    """Names of ``model``'s modules with running statistics (`has_running_stats`)."""
    return [name for name, module in model.named_modules() if name and has_running_stats(module)]


def with_norm_layers(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` with every normalisation layer of ``model`` that keeps running statistics added to
    ``modules_to_save`` (``train.train_norm_stats``): each becomes a trainable copy per adapter whose affine
    parameters train and whose running statistics update, and both are saved with the adapter (as PEFT saves
    ``modules_to_save``), checkpointed and restored on load. `ConfigError` when the model has none."""
    names = norm_layers(model)
    if not names:
        raise ConfigError("train.train_norm_stats: the model has no normalisation layer with running statistics "
                          "(BatchNorm...); remove the option")
    return config.replace(modules_to_save=list(dict.fromkeys([*(config.modules_to_save or []), *names])))


def train_mode(model: nn.Module) -> None:
    """Training mode, except normalisation layers whose parameters are all frozen: they keep the base's
    running statistics (eval mode), so a frozen base stays frozen. Trained ones (full fine-tuning, or a
    ``modules_to_save`` copy, see ``train.train_norm_stats``) train and update their statistics."""
    model.train()
    for module in model.modules():
        if has_running_stats(module) and not any(p.requires_grad for p in module.parameters()):
            module.eval()


StepHook = Callable[[int, StepResult], "bool | None"]


def run_training(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 batches: Callable[[int], Sequence[MicroBatch]], steps: int, settings: StepSettings, *,
                 start: int = 0, on_step: StepHook | None = None, lr_at: Callable[[int], float] | None = None,
                 progress: str | None = None, stop_on_nonfinite: bool = True) -> list[StepResult]:
    """The training loop: steps ``start .. steps - 1`` of `train_step`, each on ``batches(step)``, the model in
    `train_mode` before each. Returns the steps' results.

    ``on_step(step, result)`` runs after each step (``step`` counted from 1); returning True stops the loop
    (validation, checkpoints, early stopping, an LR range test's divergence all live there). ``lr_at(step)``
    sets the learning rate of each step (with ``scheduler=None``). A non-finite loss raises `NonFiniteLoss`
    unless ``stop_on_nonfinite`` is False (then ``on_step`` sees it). ``progress``: a progress bar's title
    (main process only).
    """
    bar = None
    if progress is not None and settings.world.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=progress, unit="step", file=sys.stderr, dynamic_ncols=True)
    results = []
    try:
        for step in range(start, steps):
            train_mode(getattr(model, "module", model))
            result = train_step(model, batches(step), optimizer, scheduler, settings,
                                lr=lr_at(step) if lr_at is not None else None)
            results.append(result)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}")
            if stop_on_nonfinite and not result.finite:
                raise NonFiniteLoss(step + 1, result)
            if on_step is not None and on_step(step + 1, result):
                break
    finally:
        if bar is not None:
            bar.close()
    return results


# -- optimizer and schedule ------------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with LoRA+ the B matrices get ``lora_plus_ratio`` x the learning
    rate (kept as each group's ``lr_ratio``, see `set_lr`). No decay on 1-D tensors."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        ratio = args.lora_plus_ratio if ("lora_B" in name or "lora_embedding_B" in name) else 1.0
        decay = args.weight_decay if param.ndim > 1 else 0.0
        groups.setdefault((ratio, decay), []).append(param)
    return torch.optim.AdamW([{"params": ps, "lr": args.lr * ratio, "lr_ratio": ratio, "weight_decay": wd}
                              for (ratio, wd), ps in groups.items()], lr=args.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs, total_steps: int) -> Any:
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine, linear or constant (``schedule``)."""
    warmup = int(args.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if args.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if args.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- lorakit train: a recipe run ---------------------------------------------------------------------------------
@dataclass
class LoopState:
    """Where a recipe run is: enough to resume exactly (saved in checkpoints as JSON)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    examples_seen: int = 0
    best_metric: float | None = None
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunData:
    """A recipe's rows: training (capped by ``max_train_examples``), validation and test (capped by
    ``eval.max_examples``), and the full training split (its fingerprint and labels)."""

    train: Any
    validation: Any
    test: Any
    full_train: Any


def load_run_data(recipe: Recipe) -> RunData:
    """The rows a recipe run trains and evaluates on (`lorakit.recipes.load_recipe_data`, then the caps)."""
    splits = load_recipe_data(recipe)  # the recipe's data options (data.skip_bad_rows, ...) applied there
    limit = recipe.train.max_train_examples
    train_rows = splits.train if limit is None else splits.train.take(limit)
    cap = recipe.eval.max_examples
    return RunData(train_rows, _cap(splits.validation, cap), _cap(splits.test, cap), splits.train)


def train(recipe: Recipe, output_dir: str | Path, resume: bool = False,
          on_step: Callable[[LoopState, float], None] | None = None) -> dict[str, Any]:
    """Train ``recipe`` into ``output_dir`` (``adapter/`` or ``model/``, ``metrics.json``, ``train_log.jsonl``,
    ``training.png``, ``checkpoint.safetensors``); returns the metrics. ``on_step(state, loss)`` runs after every
    optimizer step (an exception there stops the run with a checkpoint, as Ctrl-C does)."""
    args = recipe.train
    world = distributed.setup(args.device, cpu_collectives=args.fsdp_cpu_offload)
    out = Path(output_dir)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_files(out)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    seed_everything(args.seed)
    started = time.perf_counter()
    data = load_run_data(recipe)
    sharded = distributed.is_sharded(args.sharding, world, args.fsdp_cpu_offload)
    # sharded, the base stays in CPU memory until `fully_shard` moves it to the device one block at a time, each
    # block cut into its shards as it arrives: no device ever holds the whole base (what FSDP is for)
    loaded = load_recipe_model(recipe, labels=data.full_train.labels, device=None if sharded else world.device)
    model = loaded.model
    config = recipe.lora_config(loaded.path or loaded.name) if recipe.method == "lora" else None
    if config is not None:  # a target matching nothing fails now, not after the baseline evaluation
        targeting_report(model, config)
    eval_kwargs = dict(tokenizer=loaded.tokenizer, batch_size=recipe.eval.batch_size, max_length=args.max_length,
                       image_size=recipe.image_size, max_new_tokens=recipe.eval.max_new_tokens, device=world.device)
    base_eval = None if sharded else _evaluate_base(recipe, world, model, data, eval_kwargs)
    extras = _prepare_model(recipe, model, config, loaded.tokenizer)
    loop = RecipeLoop(recipe, world, out, model, loaded.tokenizer, data, eval_kwargs)
    if sharded:  # on the device only now, sharded; the adapters as initialised (B = 0) add nothing to the base
        base_eval = _evaluate_base(recipe, world, model, data, eval_kwargs)
    if resume:
        loop.resume()
    loop.run(on_step)
    metrics = {"base_eval": base_eval, "train_time_s": time.perf_counter() - started, **_param_counts(recipe, model)}
    return loop.finish(loaded, metrics, extras)


def _evaluate_base(recipe: Recipe, world: distributed.World, model: nn.Module, data: RunData,
                   eval_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Held-out metrics of the model before training (every process: a sharded forward is a collective)."""
    _log(world, f"[{recipe.name}] evaluating the base model on {len(data.test)} held-out rows")
    base_eval = evaluate(model, recipe.task, data.test, generate_examples=recipe.eval.generate_examples,
                         progress=f"{recipe.name}: base model" if recipe.train.progress and world.is_main else None,
                         **eval_kwargs)
    _log(world, f"[{recipe.name}] before training: {format_metrics(base_eval)}")
    return base_eval


def _prepare_model(recipe: Recipe, model: nn.Module, config: LoraConfig | None, tokenizer: Any) -> dict[str, Any]:
    """Dropout, adapters (LoRA) or all parameters trainable (full), gradient checkpointing; returns what
    `save_adapter` needs besides the model (PiSSA's fingerprint of the original base and initial factors)."""
    args = recipe.train
    if args.model_dropout is not None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = args.model_dropout
    extras: dict[str, Any] = {}
    if config is None:
        model.requires_grad_(True)
    else:
        from .inject import inject
        from .io import adapter_state_dict, base_fingerprint

        if args.train_norm_stats:
            config = with_norm_layers(model, config)
        if config.init == "pissa":  # the base becomes a residual: fingerprint the original, keep A0/B0 for export
            extras["fingerprint"] = base_fingerprint(model, config, tokenizer)
        inject(model, config)
        if config.init == "pissa":
            extras["pissa_initial"] = adapter_state_dict(model)
        if args.sharding == "fsdp" and "fingerprint" not in extras:  # of the whole base, before it is sharded
            extras["fingerprint"] = base_fingerprint(model, config, tokenizer)
        if args.dtype != "fp32":  # a bf16/fp16 base: the adapters, heads and AdamW state stay fp32
            from .precision import keep_trainable_fp32

            keep_trainable_fp32(model)
    if args.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return extras


def _param_counts(recipe: Recipe, model: nn.Module) -> dict[str, Any]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    counts: dict[str, Any] = {}
    if recipe.quantize:  # quantized weights are buffers now; count them as the parameters they replace
        from .quant import QuantizedLinear, weight_bytes

        n_total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
        counts["quantized_weight_bytes"], counts["quantized_weight_fp32_bytes"] = weight_bytes(model)
    return {"trainable_params": n_trainable, "total_params": n_total, "trainable_fraction": n_trainable / n_total,
            "trainable_tensors": len(trainable), **counts}


class RecipeLoop:
    """`run_training` for a recipe: its data order, optimizer and schedule, validation at each epoch's end with
    early stopping, checkpoints, the per-step log, Ctrl-C handling and resuming."""

    def __init__(self, recipe: Recipe, world: distributed.World, out: Path, model: nn.Module, tokenizer: Any,
                 data: RunData, eval_kwargs: dict[str, Any]) -> None:
        args = recipe.train
        self.recipe, self.world, self.out, self.model, self.tokenizer = recipe, world, out, model, tokenizer
        self.data, self.eval_kwargs = data, eval_kwargs
        self.steps_per_epoch, self.total_steps = run_steps(len(data.train), args)
        lengths = row_lengths(recipe.task, data.train, tokenizer) if args.group_by_length else None
        self.order = DataOrder(len(data.train), args, lengths)
        # the one place the model is wrapped for N processes; first, as FSDP replaces the parameters
        self.train_model = distributed.wrap(model, world, args.sharding, args.fsdp_blocks, args.precision,
                                            args.fsdp_cpu_offload)
        self.sharded = distributed.is_sharded(args.sharding, world, args.fsdp_cpu_offload)
        self.optimizer = build_optimizer(model, args)
        self.scheduler = build_scheduler(self.optimizer, args, self.total_steps)
        self.state = LoopState()
        self.checkpoint = out / CHECKPOINT_FILE
        self.best: dict[str, Tensor] | None = None
        self.rng_at_step = rng_state()  # RNG at the last step boundary: what a checkpoint of `state` must hold
        self.log: TrainingLog | None = None
        self.started = time.perf_counter()
        self.user_hook: Callable[[LoopState, float], None] | None = None
        self.interrupt: _DeferredInterrupt | None = None

    def resume(self) -> None:
        if self.recipe.train.sharding == "fsdp":  # one shard per process, re-cut for this number of processes
            from .sharded_checkpoints import resume_sharded

            path, loop = resume_sharded(self.out, self.world, self.model, self.optimizer, self.scheduler)
        else:
            path = checkpoint_path(self.out)
            saved = read_checkpoint(path)
            restore_checkpoint(saved, path, self.model, self.optimizer, self.scheduler)
            loop = saved.loop
        try:
            self.state = LoopState(**loop)
        except TypeError as err:
            raise TrainingError(f"--resume: checkpoint {path}: its loop state does not fit ({err}); use a new "
                                "--output") from None
        _log(self.world, f"[{self.recipe.name}] resumed at step {self.state.global_step} (epoch {self.state.epoch})")

    def batches(self, step: int) -> list[MicroBatch]:
        r = self.recipe
        return encode_rows(r.task, self.data.train, self.order.micro_batches(step), self.tokenizer, r.train,
                           r.image_size, self.world)

    def run(self, on_step: Callable[[LoopState, float], None] | None = None) -> None:
        """Train from ``state`` to the end; a checkpoint on Ctrl-C (or an exception from ``on_step``) and at the
        end; a non-finite loss stops with the last good checkpoint intact."""
        args, name = self.recipe.train, self.recipe.name
        self.user_hook = on_step
        if self.world.is_main:
            self.log = TrainingLog(self.out, resume_step=self.state.global_step or None)
        settings = StepSettings.from_args(self.recipe.task, args, self.world)
        stop = self.interrupt = _DeferredInterrupt()
        try:
            run_training(self.train_model, self.optimizer, self.scheduler, self.batches,
                         self.total_steps, settings, start=self.state.global_step, on_step=self._after_step,
                         progress=name if args.progress else None)
        except NonFiniteLoss as err:
            ckpt = self.checkpoint if self.checkpoint.exists() else "none yet"
            raise TrainingError(f"loss became {err.result.loss} at step {err.step} (epoch {self.state.epoch}); "
                                f"training stopped and the last good checkpoint ({ckpt}) is intact. Lower "
                                "train.lr, keep train.max_grad_norm set, or check the data") from None
        except KeyboardInterrupt:
            self.save_checkpoint(self.rng_at_step)
            _log(self.world, f"[{name}] interrupted: checkpoint saved at step {self.state.global_step}; "
                             "continue with --resume")
            raise
        finally:
            stop.restore()
            if self.log is not None:
                self.log.close()
        if self.best is not None and args.early_stopping_patience is not None:
            with torch.no_grad():
                for pname, param in self.model.named_parameters():
                    if pname in self.best:
                        param.copy_(self.best[pname])
        self.save_checkpoint(rng_state())

    def _after_step(self, step: int, result: StepResult) -> bool:
        """Book-keeping after optimizer step ``step``: state, history and log, validation at an epoch's end,
        checkpoint, the caller's hook; True stops (early stopping)."""
        args, s = self.recipe.train, self.state
        self.rng_at_step = rng_state()
        s.global_step, s.examples_seen = step, s.examples_seen + args.batch_size * args.grad_accum
        s.epoch, s.step_in_epoch = divmod(step, self.steps_per_epoch)
        s.history.append({"step": step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm})
        if self.log is not None:
            self.log.step(step, s.epoch, result, time.perf_counter() - self.started)
        stop = s.step_in_epoch == 0 and self._validate(s.epoch - 1)
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            self.save_checkpoint(self.rng_at_step)
        if self.user_hook is not None:
            self.user_hook(s, result.loss)
        if self.world.distributed:  # stop every process at the same step (one that went on would hang)
            flag = torch.tensor([float(self.interrupt.requested)], device=self.world.device)
            self.interrupt.requested = bool(distributed.all_reduce_sum(flag, self.world).item())
        self.interrupt.check()  # a Ctrl-C during the step stops here, at a step boundary
        return stop

    def _validate(self, epoch: int) -> bool:
        """Validation at the end of ``epoch``; keeps the best trainable tensors; True when early stopping stops."""
        r, s = self.recipe, self.state
        if len(self.data.validation) == 0:  # nothing to validate on: no metric, no early stopping
            return False
        val = evaluate(self.model, r.task, self.data.validation, **self.eval_kwargs)
        s.history.append({"epoch": epoch, "step": s.global_step, "validation": val})
        if self.log is not None:
            self.log.validation(s.global_step, epoch, val)
        _log(self.world, f"[{r.name}] epoch {epoch} validation: {format_metrics(val)}")
        metric = primary_metric(r.task)
        value = val[metric.name]
        if s.best_metric is None or metric.better(value, s.best_metric):
            s.best_metric, s.bad_epochs = value, 0
            self.best = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        else:
            s.bad_epochs += 1
        patience = r.train.early_stopping_patience
        if patience is not None and s.bad_epochs > patience:
            _log(self.world, f"[{r.name}] early stop: no validation gain for {s.bad_epochs} epochs")
            return True
        return False

    def save_checkpoint(self, rng: dict[str, Any]) -> None:
        if self.recipe.train.sharding == "fsdp":  # every process writes its own shard (and its RNG)
            from .sharded_checkpoints import save_sharded_checkpoint

            save_sharded_checkpoint(self.out, self.world, self.model, self.optimizer, self.scheduler,
                                    dataclasses.asdict(self.state), self.recipe.to_dict(), rng)
        elif self.world.is_main:
            save_checkpoint(self.checkpoint, self.model, self.optimizer, self.scheduler,
                            dataclasses.asdict(self.state), self.recipe.to_dict(), rng)

    def finish(self, loaded: Any, metrics: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
        """Held-out and training-slice metrics, then (main process) the adapter or model, ``metrics.json``,
        ``recipe.yaml`` and the training plot; returns the metrics."""
        r, world, model = self.recipe, self.world, self.model
        final_eval = evaluate(model, r.task, self.data.test, generate_examples=r.eval.generate_examples,
                              **self.eval_kwargs)
        train_eval = evaluate(model, r.task, _cap(self.data.train, len(self.data.test)), **self.eval_kwargs)
        _log(world, f"[{r.name}] after training: {format_metrics(final_eval)}")
        metrics = {"recipe": r.name, "task": r.task, "model": r.model, "data": r.data, "method": r.method,
                   **metrics, "eval": final_eval, "train_eval": train_eval, "steps": self.state.global_step,
                   "examples_seen": self.state.examples_seen, "peak_memory_mb": _peak_memory_mb(world),
                   "world_size": world.size, "history": self.state.history}
        if self.sharded:  # every process gathers the adapter (only it), checked against the shards before writing
            from .sharding import check_adapter, gather_adapter

            extras = {**extras, "tensors": gather_adapter(model)}
            check_adapter(model, extras["tensors"])
        if world.is_main:
            metrics["adapter_bytes"] = save_result(model, loaded.tokenizer, r, self.out, metrics, self.data.full_train,
                                                   extras)
            if r.quantize and r.method == "lora":  # after saving: this leaves the model merged
                metrics["quantized_merge"] = quantized_merge_check(model, r.task, self.data.test, self.eval_kwargs)
                _log(world, f"[{r.name}] merged into the {r.quantize} base: "
                            f"{format_metrics(metrics['quantized_merge']['eval'])}; re-quantization drift "
                            f"{metrics['quantized_merge']['mean_relative']:.2e} (mean relative)")
            write_json(self.out / "metrics.json", metrics)
            saved_recipe = r.with_absolute_paths().to_dict()  # eval/predict of the run work from any directory
            write_bytes(self.out / "recipe.yaml", yaml.safe_dump(saved_recipe, sort_keys=False).encode())
            plot_training(self.state.history, self.out / PLOT_FILE, primary_metric(r.task).name, title=r.name)
        distributed.barrier(world)
        return metrics


def quantized_merge_check(model: nn.Module, task: str, rows: Any, eval_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Merge the active adapters into a quantized base and report what re-quantizing ``W + s B A`` costs:
    per-layer drift (`lorakit.quant.merge_drift`) and the held-out metrics of the merged model.
    Leaves the model merged."""
    from .adapters import active_adapters, lora_layers, merge
    from .quant import LoraQuantizedLinear, merge_drift

    names = active_adapters(model)
    drift = {f"{layer_name}:{name}": merge_drift(layer, name) for layer_name, layer in lora_layers(model)
             if isinstance(layer, LoraQuantizedLinear) for name in names if name in layer.r}
    merge(model)
    worst = max(drift, key=lambda k: drift[k]["relative"]) if drift else None
    return {"layers": len(drift), "max_abs": max((d["max_abs"] for d in drift.values()), default=0.0),
            "mean_relative": sum(d["relative"] for d in drift.values()) / max(len(drift), 1),
            "worst_layer": worst, "worst_relative": drift[worst]["relative"] if worst else 0.0,
            "eval": evaluate(model, task, rows, **eval_kwargs)}


class _DeferredInterrupt:
    """The first Ctrl-C is handled at the next step boundary (a checkpoint then needs no half-done step);
    a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nlorakit: stopping after this step to save a checkpoint (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


# -- helpers -------------------------------------------------------------------------------------------------
def _peak_memory_mb(world: distributed.World) -> float:
    if world.device.type == "cuda":
        return torch.cuda.max_memory_allocated(world.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (dropout, LoRA's initialisation draw from them)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _cap(rows: Any, limit: int | None) -> Any:
    return rows if limit is None or len(rows) <= limit else rows.take(limit)


def _log(world: distributed.World, message: str) -> None:
    if world.is_main:
        print(message, flush=True)


def format_metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
