"""The reports of `compare`, `sweep` and `recommend`: tables and figures from their result dictionaries
(``comparison.json``, ``sweep.json``, ``recommend.json``), written by `lorakit.report.Report`. Nothing here
measures or judges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .. import report as rp
from ..analyze import split_name
from ..tasks import Metric
from .claims import format_bytes, verdict
from .ranks import RACE_FACTOR


def write_compare_report(comparison: dict[str, Any], out: Path) -> Path:
    metric = Metric(**comparison["metric"])
    full, lora = comparison["methods"]["full"], comparison["methods"]["lora"]
    doc = rp.Report(f"Full fine-tuning vs LoRA: {comparison['recipe']}")
    doc.text(f"Model {comparison['model']}, data {comparison['data']}, overrides "
             f"`{' '.join(comparison['overrides']) or '(none)'}`. Same data, seed and epochs for both methods; "
             f"learning rate {comparison['lr']['full']:g} (full) and {comparison['lr']['lora']:g} (LoRA). Data "
             f"fractions {comparison['fractions']} of {comparison['budget_examples']} training examples "
             f"({comparison['examples']}). Each run in its own process; machine: {comparison['machine']['cpus']} "
             f"CPUs, CUDA {comparison['machine']['cuda'] or 'none'}; load average during the full-budget runs: "
             f"full {_load(full)}, LoRA {_load(lora)}. Whole comparison: {comparison['wall_time_s'] / 60:.1f} min.")
    doc.heading("Claims")
    doc.table(["claim", "measure", "full fine-tuning", "LoRA", "verdict", "rule"],
              [[c["claim"], c["measure"], c["full"], c["lora"], c["verdict"], c["rule"]] for c in comparison["claims"]])
    doc.heading("Learning curve")
    doc.table(["fraction", "examples", f"full {metric.name}", f"LoRA {metric.name}"],
              [[f"{f:g}", n, f"{a:.4f}", f"{b:.4f}"] for f, n, a, b in
               zip(comparison["fractions"], comparison["examples"], full["curve"], lora["curve"])])
    doc.figure(rp.learning_curve(comparison["fractions"], {"full": full["curve"], "lora": lora["curve"]}, metric.name,
                                 comparison["examples"], baseline=full["base_held_out"]),
               "learning_curve.png", f"Held-out {metric.name} at each data fraction (dashed: before training).")
    doc.heading("Costs")
    doc.figure(costs_figure(full, lora), "costs.png", "One panel per unit, log scales; labels give the values.")
    doc.figure(time_figure(full, lora), "time.png",
               "Median optimizer step (seconds) and whole run (minutes), wall clock and the process's CPU time.")
    doc.figure(rp.loss_curves({m: e["history"] for m, e in (("full", full), ("lora", lora))},
                              "Training loss at the full budget"), "loss.png", "Per-step loss; thick: 10-step mean.")
    doc.heading("Serving N tasks")
    doc.table(["tasks", "N adapters + 1 base", "N full copies", "ratio"],
              [[s["tasks"], format_bytes(s["lora_bytes"]), format_bytes(s["full_bytes"]),
                f"{s['lora_bytes'] / s['full_bytes']:.3f}"]
               for s in comparison["serving"]])
    doc.figure(rp.grouped_bars([str(s["tasks"]) for s in comparison["serving"]],
                               {"full": [s["full_bytes"] / 1e6 for s in comparison["serving"]],
                                "lora": [s["lora_bytes"] / 1e6 for s in comparison["serving"]]},
                               "MB on disk (log scale)", "Disk for N tasks: N full copies vs one base + N adapters",
                               log=True, xlabel="number of tasks N"), "serving.png",
               "Computed from the saved files' sizes.")
    if comparison.get("probe"):
        doc.heading("Knowledge preservation")
        doc.text(f"Probe: {comparison['probe_description']}. Before training: {comparison['probe_before']:.4f}.")
    doc.write(out)
    return out


def costs_figure(full: dict[str, Any], lora: dict[str, Any]) -> Figure:
    """Trainable parameters, checkpoint size and peak memory of the two methods: one panel per unit."""
    methods = (("full", full), ("lora", lora))
    return rp.bar_panels([
        rp.BarPanel("Trainable parameters", "parameters (log scale)", [""],
                    {m: [e["trainable_params"]] for m, e in methods}, log=True),
        rp.BarPanel("Checkpoint", "MB on disk (log scale)", [""],
                    {m: [e["checkpoint_bytes"] / 1e6] for m, e in methods}, log=True),
        rp.BarPanel("Peak memory", "MB", ["training steps", "whole run"],
                    {m: [e["train_peak_mb"] or 0.0, e["peak_memory_mb"]] for m, e in methods}),
    ], "Parameters, checkpoint size and peak memory")


def time_figure(full: dict[str, Any], lora: dict[str, Any]) -> Figure:
    """Seconds per optimizer step and minutes for the whole run, each on its own axis (wall clock and CPU)."""
    methods = (("full", full), ("lora", lora))
    return rp.bar_panels([
        rp.BarPanel("Median optimizer step", "seconds per step", ["wall", "CPU"],
                    {m: [e["step_time_s"], e["step_cpu_s"]] for m, e in methods}),
        rp.BarPanel("Whole training run", "minutes", ["wall", "CPU"],
                    {m: [e["train_time_s"] / 60, e["cpu_time_s"] / 60] for m, e in methods}),
    ], "Training time")


def _load(entry: dict[str, Any]) -> str:
    values = [v[0] for v in entry.get("load_average", []) if v]
    return "/".join(f"{v:.1f}" for v in values) or "?"


def write_sweep_report(result: dict[str, Any], out: Path) -> Path:
    metric = Metric(**result["metric"])
    doc = rp.Report(f"LoRA rank sweep: {result['recipe']}")
    # sweeps recorded before alpha_rule existed kept alpha / r
    alpha_rule = result.get("alpha_rule") or f"alpha = {result['alpha_ratio']:g} x r"
    doc.text(f"Ranks {result['ranks']} x learning rates {result['lrs']}, {alpha_rule}; "
             f"overrides `{' '.join(result['overrides']) or '(none)'}`. Each run in its own process; sum of run "
             f"times {result['runs_time_s'] / 60:.1f} min. Best: r={result['best']['r']}, lr={result['best']['lr']:g}, "
             f"held-out {metric.name} {result['best']['held_out']:.4f}.")
    doc.heading("Claims")
    doc.table(["claim", "measure", "value", "verdict", "rule"],
              [[c["claim"], c["measure"], c["lora"], c["verdict"], c["rule"]] for c in result["claims"]])
    doc.heading("Runs")
    doc.table(["r", "lr", f"held-out {metric.name}", f"train {metric.name}", "trainable params", "adapter",
               "s/step", "total s"],
              [[r["r"], f"{r['lr']:g}", f"{r['held_out']:.4f}", f"{r['train']:.4f}", f"{r['trainable_params']:,}",
                format_bytes(r["adapter_bytes"]), f"{r['step_time_s']:.3f}", f"{r['train_time_s']:.0f}"]
               for r in result["rows"]])
    by_lr = {f"lr {lr:g}": [next(r["held_out"] for r in result["rows"] if r["r"] == k and r["lr"] == lr)
                            for k in result["ranks"]] for lr in result["lrs"]}
    params = [next(r["trainable_params"] for r in result["rows"] if r["r"] == k) for k in result["ranks"]]
    doc.figure(rp.rank_sweep(result["ranks"], by_lr, params, metric.name), "rank_sweep.png",
               f"Held-out {metric.name} against rank and against trainable parameters.")
    doc.write(out)
    return out


# =========================================================================================================


def write_recommend_report(result: dict[str, Any], out: Path) -> Path:
    doc = rp.Report(f"Rank and learning-rate suggestion: {result['recipe']}")
    doc.text(f"Suggested: r={result['rank']} (alpha {result['alpha']:g}), lr={result['lr']:.3g}; the recipe uses "
             f"r={result['recipe_defaults']['r']}, lr={result['recipe_defaults']['lr']:g}. Cost: "
             f"{result['time_s']:.0f} s wall, {result['cpu_time_s']:.0f} s CPU ({result['rank_time_s']:.0f} s wall "
             "for the rank).")
    doc.heading("Evidence: rank")
    doc.text(f"Gradient of each targeted weight summed over {result['grad_batches']} training batches at the base "
             f"model; per layer, the number of singular directions holding {int(result['energy'] * 100)}% of its "
             "squared singular values. Suggestion: the power of two at or above the median layer.")
    doc.figure(rp.rank_estimates([split_name(x["name"]) for x in result["layers"]],
                                 [x["energy_rank"] for x in result["layers"]],
                                 result["rank"], result["energy"]), "rank_estimates.png",
               "Rank each layer's gradient needs (log scale).")
    doc.heading("Evidence: learning rate")
    lr_range = result["lr_range"]
    doc.text(f"{len(lr_range['lrs'])} LoRA steps at r={result['rank']} with the learning rate growing "
             f"geometrically; suggestion: a third of the learning rate with the lowest smoothed loss (Smith 2017).")
    doc.figure(rp.lr_range(lr_range["lrs"], lr_range["losses"], lr_range["smoothed"], result["lr"]),
               "lr_range.png", "Loss while the learning rate grows each step.")
    if result.get("race"):
        doc.heading("Evidence: the race")
        spectrum = result["spectrum_suggestion"]
        doc.text(f"The spectrum's suggestion (r={spectrum['rank']}, lr={spectrum['lr']:.3g}) and {RACE_FACTOR}x its "
                 "rank at the same r x lr, each trained at the recipe's budget; the better validation metric wins. "
                 "Held-out (test) numbers are shown, not used.")
        doc.table(["arm", "r", "lr", "validation", "held-out", "train time: wall (CPU)"],
                  [["chosen" if a["rank"] == result["rank"] else "", a["rank"], f"{a['lr']:.3g}",
                    f"{a['validation']:.4f}", f"{a['held_out']:.4f}",
                    f"{a['train_time_s']:.0f} s ({a['cpu_time_s']:.0f} s)"]
                   for a in result["race"]])
    check = result.get("check")
    if check:
        best = check["sweep_best"]
        doc.heading("Check against the sweep")
        doc.table(["", "r", "lr", "held-out", "time: wall (CPU)"],
                  [["suggestion", result["rank"], f"{result['lr']:.3g}", f"{check['held_out']:.4f}",
                    f"{result['time_s']:.0f} s ({result['cpu_time_s']:.0f} s) to suggest"],
                   ["sweep best", best["r"], f"{best['lr']:g}", f"{best['held_out']:.4f}",
                    f"{check['sweep_runs_time_s']:.0f} s ({check['sweep_runs_cpu_s']:.0f} s) for the whole sweep"]])
        doc.table(["claim", "measure", "value", "verdict", "rule"],
                  [["the suggestion lands within 1 point of the sweep's best", "gap to the best",
                    f"{check['gap']:+.4f}", check["verdict"], check["rule"]],
                   ["the suggestion costs a fraction of the sweep", "suggestion time / sweep time",
                    f"{check['cost_fraction']:.3f}", verdict(check["cost_fraction"] < 0.5),
                    "holds if suggesting takes less than half the sweep's time"]])
    doc.write(out)
    return out
