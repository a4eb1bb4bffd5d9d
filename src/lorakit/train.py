"""Training from recipes: one loop for LoRA and full fine-tuning, for 1 or N processes (torchrun).

A recipe is a YAML file (``recipes/NAME.yaml``) read into `Recipe`; ``key=value`` overrides use dotted paths
(``train.lr=1e-3``, ``lora.r=16``, ``method=full``). Checkpoints hold everything needed to resume so that an
interrupted run ends with the same weights as an uninterrupted one: trainable tensors, optimizer, scheduler,
RNG states and the data position (epoch, step), written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from . import distributed
from .config import LoraConfig
from .errors import ConfigError, LorakitError
from .evaluate import encode, evaluate, forward, loss_sum, to_device

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
DEFAULT_RECIPE = "sentiment-minilm"
_TASK_TYPES = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM", "image-classification": None}


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (non-finite loss, incompatible checkpoint...)."""


@dataclass
class TrainArgs:
    """How to train. ``epochs`` may be fractional; ``max_steps`` (optimizer steps) caps it."""

    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16  # global rows per micro-batch, split over processes
    grad_accum: int = 1
    lr: float = 5e-4
    lora_plus_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): lr of B = ratio x lr; 1 = off
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    seed: int = 0
    max_length: int = 128
    group_by_length: bool = False  # batch rows of similar length together (less padding, same epoch content)
    max_train_examples: int | None = None
    early_stopping_patience: int | None = None
    checkpoint_every: int = 0  # optimizer steps; 0: only at the end (and on Ctrl-C)
    gradient_checkpointing: bool = False
    model_dropout: float | None = None  # set every dropout of the base model to this (None: keep the model's)
    device: str = "auto"
    num_threads: int | None = None
    progress: bool = True
    precision: str = "fp32"  # fp32 | bf16: bf16 autocast of the training forward (weights, optimizer, loss fp32)


@dataclass
class EvalArgs:
    batch_size: int = 32
    max_examples: int | None = None  # cap on validation/test rows (speed)
    generate_examples: int = 0  # causal LM: greedy answers scored with chrF / exact match
    max_new_tokens: int = 64


@dataclass
class Recipe:
    name: str
    task: str
    model: str
    data: str
    method: str = "lora"  # lora | full
    lora: dict[str, Any] = field(default_factory=dict)
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    image_size: int | None = None
    quantize: str | None = None  # int8 | nf4: frozen quantized base under the adapters (QLoRA-style)
    description: str = ""

    def lora_config(self, base_model_name: str | None = None) -> LoraConfig:
        return LoraConfig(**{**self.lora, "task_type": _TASK_TYPES.get(self.task),
                             "base_model_name_or_path": base_model_name})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- recipes -------------------------------------------------------------------------------------------------
def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    for folder in (RECIPES_DIR, Path.cwd() / "recipes"):
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"no recipe {name_or_path!r}: give a YAML file or one of {known}")


def load_recipe(name_or_path: str = DEFAULT_RECIPE, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe and apply ``key=value`` overrides (values parsed as YAML: ``3``, ``1e-3``, ``[q, v]``)."""
    path = recipe_path(name_or_path)
    return recipe_from_dict(read_recipe_yaml(path, overrides), source=str(path))


def read_recipe_yaml(path: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A recipe file's YAML with ``key=value`` overrides applied: dotted keys walk sections, a number indexes a
    list (``tasks.1.max_train_examples=400``), values are parsed as YAML (``3``, ``1e-3``, ``[q, v]``)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping (name: ..., task: ..., ...), got {type(data).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-3)")
        node: Any = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[_list_index(node, part, item)] if isinstance(node, list) else node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        if isinstance(node, list):
            node[_list_index(node, leaf, item)] = yaml.safe_load(value)
        elif isinstance(node, dict):
            node[leaf] = yaml.safe_load(value)
        else:
            raise ConfigError(f"override {item!r}: {leaf!r} is not in a section")
    return data


def _list_index(node: list, part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {item!r}: the list has no entry {part}")
    return int(part)


def build_section(cls: type, values: Any, where: str, source: str) -> Any:
    """Dataclass ``cls`` from a recipe section: unknown keys refused with the known ones listed, values coerced
    to the fields' types (`_coerce`)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{source}: unknown {where} key(s) {sorted(unknown)}; known: {sorted(fields)}")
    return cls(**{k: _coerce(f"{where}.{k}", fields[k], v, source) for k, v in values.items()})


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    data = dict(data)
    train_args = build_section(TrainArgs, data.pop("train", None) or {}, "train", source)
    eval_args = build_section(EvalArgs, data.pop("eval", None) or {}, "eval", source)
    missing = [k for k in ("name", "task", "model", "data") if k not in data]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {missing}")
    recipe = build_section(Recipe, {**data, "train": train_args, "eval": eval_args}, "top-level", source)
    if recipe.task not in _TASK_TYPES:
        raise ConfigError(f"{source}: task must be one of {list(_TASK_TYPES)}, got {recipe.task!r}")
    if recipe.method not in ("lora", "full"):
        raise ConfigError(f"{source}: method must be 'lora' or 'full', got {recipe.method!r}")
    if recipe.quantize not in (None, "int8", "nf4"):
        raise ConfigError(f"{source}: quantize must be int8 or nf4, got {recipe.quantize!r}")
    if recipe.method == "full" and recipe.quantize:
        raise ConfigError(f"{source}: a quantized base is frozen; quantize needs method=lora")
    if recipe.train.precision not in ("fp32", "bf16"):
        raise ConfigError(f"{source}: train.precision must be fp32 or bf16, got {recipe.train.precision!r}")
    if recipe.train.schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"{source}: train.schedule must be cosine, linear or constant")
    if recipe.method == "lora":
        recipe.lora_config()  # validate early
    return recipe


def _coerce(key: str, spec: dataclasses.Field, value: Any, source: str) -> Any:
    """YAML reads ``1e-3`` as a string (1.1 wants ``1.0e-3``); numbers in numeric fields are converted."""
    kind = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", "")
    numeric = next((t for t in ("float", "int") if kind.startswith(t)), None)
    if numeric is None or not isinstance(value, str):
        return value
    try:
        return float(value) if numeric == "float" else int(value)
    except ValueError:
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}") from None


# -- the loop ------------------------------------------------------------------------------------------------
@dataclass
class LoopState:
    """Where training is: enough to resume exactly."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    examples_seen: int = 0
    best_metric: float | None = None
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def train(recipe: Recipe, output_dir: str | Path, resume: bool = False,
          on_step: Callable[[LoopState, float], None] | None = None) -> dict[str, Any]:
    """Train ``recipe`` into ``output_dir`` (``adapter/`` or ``model/``, ``metrics.json``); returns the metrics."""
    from .data import load_dataset
    from .models import load_model

    args = recipe.train
    world = distributed.setup(args.device)
    out = Path(output_dir)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    _seed_everything(args.seed)
    started = time.perf_counter()

    splits = load_dataset(recipe.data, seed=args.seed)
    train_rows = splits.train if args.max_train_examples is None else splits.train.take(args.max_train_examples)
    val_rows, test_rows = _cap(splits.validation, recipe.eval.max_examples), _cap(splits.test, recipe.eval.max_examples)
    num_labels = len(splits.train.labels) if recipe.task != "causal-lm" and splits.train.labels else None
    loaded = load_model(recipe.model, task=recipe.task, num_labels=num_labels, seed=args.seed)
    model, tokenizer = loaded.model.to(world.device), loaded.tokenizer
    quantized_bytes = None
    if recipe.quantize:
        from .quant import quantize_model, weight_bytes

        quantize_model(model, recipe.quantize, skip=recipe.lora.get("modules_to_save") or ())
        quantized_bytes = weight_bytes(model)
    eval_kwargs = dict(tokenizer=tokenizer, batch_size=recipe.eval.batch_size, max_length=args.max_length,
                       image_size=recipe.image_size, max_new_tokens=recipe.eval.max_new_tokens, device=world.device)
    base_eval = evaluate(model, recipe.task, test_rows, generate_examples=recipe.eval.generate_examples,
                         **eval_kwargs)
    _log(world, f"[{recipe.name}] before training: {_fmt(base_eval)}")

    if args.model_dropout is not None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = args.model_dropout
    save_extras: dict[str, Any] = {}
    if recipe.method == "lora":
        from .inject import inject
        from .io import adapter_state_dict, base_fingerprint

        config = recipe.lora_config(loaded.path or loaded.name)
        if config.init == "pissa":  # the base becomes a residual: fingerprint the original, keep A0/B0 for export
            save_extras["fingerprint"] = base_fingerprint(model, config, tokenizer)
        inject(model, config)
        if config.init == "pissa":
            save_extras["pissa_initial"] = adapter_state_dict(model)
    else:
        model.requires_grad_(True)
    if args.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    if recipe.quantize:  # quantized weights are buffers now; count them as the parameters they replace
        from .quant import QuantizedLinear

        n_total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))

    steps_per_epoch, total_steps = run_steps(len(train_rows), args)
    optimizer = _optimizer(model, args)
    scheduler = _scheduler(optimizer, args, total_steps)
    state = LoopState()
    ckpt = out / "checkpoint.pt"
    if resume:
        state = _load_checkpoint(ckpt, model, optimizer, scheduler, recipe)
        _log(world, f"[{recipe.name}] resumed at step {state.global_step} (epoch {state.epoch})")
    train_model: nn.Module = model
    if world.distributed:
        train_model = nn.parallel.DistributedDataParallel(model)

    lengths = _row_lengths(recipe.task, train_rows, tokenizer) if args.group_by_length else None
    best_state: dict[str, torch.Tensor] | None = None
    rng_at_step = _rng_state()  # RNG at the last step boundary: what a checkpoint of `state` must hold
    progress = _progress(world, args, total_steps, state.global_step, recipe.name)
    tick, tick_examples = time.perf_counter(), 0
    model.train()
    stop = _DeferredInterrupt()
    try:
        while state.global_step < total_steps:
            order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(args.seed + state.epoch))
            if lengths is not None:
                order = _group_by_length(order, lengths, chunk=50 * args.batch_size)
            while state.step_in_epoch < steps_per_epoch and state.global_step < total_steps:
                first = state.step_in_epoch * args.grad_accum
                micro = [order[(first + i) * args.batch_size:(first + i + 1) * args.batch_size]
                         for i in range(args.grad_accum)]
                loss = _step(train_model, recipe, world, train_rows, micro, tokenizer, optimizer, scheduler, model)
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss} at step {state.global_step + 1} (epoch {state.epoch}); training stopped "
                        f"and the last good checkpoint ({ckpt if ckpt.exists() else 'none yet'}) is intact. "
                        "Lower train.lr, keep train.max_grad_norm set, or check the data")
                state.step_in_epoch += 1
                state.global_step += 1
                state.examples_seen += args.batch_size * args.grad_accum
                tick_examples += args.batch_size * args.grad_accum
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss:.4f}",
                                         ex_s=f"{tick_examples / max(1e-9, time.perf_counter() - tick):.1f}")
                state.history.append({"step": state.global_step, "loss": loss, "lr": scheduler.get_last_lr()[0]})
                rng_at_step = _rng_state()
                if args.checkpoint_every and state.global_step % args.checkpoint_every == 0:
                    _save_checkpoint(ckpt, world, model, optimizer, scheduler, state, recipe, rng_at_step)
                if on_step is not None:
                    on_step(state, loss)
                stop.check()
            if state.step_in_epoch >= steps_per_epoch:  # epoch finished: validate, maybe stop early
                val = evaluate(model, recipe.task, val_rows, **eval_kwargs)
                state.history.append({"epoch": state.epoch, "step": state.global_step, "validation": val})
                _log(world, f"[{recipe.name}] epoch {state.epoch} validation: {_fmt(val)}")
                metric = val.get("accuracy", -val["loss"])
                if state.best_metric is None or metric > state.best_metric:
                    state.best_metric, state.bad_epochs = metric, 0
                    best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                else:
                    state.bad_epochs += 1
                state.epoch += 1
                state.step_in_epoch = 0
                model.train()
                if args.early_stopping_patience is not None and state.bad_epochs > args.early_stopping_patience:
                    _log(world, f"[{recipe.name}] early stop: no validation gain for {state.bad_epochs} epochs")
                    break
    except KeyboardInterrupt:
        _save_checkpoint(ckpt, world, model, optimizer, scheduler, state, recipe, rng_at_step)
        _log(world, f"[{recipe.name}] interrupted: checkpoint saved at step {state.global_step}; "
                    f"continue with --resume")
        raise
    finally:
        stop.restore()
        if progress is not None:
            progress.close()
    if best_state is not None and args.early_stopping_patience is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in best_state:
                    param.copy_(best_state[name])
    _save_checkpoint(ckpt, world, model, optimizer, scheduler, state, recipe, _rng_state())
    train_time = time.perf_counter() - started

    final_eval = evaluate(model, recipe.task, test_rows, generate_examples=recipe.eval.generate_examples,
                          **eval_kwargs)
    train_eval = evaluate(model, recipe.task, _cap(train_rows, len(test_rows)), **eval_kwargs)
    _log(world, f"[{recipe.name}] after training: {_fmt(final_eval)}")
    metrics = {
        "recipe": recipe.name, "task": recipe.task, "model": recipe.model, "data": recipe.data,
        "method": recipe.method, "trainable_params": n_trainable, "total_params": n_total,
        "trainable_fraction": n_trainable / n_total, "base_eval": base_eval, "eval": final_eval,
        "train_eval": train_eval, "train_time_s": train_time, "steps": state.global_step,
        "examples_seen": state.examples_seen, "peak_memory_mb": _peak_memory_mb(world),
        "world_size": world.size, "history": state.history, "trainable_tensors": len(trainable_names),
    }
    if quantized_bytes is not None:
        metrics["quantized_weight_bytes"], metrics["quantized_weight_fp32_bytes"] = quantized_bytes
    if world.is_main:
        metrics["adapter_bytes"] = _save_result(model, loaded, recipe, out, metrics, splits.train, save_extras)
        if recipe.quantize and recipe.method == "lora":  # after saving: this leaves the model merged
            metrics["quantized_merge"] = quantized_merge_check(model, recipe.task, test_rows, eval_kwargs)
            _log(world, f"[{recipe.name}] merged into the {recipe.quantize} base: "
                        f"{_fmt(metrics['quantized_merge']['eval'])}; re-quantization drift "
                        f"{metrics['quantized_merge']['mean_relative']:.2e} (mean relative)")
        _write_json(out / "metrics.json", metrics)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
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


def _step(train_model: nn.Module, recipe: Recipe, world: distributed.World, rows: Any, micro: list[torch.Tensor],
          tokenizer: Any, optimizer: torch.optim.Optimizer, scheduler: Any, model: nn.Module) -> float:
    """One optimizer step over ``grad_accum`` micro-batches of global rows; this process takes every
    ``world.size``-th row. Losses are summed and divided by the global count, so 1 and N processes agree."""
    args = recipe.train
    batches = []
    local_count = 0
    for indices in micro:
        mine = indices[world.rank::world.size].tolist()
        batch = to_device(encode(recipe.task, [rows[i] for i in mine], tokenizer, args.max_length, recipe.image_size),
                          world.device)
        labels = batch["labels"]
        local_count += int((labels[:, 1:] != -100).sum()) if recipe.task == "causal-lm" else int(labels.numel())
        batches.append(batch)
    global_count = float(distributed.all_reduce_sum(torch.tensor(float(local_count)), world))
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1 or not world.distributed
        context = train_model.no_sync() if not sync else contextlib.nullcontext()
        with context:
            with _autocast(args.precision, world.device):
                logits = forward(train_model, recipe.task, batch)
            part, _ = loss_sum(recipe.task, logits, batch["labels"])  # in fp32
            # DDP averages gradients over processes; scale so the result is the global mean
            (part * (world.size / global_count)).backward()
        total += part.detach().double().cpu()
    loss = float(distributed.all_reduce_sum(total, world)) / global_count
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return loss
    if args.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
    optimizer.step()
    scheduler.step()
    return loss


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on the run's device type (cuda or cpu), or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class _DeferredInterrupt:
    """The first Ctrl-C is handled at the next step boundary (a checkpoint then needs no half-done step);
    a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None
        if _main_thread():
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


def _row_lengths(task: str, rows: Any, tokenizer: Any) -> torch.Tensor | None:
    """Token count per row (text tasks), to group rows of similar length; None for images."""
    if task == "sequence-classification":
        texts = [row["text"] for row in rows]
    elif task == "causal-lm":
        texts = [row.get("prompt", "") + row.get("completion", "") if "messages" not in row
                 else " ".join(m["content"] for m in row["messages"]) for row in rows]
    else:
        return None
    return torch.tensor([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])


def _group_by_length(order: torch.Tensor, lengths: torch.Tensor, chunk: int) -> torch.Tensor:
    """Within each chunk of the shuffled order, sort rows by length (longest first): batches then hold rows
    of similar length while the epoch still visits every row once, in an order fixed by the seed."""
    parts = []
    for part in order.split(chunk):
        parts.append(part[torch.argsort(lengths[part], descending=True, stable=True)])
    return torch.cat(parts)


def _optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW; with LoRA+ the B matrices get ``lora_plus_ratio`` x the learning rate. No decay on 1-D tensors."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = args.lr * (args.lora_plus_ratio if ("lora_B" in name or "lora_embedding_B" in name) else 1.0)
        decay = args.weight_decay if param.ndim > 1 else 0.0
        groups.setdefault((lr, decay), []).append(param)
    return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
                             lr=args.lr)


def run_steps(n_rows: int, args: TrainArgs) -> tuple[int, int]:
    """``(optimizer steps per epoch, optimizer steps of the run)`` for ``n_rows`` training rows."""
    steps_per_epoch = n_rows // args.batch_size // args.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"{n_rows} training rows are fewer than one step needs "
                          f"(batch_size {args.batch_size} x grad_accum {args.grad_accum}); lower them")
    total_steps = math.ceil(args.epochs * steps_per_epoch)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    return steps_per_epoch, total_steps


def _scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs, total_steps: int) -> Any:
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


# -- checkpoints -----------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, world: distributed.World, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any, state: LoopState, recipe: Recipe, rng: dict[str, Any]) -> None:
    if not world.is_main:
        return
    payload = {
        "format": 1,
        "recipe": recipe.to_dict(),
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loop": dataclasses.asdict(state),
        "rng": rng,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Ctrl-C while writing must not leave a half file: ignore SIGINT for the few ms of the write + rename
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        tmp.unlink(missing_ok=True)


def _load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     recipe: Recipe) -> LoopState:
    if not path.is_file():
        raise TrainingError(f"--resume: no checkpoint at {path}; start without --resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise TrainingError(f"--resume: checkpoint {path} is unreadable ({type(err).__name__}: {err})") from None
    params = dict(model.named_parameters())
    if set(payload["trainable"]) != {n for n, p in params.items() if p.requires_grad}:
        raise TrainingError(f"--resume: checkpoint {path} was written for another recipe/model "
                            f"(recipe {payload['recipe'].get('name')!r}); use a new --output")
    with torch.no_grad():
        for name, tensor in payload["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    _set_rng_state(payload["rng"])
    return LoopState(**payload["loop"])


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# -- results -----------------------------------------------------------------------------------------------
def _save_result(model: nn.Module, loaded: Any, recipe: Recipe, out: Path, metrics: dict[str, Any],
                 train_data: Any, extras: dict[str, Any]) -> int:
    """Write ``adapter/`` (LoRA, PEFT format with provenance) or ``model/`` (full); return its size in bytes."""
    if recipe.method == "lora":
        from .io import save_adapter

        target = out / "adapter"
        provenance = {"recipe": recipe.to_dict(), "dataset": recipe.data, "dataset_hash": train_data.fingerprint(),
                      "steps": metrics["steps"], "eval": metrics["eval"]}
        save_adapter(model, target, provenance=provenance, tokenizer=loaded.tokenizer, **extras)
    else:
        target = out / "model"
        tmp = out / ".model.tmp"
        _save_full(model, tmp)
        if target.exists():
            import shutil

            shutil.rmtree(target)
        os.replace(tmp, target)
    return sum(f.stat().st_size for f in target.rglob("*") if f.is_file())


def _save_full(model: nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder, safe_serialization=True)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def _peak_memory_mb(world: distributed.World) -> float:
    if world.device.type == "cuda":
        return torch.cuda.max_memory_allocated(world.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _cap(rows: Any, limit: int | None) -> Any:
    return rows if limit is None or len(rows) <= limit else rows.take(limit)


def _progress(world: distributed.World, args: TrainArgs, total: int, done: int, name: str) -> Any:
    if not (args.progress and world.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=name, unit="step", file=sys.stderr, dynamic_ncols=True)


def _log(world: distributed.World, message: str) -> None:
    if world.is_main:
        print(message, flush=True)


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


# -- command line --------------------------------------------------------------------------------------------
def _train_args(p: Any) -> None:
    p.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE,
                   help=f"recipe name under recipes/ or a YAML file (default: {DEFAULT_RECIPE})")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-3 lora.r=16 method=full")
    p.add_argument("--output", "-o", default=None, help="output folder (default: runs/RECIPE)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")


def _split_recipe_and_overrides(args: Any) -> tuple[str, list[str]]:
    # `lorakit train train.lr=1e-3` has no recipe: the first positional is an override
    if "=" in args.recipe:
        return DEFAULT_RECIPE, [args.recipe, *args.overrides]
    return args.recipe, list(args.overrides)


def _train_cli(args: Any) -> int:
    """Train a recipe (default: sentiment-minilm) and write the adapter and metrics.json."""
    name, overrides = _split_recipe_and_overrides(args)
    recipe = load_recipe(name, overrides)
    output = Path(args.output or Path("runs") / recipe.name)
    world = distributed.setup(recipe.train.device)
    try:
        metrics = train(recipe, output, resume=args.resume)
    except KeyboardInterrupt:
        return 130
    finally:
        distributed.teardown(world)
    if world.is_main:
        _print_summary(metrics, output)
    return 0


def _print_summary(metrics: dict[str, Any], output: Path) -> None:
    main_metric = "accuracy" if "accuracy" in metrics["eval"] else "loss"
    print(f"\n{metrics['recipe']}: {metrics['method']} on {metrics['model']} / {metrics['data']}")
    print(f"  held-out {main_metric}: {metrics['base_eval'][main_metric]:.4f} before -> "
          f"{metrics['eval'][main_metric]:.4f} after")
    for extra in ("perplexity", "chrf"):
        if extra in metrics["eval"]:
            print(f"  held-out {extra}: {metrics['base_eval'].get(extra, float('nan')):.2f} before -> "
                  f"{metrics['eval'][extra]:.2f} after")
    print(f"  trained {metrics['trainable_params']:,} of {metrics['total_params']:,} parameters "
          f"({100 * metrics['trainable_fraction']:.3f}%) in {metrics['train_time_s']:.1f} s, "
          f"peak memory {metrics['peak_memory_mb']:.0f} MB")
    print(f"  saved {metrics['adapter_bytes'] / 1e6:.2f} MB to {output} (metrics.json)")


def _eval_args(p: Any) -> None:
    p.add_argument("run", help="a training output folder (holds recipe.yaml and adapter/ or model/)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--max-examples", type=int, default=None)


def load_run(run: str | Path) -> tuple[Recipe, Any]:
    """Rebuild a trained model from a training output folder: (recipe, LoadedModel with weights applied)."""
    from .models import load_model

    folder = Path(run)
    if not (folder / "recipe.yaml").is_file():
        raise ConfigError(f"{folder} is not a training output folder (no recipe.yaml); run `lorakit train` first")
    recipe = recipe_from_dict(yaml.safe_load((folder / "recipe.yaml").read_text()), source=str(folder))
    from .data import load_dataset

    labels = None
    if recipe.task != "causal-lm":
        labels = load_dataset(recipe.data, seed=recipe.train.seed).train.labels
    loaded = load_model(recipe.model, task=recipe.task, num_labels=len(labels) if labels else None,
                        seed=recipe.train.seed)
    if recipe.quantize:
        from .quant import quantize_model

        quantize_model(loaded.model, recipe.quantize, skip=recipe.lora.get("modules_to_save") or ())
    if recipe.method == "lora":
        from .io import load_adapter

        load_adapter(loaded.model, folder / "adapter")
    else:
        from safetensors.torch import load_file

        state = {}
        for f in sorted((folder / "model").glob("*.safetensors")):
            state.update(load_file(f))
        loaded.model.load_state_dict(state, strict=False)
    loaded.model.eval()
    return recipe, loaded


def _eval_cli(args: Any) -> int:
    """Evaluate a trained run on a held-out split."""
    from .data import load_dataset

    recipe, loaded = load_run(args.run)
    splits = load_dataset(recipe.data, seed=recipe.train.seed)
    rows = _cap(getattr(splits, args.split), args.max_examples)
    metrics = evaluate(loaded.model, recipe.task, rows, loaded.tokenizer, batch_size=recipe.eval.batch_size,
                       max_length=recipe.train.max_length, image_size=recipe.image_size,
                       generate_examples=recipe.eval.generate_examples, max_new_tokens=recipe.eval.max_new_tokens)
    print(json.dumps(metrics, indent=2))
    return 0


def _predict_args(p: Any) -> None:
    p.add_argument("run", help="a training output folder of a classification recipe")
    p.add_argument("texts", nargs="+", help="texts to classify")


def _predict_cli(args: Any) -> int:
    """Classify texts with a trained run: label and probability per text."""
    from .data import load_dataset

    recipe, loaded = load_run(args.run)
    if recipe.task != "sequence-classification":
        raise ConfigError(f"predict classifies text; run {args.run} is a {recipe.task} run")
    labels = load_dataset(recipe.data, seed=recipe.train.seed).train.labels
    rows = [{"text": t, "label": 0} for t in args.texts]
    batch = encode(recipe.task, rows, loaded.tokenizer, recipe.train.max_length, None)
    with torch.no_grad():
        probs = forward(loaded.model, recipe.task, batch).softmax(-1)
    for text, p in zip(args.texts, probs):
        k = int(p.argmax())
        print(f"{labels[k]}\t{float(p[k]):.3f}\t{text}")
    return 0


def _generate_args(p: Any) -> None:
    p.add_argument("prompt", nargs="+", help="user message(s)")
    p.add_argument("--base", default="smollm2", help="causal LM (packaged name or folder)")
    p.add_argument("--adapter", action="append", default=[],
                   help="adapter folder (repeat to combine several: their updates are summed)")
    p.add_argument("--max-new-tokens", type=int, default=128)


def _generate_cli(args: Any) -> int:
    """Greedy text generation from a base causal LM with zero, one or more adapters, streamed."""
    from transformers import TextStreamer

    from .adapters import set_adapter
    from .evaluate import generate
    from .io import load_adapter
    from .models import load_model

    loaded = load_model(args.base, task="causal-lm")
    names = [load_adapter(loaded.model, path, adapter_name=f"a{i}") for i, path in enumerate(args.adapter)]
    if names:
        set_adapter(loaded.model, names)
    loaded.model.eval()
    for prompt in args.prompt:
        streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        generate(loaded.model, loaded.tokenizer, [prompt], args.max_new_tokens, streamer=streamer)
    return 0


def _register() -> None:
    from .cli import command

    command("train", _train_args)(_train_cli)
    command("eval", _eval_args)(_eval_cli)
    command("predict", _predict_args)(_predict_cli)
    command("generate", _generate_args)(_generate_cli)


_register()
