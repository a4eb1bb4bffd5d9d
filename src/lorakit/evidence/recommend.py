"""`recommend`: a LoRA rank and learning rate from two cheap measurements on the base model, with the evidence.

Rank: the gradient of every targeted weight, summed over a few training batches at the base model (what a short
full fine-tuning with SGD would add to W), is decomposed per layer; each layer needs as many singular directions
as hold ``energy`` of its squared singular values; the suggestion is the power of two at or above the median
layer (`suggest_rank`). Learning rate: a range test on LoRA at that rank (`suggest_lr`, Smith 2017). Optionally
a race of two ranks trained at the recipe's budget, and a check against a `sweep`'s best run.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..files import write_json
from ..tasks import Metric, primary_metric
from .claims import TOLERANCE, verdict
from .ranks import FixedScale, race_arms, rank_limits, rank_overrides, recipe_from
from .reports import write_recommend_report
from .runs import Log, RunSpec, launch, machine

#: the fewest batches the rank probe and the fewest steps the range test take, whatever the recipe's length
MIN_GRAD_BATCHES, MIN_LR_STEPS = 8, 12


def next_power_of_two(x: float) -> int:
    return 1 if x <= 1 else 2 ** math.ceil(math.log2(x))


def suggest_rank(layer_ranks: Sequence[int], max_rank: int = 64) -> int:
    """The smallest power of two at or above the median per-layer rank, within [1, max_rank]."""
    return max(1, min(max_rank, next_power_of_two(statistics.median(layer_ranks))))


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], beta: float = 0.8, divisor: float = 3.0
               ) -> tuple[float, list[float]]:
    """LR range test (Smith 2017, "Cyclical Learning Rates", §3.3): smooth the losses (bias-corrected EMA),
    take the learning rate where the smoothed loss is lowest as the upper bound, and suggest a third of it
    (Smith: the lower bound 1/3 to 1/4 of the upper). Returns ``(lr, smoothed losses)``."""
    smoothed, avg = [], 0.0
    for k, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        smoothed.append(avg / (1 - beta ** (k + 1)))
    finite = [(s, lr) for s, lr in zip(smoothed, lrs) if math.isfinite(s)]
    best = min(finite)[1] if finite else lrs[0]
    return best / divisor, smoothed


# -- the two measurements --------------------------------------------------------------------------------------
@dataclass
class BaseProbe:
    """The recipe's base model and one seeded order of its training rows, which both measurements draw from."""

    recipe: Any
    loaded: Any  # lorakit.models.LoadedModel
    rows: Any  # the training rows (capped at train.max_train_examples)
    order: torch.Tensor  # (len(rows),) a permutation
    device: torch.device  # train.device, as training resolves it

    @classmethod
    def load(cls, recipe: Any) -> "BaseProbe":
        from .. import distributed
        from ..recipes import load_recipe_data, load_recipe_model

        args = recipe.train
        device = distributed.setup(args.device).device
        splits = load_recipe_data(recipe)
        rows = splits.train if args.max_train_examples is None else splits.train.take(args.max_train_examples)
        loaded = load_recipe_model(recipe, labels=splits.train.labels, device=device)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed))
        return cls(recipe, loaded, rows, order, device)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def run_length(self) -> int:
        """Optimizer steps of one training run of the recipe: neither measurement takes more."""
        from ..train import run_steps

        return run_steps(len(self.rows), self.recipe.train)[1]

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        """The ``k``-th training batch (wrapping around), encoded for the model, on its device."""
        from ..evaluate import encode, to_device

        size = self.recipe.train.batch_size
        start = (k * size) % max(1, len(self.rows) - size + 1)
        picked = [self.rows[int(i)] for i in self.order[start:start + size]]
        return to_device(encode(self.recipe.task, picked, self.loaded.tokenizer, self.recipe.train.max_length,
                                self.recipe.image_size), self.device)

    def loss(self, k: int) -> torch.Tensor:
        """Mean loss of batch ``k`` (over its rows or answer tokens), differentiable."""
        from ..evaluate import forward, loss_sum

        b = self.batch(k)
        total, count = loss_sum(self.recipe.task, forward(self.model, self.recipe.task, b), b["labels"])
        return total / max(1, count)


def probed_weights(model: nn.Module, rows: Sequence[Any]) -> dict[str, nn.Parameter]:
    """The base weights whose gradients `gradient_ranks` reads, one or more per targeted row: a targeted
    module's weight matrices (``weight`` of a Linear/conv/Embedding; the in-projection and ``out_proj.weight``
    of an ``nn.MultiheadAttention``), or the targeted parameter itself for a ``target_parameters`` row."""
    weights: dict[str, nn.Parameter] = {}
    for row in rows:
        if row.parameter:
            weights[row.name] = model.get_parameter(row.name)
            continue
        matrices = {key: p for key, p in model.get_submodule(row.name).named_parameters() if p.dim() >= 2}
        if len(matrices) == 1:  # a Linear, conv or Embedding: named after the module, as the targets are
            weights[row.name] = next(iter(matrices.values()))
        else:
            weights.update({f"{row.name}.{key}": p for key, p in matrices.items()})
    return weights


def gradient_ranks(probe: BaseProbe, batches: int, energy: float) -> list[dict[str, Any]]:
    """Per targeted weight: the number of singular directions of the gradient, summed over ``batches`` batches,
    that hold ``energy`` of its squared singular values (3-D expert weights: the largest over the experts).
    The gradients are those training would see (`lorakit.train.train_mode`: frozen norms keep their
    statistics); weights, modes and ``requires_grad`` are left as they were."""
    from ..analyze import energy_rank, singular_values
    from ..inject import targeting_report
    from ..train import train_mode

    model = probe.model
    config = probe.recipe.lora_config(probe.loaded.path or probe.loaded.name)
    weights = probed_weights(model, targeting_report(model, config).targeted)
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    train_mode(model)
    model.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    layers = []
    try:
        for k in range(batches):
            probe.loss(k).backward()  # .grad sums over the batches
        for name, w in weights.items():
            grads = list(w.grad) if w.grad.dim() == 3 else [w.grad]  # experts (E, in, out): one matrix each
            sigmas = [singular_values(g) for g in grads]
            ranks = [energy_rank(sigma, energy) for sigma in sigmas]
            top = max(range(len(ranks)), key=ranks.__getitem__)
            layers.append({"name": name, "shape": list(w.shape), "energy_rank": ranks[top],
                           "sigma_top": sigmas[top][:8].tolist()})
    finally:
        for w in weights.values():
            w.grad = None
        for module, training in modes.items():
            module.train(training)
        for param, flag in flags.items():
            param.requires_grad_(flag)
    return layers


def lr_range_test(probe: BaseProbe, lora_recipe: Any, steps: int, lr_min: float, lr_max: float,
                  first_batch: int) -> tuple[list[float], list[float]]:
    """Inject LoRA as ``lora_recipe`` sets it and take ``steps`` training steps (`lorakit.train.train_step`, the
    one step training takes: the recipe's optimizer, micro-batches, precision and clipping; frozen norms keep
    the base's statistics) with the learning rate growing geometrically from ``lr_min`` to ``lr_max``, on
    batches from ``first_batch`` on; stops when the loss diverges. Returns ``(lrs, losses)``, one per step."""
    from ..distributed import World
    from ..inject import inject
    from ..train import MicroBatch, StepSettings, build_optimizer, train_mode, train_step

    model, args = probe.model, lora_recipe.train
    inject(model, lora_recipe.lora_config(probe.loaded.path or probe.loaded.name))
    train_mode(model)
    optimizer = build_optimizer(model, args)
    settings = StepSettings.from_args(lora_recipe.task, args, World(device=probe.device))
    lrs: list[float] = []
    losses: list[float] = []
    for k in range(steps):
        lr = lr_min * (lr_max / lr_min) ** (k / max(1, steps - 1))
        first = first_batch + k * args.grad_accum  # rows the rank probe did not see first
        micro = [MicroBatch(probe.batch(first + j)) for j in range(args.grad_accum)]
        result = train_step(model, micro, optimizer, None, settings, lr=lr)
        lrs.append(lr)
        losses.append(result.loss)
        if not result.finite or (k > 5 and result.loss > 4 * min(losses)):
            break  # diverged: the range above this is useless
    return lrs, losses


# -- the race and the check -------------------------------------------------------------------------------------
def run_race(recipe_name: str, overrides: Sequence[str], rank: int, lr: float, scale: FixedScale,
             limits: dict[str, int], max_rank: int, metric: Metric, out: Path, log: Log,
             isolate: bool) -> list[dict[str, Any]]:
    """Train each of `race_arms` at the budget ``overrides`` set (each in its own process); returns the arms
    with their validation and held-out metric, the better validation first."""
    arms: list[dict[str, Any]] = []
    for arm_rank, arm_lr in race_arms(rank, lr, max_rank):
        extra = ["method=lora", *rank_overrides(arm_rank, scale, limits), f"train.lr={arm_lr:.3g}",
                 "train.progress=false"]
        folder = out / f"race-r{arm_rank}"
        record = launch(RunSpec(recipe_name, [*overrides, *extra], folder), log, isolate=isolate)
        validation = [h["validation"] for h in record["metrics"]["history"] if "validation" in h]
        if not validation or metric.name not in validation[-1]:
            raise ConfigError(f"--race picks by the validation {metric.name}, but run {folder} validated nothing: "
                              "validation runs at the end of each epoch (fix: let the runs finish an epoch, e.g. "
                              "no train.max_steps, or run recommend without --race)")
        arms.append({"rank": arm_rank, "lr": arm_lr, "validation": validation[-1][metric.name],
                     "held_out": record["metrics"]["eval"][metric.name], "cpu_time_s": record["cpu_time_s"],
                     "train_time_s": record["metrics"]["train_time_s"], "run": str(folder), "record": record})
    chosen = arms[0]
    for arm in arms[1:]:
        if metric.better(arm["validation"], chosen["validation"]):
            chosen = arm
    log("  race: " + ", ".join(f"r={a['rank']} lr={a['lr']:.3g} validation {metric.name} {a['validation']:.4f}"
                               for a in arms) + f" -> r={chosen['rank']}")
    return [chosen] + [a for a in arms if a is not chosen]


def check_against_sweep(recipe_name: str, rank: int, lr: float, scale: FixedScale, limits: dict[str, int],
                        recommend_time: float, recommend_cpu: float, sweep_dir: Path, out: Path, log: Log,
                        isolate: bool = True, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the suggestion at the sweep's budget (or take ``record``, a run of it already trained there, as the
    race's); is it within `TOLERANCE` of the sweep's best run? The cost fraction compares CPU times on a CPU
    machine (shared cores make wall times noisy), wall times on a GPU."""
    result = json.loads((sweep_dir / "sweep.json").read_text())
    metric = Metric(**result["metric"])
    if record is None:
        extra = ["method=lora", *rank_overrides(rank, scale, limits), f"train.lr={lr:.3g}", "train.progress=false"]
        record = launch(RunSpec(recipe_name, [*result["overrides"], *extra], out / "check"), log, isolate=isolate)
    value = record["metrics"]["eval"][metric.name]
    best = result["best"]
    gap = metric.worse_by(value, best["held_out"])
    return {"held_out": value, "sweep_best": best, "gap": gap, "within_tolerance": gap <= TOLERANCE,
            "verdict": verdict(gap <= TOLERANCE), "sweep_runs_time_s": result["runs_time_s"],
            "check_train_time_s": record["metrics"]["train_time_s"], "sweep_runs_cpu_s": result["runs_cpu_s"],
            "cost_fraction": (recommend_time / result["runs_time_s"] if result["machine"].get("cuda")
                              else recommend_cpu / result["runs_cpu_s"]),
            "rule": f"holds if the suggestion's held-out {metric.name} is within {TOLERANCE} of the sweep's best"}


# -- the command ----------------------------------------------------------------------------------------------
def check_settings(recipe: Any, grad_batches: int, energy: float, lr_steps: int, lr_min: float, lr_max: float,
                   max_rank: int, sweep_dir: str | Path | None) -> None:
    """Everything `recommend` is given, checked before a model or dataset loads (`ConfigError` with the fix)."""
    from ..recipes import check_runtime

    if recipe.method != "lora":
        raise ConfigError(f"recommend suggests LoRA settings; recipe {recipe.name} has method={recipe.method}")
    if recipe.quantize:  # the rank probe differentiates the base weights, which a quantized base does not have
        raise ConfigError(f"recommend measures gradients of the full-precision base weights; recipe {recipe.name} "
                          f"has quantize={recipe.quantize} (fix: run recommend with quantize=null and use its "
                          "suggestion with the quantized recipe)")
    if grad_batches < 1 or lr_steps < 2 or max_rank < 1:
        raise ConfigError(f"recommend needs --grad-batches >= 1, --lr-steps >= 2 and --max-rank >= 1; got "
                          f"{grad_batches}, {lr_steps}, {max_rank}")
    if not 0 < energy <= 1:
        raise ConfigError(f"--energy is a share of the gradient energy, in (0, 1]; got {energy} (fix: e.g. 0.9)")
    if not 0 < lr_min < lr_max:
        raise ConfigError(f"the range test needs 0 < lr_min < lr_max; got {lr_min:g} and {lr_max:g}")
    if sweep_dir is not None and not (Path(sweep_dir) / "sweep.json").is_file():
        raise ConfigError(f"--sweep {sweep_dir}: no sweep.json there (fix: the output folder of `lorakit sweep`)")
    check_runtime(recipe)


def recommend(recipe_name: str, overrides: Sequence[str] = (), output: str | Path | None = None,
              grad_batches: int = 32, energy: float = 0.9, lr_steps: int = 40, lr_min: float = 1e-5,
              lr_max: float = 1e-1, max_rank: int = 64, sweep_dir: str | Path | None = None,
              isolate: bool = True, race: bool = False, log: Log = print) -> dict[str, Any]:
    """Suggest a LoRA rank (`gradient_ranks`, `suggest_rank`) and learning rate (`lr_range_test`, `suggest_lr`),
    and write ``recommend.json`` and the report. Each measurement takes at most as many steps as one training
    run of the recipe (at least `MIN_GRAD_BATCHES` batches for the rank, `MIN_LR_STEPS` steps for the rate).

    With ``race``, the suggestion and a wider arm (`race_arms`) are each trained at the recipe's budget (the
    sweep's, with ``sweep_dir``) and the one with the better validation metric is suggested: two training runs
    more, but the rank is then checked against the budget rather than read off a gradient at step 0. With
    ``sweep_dir`` (a `sweep` output), the suggestion is trained at the sweep's budget (with ``race``: the chosen
    arm's run is that training) and compared with the sweep's best run (`check_against_sweep`)."""
    from ..recipes import load_recipe
    from ..train import seed_everything

    recipe = load_recipe(recipe_name, list(overrides))
    check_settings(recipe, grad_batches, energy, lr_steps, lr_min, lr_max, max_rank, sweep_dir)
    out = Path(output or Path("runs") / f"recommend-{recipe.name}")
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    seed_everything(recipe.train.seed)  # the base model's dropout in both probes and LoRA's A init draw from it
    probe = BaseProbe.load(recipe)
    run_length = probe.run_length()
    grad_batches = min(grad_batches, max(run_length, MIN_GRAD_BATCHES))
    lr_steps = min(lr_steps, max(run_length, MIN_LR_STEPS))
    log(f"recommend {recipe.name}: gradients of the target weights over {grad_batches} batches")
    layers = gradient_ranks(probe, grad_batches, energy)
    rank = suggest_rank([x["energy_rank"] for x in layers], max_rank)
    rank_time = time.perf_counter() - started
    log(f"  {len(layers)} layers, per-layer ranks (median "
        f"{statistics.median([x['energy_rank'] for x in layers]):g}) -> r={rank} ({rank_time:.0f} s)")
    scale = FixedScale.of(recipe)
    limits = rank_limits(recipe, probe.model)
    lrs, losses = lr_range_test(probe, recipe_from(recipe, rank, scale, limits), lr_steps, lr_min, lr_max,
                                first_batch=grad_batches)
    lr, smoothed = suggest_lr(lrs, losses)
    log(f"  LR range test over {len(lrs)} steps -> lr={lr:.3g}")
    spectrum = {"rank": rank, "lr": lr}
    arms: list[dict[str, Any]] = []
    if race:
        del probe  # free memory: the arms train in their own processes
        budget = (json.loads((Path(sweep_dir) / "sweep.json").read_text())["overrides"] if sweep_dir is not None
                  else list(overrides))
        arms = run_race(recipe_name, budget, rank, lr, scale, limits, max_rank, primary_metric(recipe.task), out, log,
                        isolate)
        rank, lr = arms[0]["rank"], arms[0]["lr"]
    total_time = time.perf_counter() - started
    cpu_time = time.process_time() - cpu_started + sum(a["cpu_time_s"] for a in arms)  # the arms' own processes
    log(f"  recommend took {total_time:.0f} s")
    result: dict[str, Any] = {
        "recipe": recipe.name, "overrides": list(overrides), "rank": rank, "lr": lr, "alpha": scale.alpha(rank),
        "energy": energy, "grad_batches": grad_batches, "layers": layers, "rank_time_s": rank_time,
        "lr_range": {"lrs": lrs, "losses": losses, "smoothed": smoothed}, "time_s": total_time,
        "cpu_time_s": cpu_time, "recipe_defaults": {"r": recipe.lora.get("r"), "lr": recipe.train.lr},
        "machine": machine(), "spectrum_suggestion": spectrum,
        "race": sorted(({k: v for k, v in a.items() if k != "record"} for a in arms), key=lambda a: a["rank"]),
    }
    if sweep_dir is not None:
        result["check"] = check_against_sweep(recipe_name, rank, lr, scale, limits, total_time, cpu_time,
                                              Path(sweep_dir), out, log, isolate,
                                              record=arms[0]["record"] if arms else None)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "recommend.json", result)
    write_recommend_report(result, out)
    log(f"report: {out / 'report.md'}")
    return result
