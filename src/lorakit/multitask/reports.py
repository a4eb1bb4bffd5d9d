"""Reports of `lorakit multitask` and `lorakit continual`: rendering only, every number comes from their
``metrics.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..tasks import primary_metric

STRATEGY_LABELS = {"full": "full fine-tuning in sequence", "lora": "one LoRA in sequence",
                   "per-task": "one adapter per task"}


def _stage_labels(tasks: Sequence[str]) -> list[str]:
    return ["base"] + [f"after {t}" for t in tasks]


def write_continual_report(results: dict[str, Any], out: str | Path) -> Path:
    from ..report import Report, heatmap

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
    from ..report import CYCLE, plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    stages = _stage_labels(tasks)
    for j, (ax, task) in enumerate(zip(axes[0], tasks)):
        for i, (label, per_task) in enumerate(curves.items()):
            ax.plot(range(len(stages)), per_task[j], marker="o", color=CYCLE[i % len(CYCLE)], label=label)
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
    from ..report import Report, loss_curves

    tasks = [t["name"] for t in metrics["tasks"]]
    metric = primary_metric(metrics["task"]).name
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
    from ..report import grouped_bars

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
