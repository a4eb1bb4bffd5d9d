"""`sweep`: LoRA at every rank x learning rate of a recipe, each run in its own process, with the sensitivity
claims (does the rank matter? the learning rate?) judged against `TOLERANCE`."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from ..files import write_json
from ..tasks import Metric, primary_metric
from .claims import TOLERANCE, ClaimRow, verdict
from .ranks import FixedScale, rank_limits, rank_overrides
from .reports import write_sweep_report
from .runs import Log, RunSpec, check_specs, launch, machine


def sweep(recipe_name: str, ranks: Sequence[int], lrs: Sequence[float] | None = None, overrides: Sequence[str] = (),
          output: str | Path | None = None, isolate: bool = True, log: Log = print) -> dict[str, Any]:
    """LoRA at every rank x learning rate; alpha keeps the recipe's update scale s (`FixedScale`). Every run's
    settings are checked before the first starts. Writes ``sweep.json`` and a report with metric vs rank and vs
    trainable parameters."""
    from ..recipes import check_runtime, load_recipe

    base = load_recipe(recipe_name, list(overrides))
    if base.method != "lora":
        raise ConfigError(f"sweep varies the LoRA rank; recipe {base.name} has method={base.method}")
    if not ranks or min(ranks) < 1:
        raise ConfigError(f"sweep ranks must be positive integers, got {list(ranks)} (fix: e.g. --ranks 1,4,16)")
    check_runtime(base)
    scale = FixedScale.of(base)
    lrs = list(lrs or [base.train.lr])
    metric = primary_metric(base.task)
    out = Path(output or Path("runs") / f"sweep-{base.name}")
    check_specs(list(_specs(recipe_name, overrides, ranks, lrs, scale, {}, out).values()))  # before a model loads
    specs = _specs(recipe_name, overrides, ranks, lrs, scale, rank_limits(base), out)
    started = time.perf_counter()
    rows = []
    log(f"sweep {base.name}: ranks {list(ranks)} x lrs {lrs} ({scale.describe()})")
    for (r, lr), spec in specs.items():
        record = launch(spec, log, isolate=isolate)
        m = record["metrics"]
        rows.append({"r": r, "lr": lr, "held_out": m["eval"][metric.name], "train": m["train_eval"][metric.name],
                     "trainable_params": m["trainable_params"], "train_time_s": m["train_time_s"],
                     "step_time_s": record["step_time_s"], "step_cpu_s": record["step_cpu_s"],
                     "cpu_time_s": record["cpu_time_s"], "adapter_bytes": m["adapter_bytes"], "run": str(spec.output)})
    result = sweep_summary(rows, metric)
    result.update({"recipe": base.name, "overrides": list(overrides), "ranks": list(ranks), "lrs": lrs,
                   "alpha_ratio": scale.config.alpha / scale.config.r, "alpha_rule": scale.describe(),
                   "wall_time_s": time.perf_counter() - started,
                   "runs_time_s": sum(r["train_time_s"] for r in rows),
                   "runs_cpu_s": sum(r["cpu_time_s"] for r in rows), "machine": machine()})
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", result)
    write_sweep_report(result, out)
    log(f"best: r={result['best']['r']} lr={result['best']['lr']:g} {metric.name}={result['best']['held_out']:.4f}; "
        f"report: {out / 'report.md'}")
    return result


def _specs(recipe_name: str, overrides: Sequence[str], ranks: Sequence[int], lrs: Sequence[float],
           scale: FixedScale, limits: dict[str, int], out: Path) -> dict[tuple[int, float], RunSpec]:
    """The sweep's runs by (rank, lr), in the order they run."""
    return {(r, lr): RunSpec(recipe_name, [*overrides, "method=lora", *rank_overrides(r, scale, limits),
                                           f"train.lr={lr}", "train.progress=false"], out / f"r{r}-lr{lr:g}")
            for lr in lrs for r in ranks}


def sweep_summary(rows: list[dict[str, Any]], metric: Metric) -> dict[str, Any]:
    """Best run and the sensitivity claims: the spread of the held-out metric over ranks (at the best lr) and
    over learning rates (at the best rank), judged against `TOLERANCE`."""
    best = rows[0]
    for row in rows[1:]:
        if metric.better(row["held_out"], best["held_out"]):
            best = row
    at_lr = [r["held_out"] for r in rows if r["lr"] == best["lr"]]
    at_rank = [r["held_out"] for r in rows if r["r"] == best["r"]]
    claims = [
        asdict(ClaimRow("LoRA is sensitive to the rank", f"spread of held-out {metric.name} over ranks at lr "
                        f"{best['lr']:g}", "-", f"{max(at_lr) - min(at_lr):.4f}",
                        verdict(max(at_lr) - min(at_lr) > TOLERANCE),
                        f"holds if best and worst rank differ by more than {TOLERANCE}")),
        asdict(ClaimRow("LoRA is sensitive to the learning rate", f"spread of held-out {metric.name} over learning "
                        f"rates at r={best['r']}", "-",
                        f"{max(at_rank) - min(at_rank):.4f}" if len(at_rank) > 1 else "-",
                        verdict(max(at_rank) - min(at_rank) > TOLERANCE if len(at_rank) > 1 else None),
                        f"holds if best and worst learning rate differ by more than {TOLERANCE}")),
    ]
    return {"metric": asdict(metric), "rows": rows, "best": best, "claims": claims}
