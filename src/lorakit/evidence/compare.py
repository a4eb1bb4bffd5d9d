"""`compare`: full fine-tuning against LoRA on one recipe, at several data fractions, each run in its own process;
the numbers each seed claim is judged on (`summarize`) and the verdicts (`judge`), computed by the rule written
beside each claim. The report renders them (`lorakit.evidence.reports`) and never edits them."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from ..files import write_json
from ..tasks import Metric, primary_metric
from .claims import COST_MARGIN, TOLERANCE, ClaimRow, format_bytes, format_mb, verdict
from .probes import PROBES, probe_for
from .reports import write_compare_report
from .runs import Log, RunSpec, check_specs, launch, machine

#: full fine-tuning's default learning rate = LoRA's x this (LoRA usually wants ~10-20x larger steps)
FULL_LR_RATIO = 0.05
#: number of tasks the serving-cost claim is judged at
SERVE_TASKS = (1, 10, 100)


def training_budget(recipe: Any) -> int:
    """Training examples the recipe uses: ``train.max_train_examples`` or the whole train split."""
    if recipe.train.max_train_examples is not None:
        return int(recipe.train.max_train_examples)
    from ..recipes import load_recipe_data

    return len(load_recipe_data(recipe).train)


def check_fractions(fractions: Sequence[float]) -> None:
    """At least one data fraction, each in (0, 1] (`ConfigError` otherwise)."""
    if not fractions:
        raise ConfigError("compare needs at least one data fraction (fix: e.g. --data-fractions 0.25,1.0)")
    for f in fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"data fractions must be in (0, 1], got {f} (fix: e.g. --data-fractions 0.25,1.0)")


def fraction_sizes(budget: int, fractions: Sequence[float], rows_per_step: int) -> list[int]:
    """Training examples per data fraction; at least one optimizer step's worth."""
    check_fractions(fractions)
    return [max(rows_per_step, round(f * budget)) for f in fractions]


def compare(recipe_name: str, overrides: Sequence[str] = (), fractions: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
            output: str | Path | None = None, full_lr: float | None = None, lora_lr: float | None = None,
            keep_weights: bool = False, probe: bool = True, isolate: bool = True,
            log: Log = print) -> dict[str, Any]:
    """Full fine-tuning vs LoRA on one recipe: same data, seed and epochs, each method with its own learning
    rate, at every data fraction. Writes ``comparison.json`` and the report; returns the comparison.

    ``probe=False`` skips the knowledge probe; ``isolate=False`` trains in this process (quick checks only:
    peak memory is then shared by every run)."""
    from ..recipes import check_runtime, load_recipe

    base = load_recipe(recipe_name, list(overrides))
    fractions = sorted(set(float(f) for f in fractions))
    check_fractions(fractions)
    check_runtime(base)  # before the dataset is read for the budget
    out = Path(output or Path("runs") / f"compare-{base.name}")
    lora_lr = lora_lr or base.train.lr
    full_lr = full_lr or lora_lr * FULL_LR_RATIO
    budget = training_budget(base)
    sizes = fraction_sizes(budget, fractions, base.train.batch_size * base.train.grad_accum)
    probe_name = probe_for(base.task, base.data) if probe else None
    metric = primary_metric(base.task)
    started = time.perf_counter()
    log(f"compare {base.name}: fractions {fractions} of {budget} examples, lr full {full_lr:g} / LoRA {lora_lr:g}")

    specs: dict[tuple[str, float], RunSpec] = {}
    for fraction, size in zip(fractions, sizes):
        for method, lr in (("full", full_lr), ("lora", lora_lr)):
            extra = [f"method={method}", f"train.lr={lr}", f"train.max_train_examples={size}",
                     "train.progress=false"]
            # the probe is scored on the full-budget runs only (that is where the claim is judged)
            specs[method, fraction] = RunSpec(recipe_name, [*overrides, *extra], out / f"{method}-f{fraction:g}",
                                              probe_name if fraction == fractions[-1] else None)
    check_specs(list(specs.values()))
    probe_before = None
    if probe_name:
        spec = RunSpec(recipe_name, list(overrides), out / "probe-base", probe_name, mode="probe")
        probe_before = launch(spec, log, isolate=isolate)["probe"]
    runs: dict[str, dict[float, dict[str, Any]]] = {"full": {}, "lora": {}}
    for (method, fraction), spec in specs.items():
        runs[method][fraction] = launch(spec, log, keep_weights, isolate)
    comparison = summarize(base.name, base.task, metric, fractions, sizes, runs, probe_name, probe_before)
    comparison.update({"recipe": base.name, "overrides": list(overrides), "model": base.model, "data": base.data,
                       "lr": {"full": full_lr, "lora": lora_lr}, "budget_examples": budget,
                       "wall_time_s": time.perf_counter() - started, "machine": machine(), "isolated": isolate})
    comparison["claims"] = [asdict(row) for row in judge(comparison)]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comparison.json", comparison)
    write_compare_report(comparison, out)
    log(f"report: {out / 'report.md'} ({out / 'report.html'})")
    return comparison


def summarize(recipe: str, task: str, metric: Metric, fractions: Sequence[float], sizes: Sequence[int],
              runs: dict[str, dict[float, dict[str, Any]]], probe: str | None,
              probe_before: float | None) -> dict[str, Any]:
    """The numbers each claim is judged on, per method, at the largest data fraction (plus the curve)."""
    main = fractions[-1]
    methods: dict[str, dict[str, Any]] = {}
    for method, by_fraction in runs.items():
        record = by_fraction[main]
        m = record["metrics"]
        held_out, train_value = m["eval"][metric.name], m["train_eval"][metric.name]
        entry = {
            "trainable_params": m["trainable_params"], "total_params": m["total_params"],
            "checkpoint_bytes": m["adapter_bytes"], "peak_memory_mb": m["peak_memory_mb"],
            "train_peak_mb": record.get("train_peak_mb"),
            "step_time_s": record["step_time_s"], "step_cpu_s": record["step_cpu_s"],
            "train_time_s": m["train_time_s"], "cpu_time_s": record["cpu_time_s"], "steps": m["steps"],
            "held_out": held_out, "train": train_value,
            # overfitting: how much better the model does on its training rows than on held-out rows
            "generalization_gap": metric.worse_by(held_out, train_value),
            "base_held_out": m["base_eval"][metric.name],
            "curve": [by_fraction[f]["metrics"]["eval"][metric.name] for f in fractions],
            "load_average": [record.get("load_average_start"), record.get("load_average_end")],
            "history": [(h["step"], h["loss"]) for h in m["history"] if "loss" in h],
        }
        if "perplexity" in m["eval"]:
            entry["held_out_perplexity"] = m["eval"]["perplexity"]
        if probe and "probe" in record:
            higher = PROBES[probe][1]
            entry["probe_after"] = record["probe"]
            entry["probe_drop"] = (probe_before - record["probe"]) if higher else (record["probe"] - probe_before)
        methods[method] = entry
    adapter, full = methods["lora"]["checkpoint_bytes"], methods["full"]["checkpoint_bytes"]
    serving = [{"tasks": n, "lora_bytes": n * adapter + full, "full_bytes": n * full} for n in SERVE_TASKS]
    return {"task": task, "metric": asdict(metric), "fractions": list(fractions), "examples": list(sizes),
            "methods": methods, "probe": probe, "probe_description": PROBES[probe][0] if probe else None,
            "probe_before": probe_before, "serving": serving}


def judge(comparison: dict[str, Any]) -> list[ClaimRow]:
    """One row per seed claim, its verdict computed by the rule in the row."""
    metric = Metric(**comparison["metric"])
    full, lora = comparison["methods"]["full"], comparison["methods"]["lora"]
    pct = int(COST_MARGIN * 100)
    name = metric.name
    # on a GPU the wall clock is the cost; on a shared CPU it also counts other people's work, so the verdict
    # uses the run's own CPU time (both are shown)
    gpu = bool(comparison.get("machine", {}).get("cuda"))
    step_key, total_key = ("step_time_s", "train_time_s") if gpu else ("step_cpu_s", "cpu_time_s")
    clock = "wall" if gpu else "CPU"
    memory = "allocated GPU memory" if gpu else "resident memory"
    step_peaks = full.get("train_peak_mb") is not None and lora.get("train_peak_mb") is not None
    memory_key = "train_peak_mb" if step_peaks else "peak_memory_mb"
    rows = [
        ClaimRow("LoRA trains far fewer parameters", "trainable parameters", f"{full['trainable_params']:,}",
                 f"{lora['trainable_params']:,} ({100 * lora['trainable_params'] / full['trainable_params']:.2f}%)",
                 verdict(lora["trainable_params"] <= 0.1 * full["trainable_params"]),
                 "holds if LoRA trains at most 10% of full fine-tuning's parameters"),
        ClaimRow("LoRA checkpoints are far smaller", "bytes on disk", format_bytes(full["checkpoint_bytes"]),
                 format_bytes(lora["checkpoint_bytes"]),
                 verdict(lora["checkpoint_bytes"] <= 0.1 * full["checkpoint_bytes"]),
                 "holds if the adapter folder is at most 10% of the full model folder"),
        ClaimRow("LoRA needs less memory", f"peak {memory} of the training steps (whole run incl. evaluation)",
                 f"{format_mb(full['train_peak_mb'])} ({full['peak_memory_mb']:.0f} MB)",
                 f"{format_mb(lora['train_peak_mb'])} ({lora['peak_memory_mb']:.0f} MB)",
                 verdict(lora[memory_key] < (1 - COST_MARGIN) * full[memory_key]),
                 f"holds if LoRA's training-step peak is at least {pct}% lower" if step_peaks else
                 f"holds if LoRA's whole-run peak is at least {pct}% lower (no step-only peak was measured)"),
        ClaimRow("LoRA trains faster per step", "median seconds per optimizer step: wall (CPU)",
                 f"{full['step_time_s']:.3f} s ({full['step_cpu_s']:.3f} s)",
                 f"{lora['step_time_s']:.3f} s ({lora['step_cpu_s']:.3f} s)",
                 verdict(lora[step_key] < (1 - COST_MARGIN) * full[step_key]),
                 f"holds if LoRA's median {clock} time per step is at least {pct}% shorter"),
        ClaimRow("LoRA needs less total training time", "training run (load, evaluate, train, save): wall (CPU)",
                 f"{full['train_time_s']:.0f} s ({full['cpu_time_s']:.0f} s)",
                 f"{lora['train_time_s']:.0f} s ({lora['cpu_time_s']:.0f} s)",
                 verdict(lora[total_key] < (1 - COST_MARGIN) * full[total_key]),
                 f"holds if LoRA's total {clock} time is at least {pct}% shorter"),
        ClaimRow("LoRA may reach a lower held-out metric than full fine-tuning", f"held-out {name}",
                 f"{full['held_out']:.4f}", f"{lora['held_out']:.4f}",
                 verdict(metric.worse_by(lora["held_out"], full["held_out"]) > TOLERANCE),
                 f"holds if LoRA's held-out {name} is worse than full fine-tuning's by more than {TOLERANCE}"),
        ClaimRow("LoRA overfits less", f"how much worse held-out {name} is than training {name} "
                 "(generalization gap)",
                 f"{full['generalization_gap']:+.4f}", f"{lora['generalization_gap']:+.4f}",
                 verdict(lora["generalization_gap"] < full["generalization_gap"]),
                 "holds if LoRA's generalization gap is smaller"),
    ]
    rows += [_data_claim(comparison, metric, full, lora), _probe_claim(comparison, full, lora),
             _serving_claim(comparison)]
    return rows


def _data_claim(comparison: dict[str, Any], metric: Metric, full: dict[str, Any], lora: dict[str, Any]) -> ClaimRow:
    reduced = [i for i, f in enumerate(comparison["fractions"]) if f < 1.0] or list(range(len(comparison["fractions"])))
    # mean advantage over the reduced fractions (area between the learning curves): a tie where neither method
    # has learned anything yet is no evidence either way, so no counting of wins
    advantage = sum(metric.worse_by(full["curve"][i], lora["curve"][i]) for i in reduced) / len(reduced)

    def curve(entry: dict[str, Any]) -> str:
        return ", ".join(f"{comparison['fractions'][i]:g}: {entry['curve'][i]:.4f}" for i in reduced)

    return ClaimRow("LoRA needs less data", f"held-out {metric.name} at reduced data fractions (LoRA's mean "
                    f"advantage {advantage:+.4f})", curve(full), curve(lora), verdict(advantage > 0),
                    "holds if, averaged over the fractions below 1, LoRA's held-out metric is better than "
                    "full fine-tuning's")


def _probe_claim(comparison: dict[str, Any], full: dict[str, Any], lora: dict[str, Any]) -> ClaimRow:
    if not (comparison.get("probe") and "probe_drop" in full and "probe_drop" in lora):
        return ClaimRow("LoRA preserves pretrained knowledge (less forgetting)", "no probe for this task",
                        "-", "-", verdict(None), "needs a knowledge probe (text tasks)")
    before = comparison["probe_before"]
    return ClaimRow("LoRA preserves pretrained knowledge (less forgetting)",
                    f"{comparison['probe']}: before {before:.4f}, drop after training",
                    f"{full['probe_after']:.4f} (drop {full['probe_drop']:+.4f})",
                    f"{lora['probe_after']:.4f} (drop {lora['probe_drop']:+.4f})",
                    # when neither method lost any of the capability there is nothing to compare
                    "not judged" if max(full["probe_drop"], lora["probe_drop"]) <= 0
                    else verdict(lora["probe_drop"] < full["probe_drop"]),
                    "holds if LoRA's drop of the original capability is smaller; not judged when "
                    "neither method lost any of it (negative drop: it improved)")


def _serving_claim(comparison: dict[str, Any]) -> ClaimRow:
    ten = next(s for s in comparison["serving"] if s["tasks"] == 10)
    return ClaimRow("One base serves many tasks cheaply", "bytes for 10 tasks: 10 adapters + 1 base vs 10 "
                    "full copies", format_bytes(ten["full_bytes"]), format_bytes(ten["lora_bytes"]),
                    verdict(ten["lora_bytes"] < 0.5 * ten["full_bytes"]),
                    "holds if 10 adapters + one base take less than half the bytes of 10 full copies")
