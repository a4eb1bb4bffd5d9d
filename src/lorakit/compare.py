"""Evidence for LoRA's claims, measured on a recipe: `compare` full fine-tuning with LoRA, `sweep` ranks and
learning rates, `recommend` a rank and learning rate cheaply.

Every training run is its own Python process (`run_child`), so its peak memory (``ru_maxrss``, a per-process
peak) and its time belong to that run alone. A run folder whose ``run.json`` records the same spec is reused,
so an interrupted ``lorakit compare`` continues where it stopped. Checkpoints are deleted after each run;
full fine-tuned weights too unless ``--keep-weights`` (adapters are small and kept, for ``lorakit inspect``).

Verdicts are computed from the numbers by the rule written beside each claim in `judge`; the report renders
them (`lorakit.report`) and never edits them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .cli import command
from .errors import ConfigError, LorakitError

#: full fine-tuning's default learning rate = LoRA's x this (LoRA usually wants ~10-20x larger steps)
FULL_LR_RATIO = 0.05
#: "1 point": 0.01 of accuracy, or 0.01 nats of loss (about 1% of perplexity)
TOLERANCE = 0.01
#: relative margin a cost (memory, time) must beat to count as "less"
COST_MARGIN = 0.05
#: number of tasks the serving-cost claim is judged at
SERVE_TASKS = (1, 10, 100)

#: version of run.json; a run recorded with another is run again
RUN_FORMAT = 2

Log = Callable[[str], None]


# =========================================================================================================
# What is measured
# =========================================================================================================
@dataclass(frozen=True)
class Metric:
    name: str  # key in metrics["eval"]
    higher_is_better: bool

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b

    def worse_by(self, a: float, b: float) -> float:
        """How much worse ``a`` is than ``b`` (negative: better)."""
        return b - a if self.higher_is_better else a - b


def main_metric(task: str) -> Metric:
    """Accuracy for classification, answer-token loss (lower is better) for causal LMs."""
    return Metric("loss", False) if task == "causal-lm" else Metric("accuracy", True)


# -- knowledge probes: the original capability, measured before and after training --------------------------
#: probe name -> (description, higher is better)
PROBES = {
    "faq-retrieval": ("FAQ answer retrieval by the encoder's mean-pooled sentence embeddings: mean reciprocal "
                      "rank of each English question's own answer among all 503 answers (cosine similarity)",
                      True),
    "general-perplexity": ("perplexity of the causal LM on 128 held-out Rotten Tomatoes review snippets (plain "
                           "text, no chat template), a domain no causal-LM recipe trains on", False),
    "faq-perplexity": ("perplexity of the causal LM on the 503 English FAQ answers (plain text)", False),
}


def probe_for(task: str, data: str) -> str | None:
    """The knowledge probe of a recipe: text the recipe does not train on; None where none applies."""
    if task == "sequence-classification":
        return None if data in ("faq-en", "faq-en-sv") else "faq-retrieval"
    if task == "causal-lm":
        return "faq-perplexity" if data == "rotten-tomatoes" else "general-perplexity"
    return None


@torch.no_grad()
def run_probe(probe: str, model: torch.nn.Module, tokenizer: Any, batch_size: int = 32,
              limit: int | None = None) -> float:
    """The probe's score for ``model`` (see `PROBES`); ``limit`` caps the texts (quick checks)."""
    from .data import load_dataset

    model.eval()
    if probe == "faq-retrieval":
        rows = [row for split in load_dataset("faq-en") for row in split][:limit]
        questions = _embed(model, tokenizer, [r["prompt"] for r in rows], batch_size)
        answers = _embed(model, tokenizer, [r["completion"] for r in rows], batch_size)
        return mean_reciprocal_rank(questions @ answers.T)
    if probe == "general-perplexity":
        texts = [r["text"] for r in load_dataset("rotten-tomatoes").test.take(128)]
    elif probe == "faq-perplexity":
        texts = [r["completion"] for split in load_dataset("faq-en") for r in split]
    else:
        raise ConfigError(f"unknown probe {probe!r}; known: {sorted(PROBES)}")
    return text_perplexity(model, tokenizer, texts[:limit], batch_size)


def mean_reciprocal_rank(similarity: torch.Tensor) -> float:
    """``similarity`` ``(n, n)``: query i's right answer is column i. Mean of 1 / (its rank among the row)."""
    correct = similarity.diagonal().unsqueeze(1)
    ranks = (similarity > correct).sum(1) + 1
    return float((1.0 / ranks.double()).mean())


def _embed(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """Mean-pooled, L2-normalized last hidden states of the model's encoder (``model.base_model``)."""
    encoder = getattr(model, "base_model", model)
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True, max_length=128,
                          return_tensors="pt")
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
    return torch.cat(out)


def text_perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 16,
                    max_length: int = 128) -> float:
    """Token-level perplexity of plain texts (every token after the first predicted from those before)."""
    total, count = 0.0, 0
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels[:, 1:] != -100).sum())
    finally:
        tokenizer.padding_side = side
    return math.exp(total / max(1, count))


# =========================================================================================================
# One run = one process
# =========================================================================================================
_CHILD = "import sys; from lorakit.compare import run_child; sys.exit(run_child(sys.argv[1]))"


def run_child(payload_json: str) -> int:
    """Entry point of a run process: `execute` the JSON payload."""
    execute(json.loads(payload_json))
    return 0


def execute(payload: dict[str, Any]) -> dict[str, Any]:
    """One run. ``mode`` ``train``: train the recipe, timing every step (wall and CPU), delete the checkpoint,
    score the probe on the result. ``probe``: score the untrained base model. Writes ``run.json``."""
    from .train import load_recipe, load_run, train

    out = Path(payload["output"])
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(payload["recipe"], payload["overrides"])
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    probe = payload.get("probe")
    record: dict[str, Any] = {"spec": payload, "load_average_start": os.getloadavg()}
    if payload["mode"] == "probe":
        from .data import load_dataset
        from .models import load_model

        labels = load_dataset(recipe.data, seed=recipe.train.seed).train.labels
        loaded = load_model(recipe.model, task=recipe.task, num_labels=len(labels) if labels else None,
                            seed=recipe.train.seed)
        started = time.perf_counter()
        record["probe"] = run_probe(probe, loaded.model, loaded.tokenizer)
        record["probe_time_s"] = time.perf_counter() - started
    else:
        wall: list[float] = []
        cpu: list[float] = []  # process time, all threads: what the run itself computed, whatever else runs
        peak = StepPeak()

        def on_step(state: Any, loss: float) -> None:
            wall.append(time.perf_counter())
            cpu.append(time.process_time())
            peak.step()

        cpu_start = time.process_time()
        metrics = train(recipe, out, on_step=on_step)
        record["cpu_time_s"] = time.process_time() - cpu_start
        (out / "checkpoint.pt").unlink(missing_ok=True)
        record["metrics"] = metrics
        record["step_time_s"] = _median_step(wall, metrics["train_time_s"])
        record["step_cpu_s"] = _median_step(cpu, record["cpu_time_s"])
        record["train_peak_mb"] = peak.peak_mb
        record["load_average_end"] = os.getloadavg()
        if probe:
            _, loaded = load_run(out)
            record["probe"] = run_probe(probe, loaded.model, loaded.tokenizer)
    _write_json(out / "run.json", record)
    return record


class StepPeak:
    """Peak memory of the training steps alone (``ru_maxrss`` also counts evaluation, whose full-vocabulary
    logits can dwarf a small model's training state). At the first step's end the counter is reset — the
    optimizer state exists by then — and read at the end of every later step: CUDA's peak allocation on a GPU,
    else the process's resident high-water mark (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)."""

    def __init__(self) -> None:
        self.steps = 0
        self.peak_mb: float | None = None
        self.cuda = torch.cuda.is_available()

    def step(self) -> None:
        self.steps += 1
        if self.steps == 1:
            self._reset()
            return
        current = self._read()
        if current is not None:
            self.peak_mb = max(self.peak_mb or 0.0, current)

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.cuda = None  # no reset possible: no step-only peak

    def _read(self) -> float | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        if self.cuda is None:
            return None
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None


def _median_step(stamps: list[float], fallback: float) -> float:
    """Median time between consecutive steps (robust to the validation pass between epochs)."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(steps) if steps else fallback


@dataclass
class RunSpec:
    recipe: str
    overrides: list[str]
    output: Path
    probe: str | None = None
    mode: str = "train"

    def payload(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "overrides": list(self.overrides), "output": str(self.output),
                "probe": self.probe, "mode": self.mode, "format": RUN_FORMAT}


def launch(spec: RunSpec, log: Log = print, keep_weights: bool = False, isolate: bool = True) -> dict[str, Any]:
    """Run ``spec`` in a fresh process (or reuse its ``run.json`` if the spec matches); returns the record.
    ``isolate=False`` runs it in this process (quick checks; its peak memory is then this process's)."""
    record_path = spec.output / "run.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("spec") == json.loads(json.dumps(spec.payload())):
            log(f"  reusing {spec.output}")
            return record
    spec.output.mkdir(parents=True, exist_ok=True)
    log(f"  running {spec.mode} {spec.recipe} {' '.join(spec.overrides)} -> {spec.output}")
    started = time.perf_counter()
    if not isolate:
        record = execute(json.loads(json.dumps(spec.payload())))
        if not keep_weights:
            shutil.rmtree(spec.output / "model", ignore_errors=True)
        return record
    with open(spec.output / "run.log", "w") as log_file:
        done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec.payload())], stdout=log_file,
                              stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0 or not record_path.is_file():
        tail = (spec.output / "run.log").read_text(errors="replace")[-2000:]
        raise LorakitError(f"run {spec.output} failed (exit {done.returncode}); end of {spec.output / 'run.log'}:\n"
                           f"{tail}")
    if not keep_weights:
        shutil.rmtree(spec.output / "model", ignore_errors=True)
    log(f"  done in {time.perf_counter() - started:.0f} s")
    return json.loads(record_path.read_text())


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# =========================================================================================================
# compare
# =========================================================================================================
def training_budget(recipe: Any) -> int:
    """Training examples the recipe uses: ``train.max_train_examples`` or the whole train split."""
    if recipe.train.max_train_examples is not None:
        return int(recipe.train.max_train_examples)
    from .data import load_dataset

    return len(load_dataset(recipe.data, seed=recipe.train.seed).train)


def fraction_sizes(budget: int, fractions: Sequence[float], rows_per_step: int) -> list[int]:
    """Training examples per data fraction; at least one optimizer step's worth."""
    for f in fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"data fractions must be in (0, 1], got {f}")
    return [max(rows_per_step, round(f * budget)) for f in fractions]


def compare(recipe_name: str, overrides: Sequence[str] = (), fractions: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
            output: str | Path | None = None, full_lr: float | None = None, lora_lr: float | None = None,
            keep_weights: bool = False, probe: bool = True, isolate: bool = True,
            log: Log = print) -> dict[str, Any]:
    """Full fine-tuning vs LoRA on one recipe: same data, seed and epochs, each method with its own learning
    rate, at every data fraction. Writes ``comparison.json`` and the report; returns the comparison.

    ``probe=False`` skips the knowledge probe; ``isolate=False`` trains in this process (quick checks only:
    peak memory is then shared by every run)."""
    from .train import load_recipe

    base = load_recipe(recipe_name, list(overrides))
    fractions = sorted(set(float(f) for f in fractions))
    out = Path(output or Path("runs") / f"compare-{base.name}")
    lora_lr = lora_lr or base.train.lr
    full_lr = full_lr or lora_lr * FULL_LR_RATIO
    budget = training_budget(base)
    sizes = fraction_sizes(budget, fractions, base.train.batch_size * base.train.grad_accum)
    probe_name = probe_for(base.task, base.data) if probe else None
    metric = main_metric(base.task)
    started = time.perf_counter()
    log(f"compare {base.name}: fractions {fractions} of {budget} examples, lr full {full_lr:g} / LoRA {lora_lr:g}")

    probe_before = None
    if probe_name:
        spec = RunSpec(recipe_name, list(overrides), out / "probe-base", probe_name, mode="probe")
        probe_before = launch(spec, log, isolate=isolate)["probe"]
    runs: dict[str, dict[float, dict[str, Any]]] = {"full": {}, "lora": {}}
    for fraction, size in zip(fractions, sizes):
        for method, lr in (("full", full_lr), ("lora", lora_lr)):
            extra = [f"method={method}", f"train.lr={lr}", f"train.max_train_examples={size}",
                     "train.progress=false"]
            # the probe is scored on the full-budget runs only (that is where the claim is judged)
            spec = RunSpec(recipe_name, [*overrides, *extra], out / f"{method}-f{fraction:g}",
                           probe_name if fraction == fractions[-1] else None)
            runs[method][fraction] = launch(spec, log, keep_weights, isolate)
    comparison = summarize(base.name, base.task, metric, fractions, sizes, runs, probe_name, probe_before)
    comparison.update({"recipe": base.name, "overrides": list(overrides), "model": base.model, "data": base.data,
                       "lr": {"full": full_lr, "lora": lora_lr}, "budget_examples": budget,
                       "wall_time_s": time.perf_counter() - started, "machine": machine(), "isolated": isolate})
    comparison["claims"] = [asdict(row) for row in judge(comparison)]
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "comparison.json", comparison)
    write_compare_report(comparison, runs, out)
    log(f"report: {out / 'report.md'} ({out / 'report.html'})")
    return comparison


def machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__}


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


@dataclass
class ClaimRow:
    claim: str
    measure: str
    full: str
    lora: str
    verdict: str  # holds | does not hold | not measured | not judged
    rule: str


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("holds" if ok else "does not hold")


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
                 _verdict(lora["trainable_params"] <= 0.1 * full["trainable_params"]),
                 "holds if LoRA trains at most 10% of full fine-tuning's parameters"),
        ClaimRow("LoRA checkpoints are far smaller", "bytes on disk", _bytes(full["checkpoint_bytes"]),
                 _bytes(lora["checkpoint_bytes"]),
                 _verdict(lora["checkpoint_bytes"] <= 0.1 * full["checkpoint_bytes"]),
                 "holds if the adapter folder is at most 10% of the full model folder"),
        ClaimRow("LoRA needs less memory", f"peak {memory} of the training steps (whole run incl. evaluation)",
                 f"{_mb(full['train_peak_mb'])} ({full['peak_memory_mb']:.0f} MB)",
                 f"{_mb(lora['train_peak_mb'])} ({lora['peak_memory_mb']:.0f} MB)",
                 _verdict(lora[memory_key] < (1 - COST_MARGIN) * full[memory_key]),
                 f"holds if LoRA's training-step peak is at least {pct}% lower" if step_peaks else
                 f"holds if LoRA's whole-run peak is at least {pct}% lower (no step-only peak was measured)"),
        ClaimRow("LoRA trains faster per step", "median seconds per optimizer step: wall (CPU)",
                 f"{full['step_time_s']:.3f} s ({full['step_cpu_s']:.3f} s)",
                 f"{lora['step_time_s']:.3f} s ({lora['step_cpu_s']:.3f} s)",
                 _verdict(lora[step_key] < (1 - COST_MARGIN) * full[step_key]),
                 f"holds if LoRA's median {clock} time per step is at least {pct}% shorter"),
        ClaimRow("LoRA needs less total training time", "training run (load, evaluate, train, save): wall (CPU)",
                 f"{full['train_time_s']:.0f} s ({full['cpu_time_s']:.0f} s)",
                 f"{lora['train_time_s']:.0f} s ({lora['cpu_time_s']:.0f} s)",
                 _verdict(lora[total_key] < (1 - COST_MARGIN) * full[total_key]),
                 f"holds if LoRA's total {clock} time is at least {pct}% shorter"),
        ClaimRow("LoRA may reach a lower held-out metric than full fine-tuning", f"held-out {name}",
                 f"{full['held_out']:.4f}", f"{lora['held_out']:.4f}",
                 _verdict(metric.worse_by(lora["held_out"], full["held_out"]) > TOLERANCE),
                 f"holds if LoRA's held-out {name} is worse than full fine-tuning's by more than {TOLERANCE}"),
        ClaimRow("LoRA overfits less", f"how much worse held-out {name} is than training {name} "
                 "(generalization gap)",
                 f"{full['generalization_gap']:+.4f}", f"{lora['generalization_gap']:+.4f}",
                 _verdict(lora["generalization_gap"] < full["generalization_gap"]),
                 "holds if LoRA's generalization gap is smaller"),
    ]
    reduced = [i for i, f in enumerate(comparison["fractions"]) if f < 1.0] or list(range(len(comparison["fractions"])))
    # mean advantage over the reduced fractions (area between the learning curves): a tie where neither method
    # has learned anything yet is no evidence either way, so no counting of wins
    advantage = sum(metric.worse_by(full["curve"][i], lora["curve"][i]) for i in reduced) / len(reduced)
    curve = lambda entry: ", ".join(f"{comparison['fractions'][i]:g}: {entry['curve'][i]:.4f}" for i in reduced)  # noqa: E731
    rows.append(ClaimRow("LoRA needs less data", f"held-out {name} at reduced data fractions (LoRA's mean "
                         f"advantage {advantage:+.4f})", curve(full), curve(lora), _verdict(advantage > 0),
                         "holds if, averaged over the fractions below 1, LoRA's held-out metric is better than "
                         "full fine-tuning's"))
    if comparison.get("probe") and "probe_drop" in full and "probe_drop" in lora:
        before = comparison["probe_before"]
        rows.append(ClaimRow("LoRA preserves pretrained knowledge (less forgetting)",
                             f"{comparison['probe']}: before {before:.4f}, drop after training",
                             f"{full['probe_after']:.4f} (drop {full['probe_drop']:+.4f})",
                             f"{lora['probe_after']:.4f} (drop {lora['probe_drop']:+.4f})",
                             # when neither method lost any of the capability there is nothing to compare
                             "not judged" if max(full["probe_drop"], lora["probe_drop"]) <= 0
                             else _verdict(lora["probe_drop"] < full["probe_drop"]),
                             "holds if LoRA's drop of the original capability is smaller; not judged when "
                             "neither method lost any of it (negative drop: it improved)"))
    else:
        rows.append(ClaimRow("LoRA preserves pretrained knowledge (less forgetting)", "no probe for this task",
                             "-", "-", _verdict(None), "needs a knowledge probe (text tasks)"))
    ten = next(s for s in comparison["serving"] if s["tasks"] == 10)
    rows.append(ClaimRow("One base serves many tasks cheaply", "bytes for 10 tasks: 10 adapters + 1 base vs 10 "
                         "full copies", _bytes(ten["full_bytes"]), _bytes(ten["lora_bytes"]),
                         _verdict(ten["lora_bytes"] < 0.5 * ten["full_bytes"]),
                         "holds if 10 adapters + one base take less than half the bytes of 10 full copies"))
    return rows


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MB"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def write_compare_report(comparison: dict[str, Any], runs: dict[str, dict[float, dict[str, Any]]],
                         out: Path) -> Path:
    from . import report as rp

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
    doc.figure(rp.grouped_bars(["trainable params", "checkpoint MB", "peak MB, training steps", "peak MB, whole run"],
                               {m: [e["trainable_params"], e["checkpoint_bytes"] / 1e6, e["train_peak_mb"] or 0.0,
                                    e["peak_memory_mb"]] for m, e in (("full", full), ("lora", lora))},
                               "value (log scale)",
                               "Parameters, checkpoint size and peak memory", log=True),
               "costs.png", "Log scale; labels give the values.")
    doc.figure(rp.grouped_bars(["wall s / step", "CPU s / step", "wall min total", "CPU min total"],
                               {m: [e["step_time_s"], e["step_cpu_s"], e["train_time_s"] / 60, e["cpu_time_s"] / 60]
                                for m, e in (("full", full), ("lora", lora))}, "seconds per step, minutes in total",
                               "Training time"),
               "time.png", "Median optimizer step and whole run, wall clock and the process's CPU time.")
    doc.figure(rp.loss_curves({m: e["history"] for m, e in (("full", full), ("lora", lora))},
                              "Training loss at the full budget"), "loss.png", "Per-step loss; thick: 10-step mean.")
    doc.heading("Serving N tasks")
    doc.table(["tasks", "N adapters + 1 base", "N full copies", "ratio"],
              [[s["tasks"], _bytes(s["lora_bytes"]), _bytes(s["full_bytes"]), f"{s['lora_bytes'] / s['full_bytes']:.3f}"]
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


def _load(entry: dict[str, Any]) -> str:
    values = [v[0] for v in entry.get("load_average", []) if v]
    return "/".join(f"{v:.1f}" for v in values) or "?"


# =========================================================================================================
# sweep
# =========================================================================================================
def sweep(recipe_name: str, ranks: Sequence[int], lrs: Sequence[float] | None = None, overrides: Sequence[str] = (),
          output: str | Path | None = None, isolate: bool = True, log: Log = print) -> dict[str, Any]:
    """LoRA at every rank x learning rate; alpha follows the recipe's alpha / r ratio so the update scale s
    stays fixed. Writes ``sweep.json`` and a report with metric vs rank and vs trainable parameters."""
    from .train import load_recipe

    base = load_recipe(recipe_name, list(overrides))
    if base.method != "lora":
        raise ConfigError(f"sweep varies the LoRA rank; recipe {base.name} has method={base.method}")
    ratio = float(base.lora.get("alpha", 2 * base.lora.get("r", 8))) / float(base.lora.get("r", 8))
    lrs = list(lrs or [base.train.lr])
    metric = main_metric(base.task)
    out = Path(output or Path("runs") / f"sweep-{base.name}")
    limits = rank_limits(base)
    started = time.perf_counter()
    rows = []
    log(f"sweep {base.name}: ranks {list(ranks)} x lrs {lrs} (alpha = {ratio:g} x r)")
    for lr in lrs:
        for r in ranks:
            extra = ["method=lora", *rank_overrides(r, ratio, limits), f"train.lr={lr}", "train.progress=false"]
            record = launch(RunSpec(recipe_name, [*overrides, *extra], out / f"r{r}-lr{lr:g}"), log, isolate=isolate)
            m = record["metrics"]
            rows.append({"r": r, "lr": lr, "held_out": m["eval"][metric.name], "train": m["train_eval"][metric.name],
                         "trainable_params": m["trainable_params"], "train_time_s": m["train_time_s"],
                         "step_time_s": record["step_time_s"], "step_cpu_s": record["step_cpu_s"],
                         "cpu_time_s": record["cpu_time_s"], "adapter_bytes": m["adapter_bytes"],
                         "run": str(out / f"r{r}-lr{lr:g}")})
    result = sweep_summary(rows, metric)
    result.update({"recipe": base.name, "overrides": list(overrides), "ranks": list(ranks), "lrs": lrs,
                   "alpha_ratio": ratio, "wall_time_s": time.perf_counter() - started,
                   "runs_time_s": sum(r["train_time_s"] for r in rows),
                   "runs_cpu_s": sum(r["cpu_time_s"] for r in rows), "machine": machine()})
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "sweep.json", result)
    write_sweep_report(result, out)
    log(f"best: r={result['best']['r']} lr={result['best']['lr']:g} {metric.name}={result['best']['held_out']:.4f}; "
        f"report: {out / 'report.md'}")
    return result


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
                        _verdict(max(at_lr) - min(at_lr) > TOLERANCE),
                        f"holds if best and worst rank differ by more than {TOLERANCE}")),
        asdict(ClaimRow("LoRA is sensitive to the learning rate", f"spread of held-out {metric.name} over learning "
                        f"rates at r={best['r']}", "-", f"{max(at_rank) - min(at_rank):.4f}" if len(at_rank) > 1 else "-",
                        _verdict(max(at_rank) - min(at_rank) > TOLERANCE if len(at_rank) > 1 else None),
                        f"holds if best and worst learning rate differ by more than {TOLERANCE}")),
    ]
    return {"metric": asdict(metric), "rows": rows, "best": best, "claims": claims}


def write_sweep_report(result: dict[str, Any], out: Path) -> Path:
    from . import report as rp

    metric = Metric(**result["metric"])
    doc = rp.Report(f"LoRA rank sweep: {result['recipe']}")
    doc.text(f"Ranks {result['ranks']} x learning rates {result['lrs']}, alpha = {result['alpha_ratio']:g} x r; "
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
                _bytes(r["adapter_bytes"]), f"{r['step_time_s']:.3f}", f"{r['train_time_s']:.0f}"]
               for r in result["rows"]])
    by_lr = {f"lr {lr:g}": [next(r["held_out"] for r in result["rows"] if r["r"] == k and r["lr"] == lr)
                            for k in result["ranks"]] for lr in result["lrs"]}
    params = [next(r["trainable_params"] for r in result["rows"] if r["r"] == k) for k in result["ranks"]]
    doc.figure(rp.rank_sweep(result["ranks"], by_lr, params, metric.name), "rank_sweep.png",
               f"Held-out {metric.name} against rank and against trainable parameters.")
    doc.write(out)
    return out


# =========================================================================================================
# recommend
# =========================================================================================================
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


RACE_FACTOR = 4  # the race's second arm: this many times the spectrum's rank


def race_arms(rank: int, lr: float, max_rank: int = 64) -> list[tuple[int, float]]:
    """The race's arms: the spectrum's rank at the range test's learning rate, and `RACE_FACTOR` x that rank
    (capped at ``max_rank``) at the same rank x lr. At fixed alpha / r, Adam moves every entry of B by about lr
    per step, so the initial change of s·B·A grows with r: equal r x lr starts both arms with the same step."""
    wide = min(max_rank, RACE_FACTOR * rank)
    return [(rank, lr)] + ([(wide, float(f"{lr * rank / wide:.3g}"))] if wide > rank else [])


def recommend(recipe_name: str, overrides: Sequence[str] = (), output: str | Path | None = None,
              grad_batches: int = 32, energy: float = 0.9, lr_steps: int = 40, lr_min: float = 1e-5,
              lr_max: float = 1e-1, max_rank: int = 64, sweep_dir: str | Path | None = None,
              isolate: bool = True, race: bool = False, log: Log = print) -> dict[str, Any]:
    """Suggest a LoRA rank and learning rate from two cheap measurements, and state the evidence.

    Each probe takes at most as many steps as one training run of the recipe (at least 8 batches for the
    rank, 12 steps for the learning rate).

    Rank: the gradient of every targeted weight, summed over ``grad_batches`` training batches at the base
    model (what a short full fine-tuning with SGD would add to W), is decomposed per layer; each layer needs
    as many singular directions as hold ``energy`` of its squared singular values; the suggestion is the
    power of two at or above the median layer (`suggest_rank`). Learning rate: a range test on LoRA at that
    rank, ``lr_steps`` steps from ``lr_min`` to ``lr_max`` (`suggest_lr`).

    With ``race``, the suggestion and a wider arm (`race_arms`) are each trained at the recipe's budget (the
    sweep's, with ``sweep_dir``) and the one with the better validation metric is suggested: two training runs
    more, so it costs more, but the rank is then checked against the budget rather than read off a gradient at
    step 0.

    With ``sweep_dir`` (a `sweep` output), the suggestion is trained at the sweep's budget (with ``race``: the
    chosen arm's run is that training) and compared with the sweep's best run.
    """
    from .analyze import energy_rank, singular_values
    from .data import load_dataset
    from .evaluate import encode, forward, loss_sum
    from .inject import inject, targeting_report
    from .models import load_model
    from .train import _seed_everything, load_recipe, run_steps

    recipe = load_recipe(recipe_name, list(overrides))
    if recipe.method != "lora":
        raise ConfigError(f"recommend suggests LoRA settings; recipe {recipe.name} has method={recipe.method}")
    out = Path(output or Path("runs") / f"recommend-{recipe.name}")
    args = recipe.train
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    _seed_everything(args.seed)  # the base model's dropout in both probes and LoRA's A init draw from it
    splits = load_dataset(recipe.data, seed=args.seed)
    rows = splits.train if args.max_train_examples is None else splits.train.take(args.max_train_examples)
    # neither probe costs more steps than one training run of the recipe (short runs: 20 steps of MNIST)
    run_length = run_steps(len(rows), args)[1]
    grad_batches, lr_steps = min(grad_batches, max(run_length, 8)), min(lr_steps, max(run_length, 12))
    num_labels = len(splits.train.labels) if recipe.task != "causal-lm" and splits.train.labels else None
    loaded = load_model(recipe.model, task=recipe.task, num_labels=num_labels, seed=args.seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    config = recipe.lora_config(loaded.path or loaded.name)
    targets = [row.name for row in targeting_report(model, config).targeted]
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(rows), generator=generator)

    def batch(k: int) -> dict[str, torch.Tensor]:
        start = (k * args.batch_size) % max(1, len(rows) - args.batch_size + 1)
        picked = [rows[int(i)] for i in order[start:start + args.batch_size]]
        return encode(recipe.task, picked, tokenizer, args.max_length, recipe.image_size)

    # -- rank: spectrum of the accumulated gradient of each targeted weight -------------------------------
    log(f"recommend {recipe.name}: gradients of {len(targets)} target weights over {grad_batches} batches")
    pristine = copy.deepcopy(model.state_dict())
    model.train()
    model.requires_grad_(False)
    weights = {name: model.get_submodule(name).weight for name in targets}
    for w in weights.values():
        w.requires_grad_(True)
    for k in range(grad_batches):
        b = batch(k)
        total, count = loss_sum(recipe.task, forward(model, recipe.task, b), b["labels"])
        (total / max(1, count)).backward()  # .grad sums over the batches
    layers = []
    for name, w in weights.items():
        sigma = singular_values(w.grad)
        layers.append({"name": name, "shape": list(w.shape), "energy_rank": energy_rank(sigma, energy),
                       "sigma_top": sigma[:8].tolist()})
        w.grad = None
    rank = suggest_rank([x["energy_rank"] for x in layers], max_rank)
    rank_time = time.perf_counter() - started
    log(f"  per-layer ranks (median {statistics.median([x['energy_rank'] for x in layers]):g}) -> r={rank} "
        f"({rank_time:.0f} s)")

    # -- learning rate: range test on LoRA at that rank --------------------------------------------------
    model.load_state_dict(pristine)
    ratio = float(recipe.lora.get("alpha", 2 * recipe.lora.get("r", 8))) / float(recipe.lora.get("r", 8))
    limits = rank_limits(recipe, model)
    inject(model, recipe_from(recipe, rank, ratio, limits).lora_config(loaded.path or loaded.name))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr_min, weight_decay=args.weight_decay)
    lrs, losses = [], []
    for k in range(lr_steps):
        lr = lr_min * (lr_max / lr_min) ** (k / max(1, lr_steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        b = batch(grad_batches + k)  # rows the rank probe did not see first
        optimizer.zero_grad(set_to_none=True)
        total, count = loss_sum(recipe.task, forward(model, recipe.task, b), b["labels"])
        loss = total / max(1, count)
        loss.backward()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lrs.append(lr)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]) or (k > 5 and losses[-1] > 4 * min(losses)):
            break  # diverged: the range above this is useless
    lr, smoothed = suggest_lr(lrs, losses)
    log(f"  LR range test over {len(lrs)} steps -> lr={lr:.3g}")
    spectrum = {"rank": rank, "lr": lr}
    arms: list[dict[str, Any]] = []
    if race:
        del loaded, model, weights, pristine, optimizer, params  # free memory: the arms train in their own processes
        base = (json.loads((Path(sweep_dir) / "sweep.json").read_text())["overrides"] if sweep_dir is not None
                else list(overrides))
        metric = main_metric(recipe.task)
        for arm_rank, arm_lr in race_arms(rank, lr, max_rank):
            extra = ["method=lora", *rank_overrides(arm_rank, ratio, limits), f"train.lr={arm_lr:.3g}",
                     "train.progress=false"]
            record = launch(RunSpec(recipe_name, [*base, *extra], out / f"race-r{arm_rank}"), log, isolate=isolate)
            validation = [h["validation"] for h in record["metrics"]["history"] if "validation" in h]
            if not validation or metric.name not in validation[-1]:
                raise ConfigError(f"--race picks by the validation {metric.name}, but run {out / f'race-r{arm_rank}'}"
                                  " validated nothing: validation runs at the end of each epoch (fix: let the runs "
                                  "finish an epoch, e.g. no train.max_steps, or run recommend without --race)")
            arms.append({"rank": arm_rank, "lr": arm_lr, "validation": validation[-1][metric.name],
                         "held_out": record["metrics"]["eval"][metric.name], "cpu_time_s": record["cpu_time_s"],
                         "train_time_s": record["metrics"]["train_time_s"], "run": str(out / f"race-r{arm_rank}"),
                         "record": record})
        chosen = arms[0]
        for arm in arms[1:]:
            if metric.better(arm["validation"], chosen["validation"]):
                chosen = arm
        rank, lr = chosen["rank"], chosen["lr"]
        log("  race: " + ", ".join(f"r={a['rank']} lr={a['lr']:.3g} validation {metric.name} {a['validation']:.4f}"
                                   for a in arms) + f" -> r={rank}")
    total_time = time.perf_counter() - started
    cpu_time = time.process_time() - cpu_started + sum(a["cpu_time_s"] for a in arms)  # the arms' own processes
    log(f"  recommend took {total_time:.0f} s")
    result: dict[str, Any] = {
        "recipe": recipe.name, "overrides": list(overrides), "rank": rank, "lr": lr, "alpha": ratio * rank,
        "energy": energy, "grad_batches": grad_batches, "layers": layers, "rank_time_s": rank_time,
        "lr_range": {"lrs": lrs, "losses": losses, "smoothed": smoothed}, "time_s": total_time,
        "cpu_time_s": cpu_time,
        "recipe_defaults": {"r": recipe.lora.get("r"), "lr": recipe.train.lr}, "machine": machine(),
        "spectrum_suggestion": spectrum, "race": [{k: v for k, v in a.items() if k != "record"} for a in arms],
    }
    if sweep_dir is not None:
        chosen_record = next((a["record"] for a in arms if a["rank"] == rank), None)
        result["check"] = check_against_sweep(recipe_name, rank, lr, ratio, limits, total_time, cpu_time,
                                              Path(sweep_dir), out, log, isolate, record=chosen_record)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "recommend.json", result)
    write_recommend_report(result, out)
    log(f"report: {out / 'report.md'}")
    return result


def rank_limits(recipe: Any, model: torch.nn.Module | None = None) -> dict[str, int]:
    """Targeted layers whose weight allows fewer than 64 directions (e.g. a 3x3 conv on 3 channels: 27),
    by name: where a sweep's rank exceeds them, the rank is capped there."""
    from .inject import targeting_report
    from .layers import wrapper_for

    if model is None:
        from .data import load_dataset
        from .models import load_model

        labels = load_dataset(recipe.data, seed=recipe.train.seed).train.labels if recipe.task != "causal-lm" else None
        model = load_model(recipe.model, task=recipe.task, num_labels=len(labels) if labels else None).model
    config = recipe_from(recipe, 1, 1.0, {}).lora_config()
    modules = dict(model.named_modules())
    limits = {}
    for row in targeting_report(model, config).targeted:
        limit = wrapper_for(modules[row.name]).max_rank(modules[row.name])
        if limit < 64:
            limits[row.name] = limit
    return limits


def rank_overrides(rank: int, ratio: float, limits: dict[str, int]) -> list[str]:
    """Recipe overrides for LoRA rank ``rank``, alpha = ratio x rank (the scale s fixed), capped per `rank_limits`."""
    lora = _lora_at_rank({}, rank, ratio, limits)
    out = [f"lora.r={rank}", f"lora.alpha={ratio * rank:g}"]
    for key in ("rank_pattern", "alpha_pattern"):
        if lora.get(key):
            out.append(f"lora.{key}={json.dumps(lora[key])}")  # JSON is YAML: the override parser reads it
    return out


def _lora_at_rank(lora: dict[str, Any], rank: int, ratio: float, limits: dict[str, int]) -> dict[str, Any]:
    capped = {re.escape(name): limit for name, limit in limits.items() if limit < rank}
    changed = {**lora, "r": rank, "alpha": ratio * rank}
    if capped:
        changed["rank_pattern"] = {**lora.get("rank_pattern", {}), **capped}
        changed["alpha_pattern"] = {**lora.get("alpha_pattern", {}),
                                    **{key: ratio * limit for key, limit in capped.items()}}
    return changed


def recipe_from(recipe: Any, rank: int, ratio: float, limits: dict[str, int]) -> Any:
    """The recipe with another rank (alpha keeps the recipe's alpha / r ratio), capped per layer by ``limits``."""
    changed = copy.deepcopy(recipe)
    changed.lora = _lora_at_rank(changed.lora, rank, ratio, limits)
    return changed


def check_against_sweep(recipe_name: str, rank: int, lr: float, ratio: float, limits: dict[str, int],
                        recommend_time: float,
                        recommend_cpu: float, sweep_dir: Path, out: Path, log: Log, isolate: bool = True,
                        record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the suggestion at the sweep's budget (or take ``record``, a run of it already trained there, as the
    race's); is it within `TOLERANCE` of the sweep's best run? The cost fraction compares CPU times on a CPU
    machine (shared cores make wall times noisy), wall times on a GPU."""
    result = json.loads((sweep_dir / "sweep.json").read_text())
    metric = Metric(**result["metric"])
    if record is None:
        extra = ["method=lora", *rank_overrides(rank, ratio, limits), f"train.lr={lr:.3g}", "train.progress=false"]
        record = launch(RunSpec(recipe_name, [*result["overrides"], *extra], out / "check"), log, isolate=isolate)
    value = record["metrics"]["eval"][metric.name]
    best = result["best"]
    gap = metric.worse_by(value, best["held_out"])
    return {"held_out": value, "sweep_best": best, "gap": gap, "within_tolerance": gap <= TOLERANCE,
            "verdict": _verdict(gap <= TOLERANCE), "sweep_runs_time_s": result["runs_time_s"],
            "check_train_time_s": record["metrics"]["train_time_s"], "sweep_runs_cpu_s": result["runs_cpu_s"],
            "cost_fraction": (recommend_time / result["runs_time_s"] if result["machine"].get("cuda")
                              else recommend_cpu / result["runs_cpu_s"]),
            "rule": f"holds if the suggestion's held-out {metric.name} is within {TOLERANCE} of the sweep's best"}


def write_recommend_report(result: dict[str, Any], out: Path) -> Path:
    from . import report as rp

    doc = rp.Report(f"Rank and learning-rate suggestion: {result['recipe']}")
    doc.text(f"Suggested: r={result['rank']} (alpha {result['alpha']:g}), lr={result['lr']:.3g}; the recipe uses "
             f"r={result['recipe_defaults']['r']}, lr={result['recipe_defaults']['lr']:g}. Cost: "
             f"{result['time_s']:.0f} s wall, {result['cpu_time_s']:.0f} s CPU ({result['rank_time_s']:.0f} s wall "
             "for the rank).")
    doc.heading("Evidence: rank")
    doc.text(f"Gradient of each targeted weight summed over {result['grad_batches']} training batches at the base "
             f"model; per layer, the number of singular directions holding {int(result['energy'] * 100)}% of its "
             "squared singular values. Suggestion: the power of two at or above the median layer.")
    names = [x["name"] for x in result["layers"]]
    doc.figure(rp.rank_estimates([n[-40:] for n in names], [x["energy_rank"] for x in result["layers"]],
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
                    f"{a['validation']:.4f}", f"{a['held_out']:.4f}", f"{a['train_time_s']:.0f} s ({a['cpu_time_s']:.0f} s)"]
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
                    f"{check['cost_fraction']:.3f}", _verdict(check["cost_fraction"] < 0.5),
                    "holds if suggesting takes less than half the sweep's time"]])
    doc.write(out)
    return out


# =========================================================================================================
# command line
# =========================================================================================================
def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe name under recipes/ or a YAML file")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. train.max_train_examples=3200")
    p.add_argument("--output", "-o", default=None, help="report folder (default: runs/COMMAND-RECIPE)")


def _compare_args(p: argparse.ArgumentParser) -> None:
    _recipe_args(p)
    p.add_argument("--data-fractions", type=_floats, default=[0.1, 0.25, 0.5, 1.0],
                   help="fractions of the recipe's training examples (default 0.1,0.25,0.5,1.0)")
    p.add_argument("--full-lr", type=float, default=None, help=f"default: LoRA lr x {FULL_LR_RATIO}")
    p.add_argument("--lora-lr", type=float, default=None, help="default: the recipe's train.lr")
    p.add_argument("--keep-weights", action="store_true", help="keep the full fine-tuned model folders")
    p.add_argument("--no-probe", action="store_true", help="skip the knowledge-preservation probe")


@command("compare", _compare_args)
def _compare_cli(args: argparse.Namespace) -> int:
    """Full fine-tuning vs LoRA on a recipe: claims table with computed verdicts, plots, report."""
    result = compare(args.recipe, args.overrides, args.data_fractions, args.output, args.full_lr, args.lora_lr,
                     args.keep_weights, probe=not args.no_probe)
    for row in result["claims"]:
        print(f"  {row['verdict']:<14} {row['claim']}: full {row['full']} | LoRA {row['lora']}")
    return 0


def _sweep_args(p: argparse.ArgumentParser) -> None:
    _recipe_args(p)
    p.add_argument("--ranks", type=_ints, default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--lrs", type=_floats, default=None, help="default: the recipe's train.lr")


@command("sweep", _sweep_args)
def _sweep_cli(args: argparse.Namespace) -> int:
    """LoRA rank (x learning-rate) sweep with metric-vs-rank and metric-vs-parameters plots."""
    sweep(args.recipe, args.ranks, args.lrs, args.overrides, args.output)
    return 0


def _recommend_args(p: argparse.ArgumentParser) -> None:
    _recipe_args(p)
    p.add_argument("--grad-batches", type=int, default=32, help="batches whose gradients give the rank")
    p.add_argument("--energy", type=float, default=0.9, help="share of gradient energy a layer's rank must hold")
    p.add_argument("--lr-steps", type=int, default=40, help="steps of the learning-rate range test")
    p.add_argument("--max-rank", type=int, default=64)
    p.add_argument("--sweep", default=None, help="a sweep folder: train the suggestion and compare with its best")
    p.add_argument("--race", action="store_true",
                   help=f"train the suggestion and a {RACE_FACTOR}x rank (same r x lr) at the recipe's budget and "
                        "keep the better on the validation split (two training runs more)")


@command("recommend", _recommend_args)
def _recommend_cli(args: argparse.Namespace) -> int:
    """Suggest a LoRA rank (gradient spectrum) and learning rate (range test), with the evidence."""
    result = recommend(args.recipe, args.overrides, args.output, args.grad_batches, args.energy, args.lr_steps,
                       max_rank=args.max_rank, sweep_dir=args.sweep, race=args.race)
    print(f"suggested: lora.r={result['rank']} lora.alpha={result['alpha']:g} train.lr={result['lr']:.3g}")
    check = result.get("check")
    if check:
        print(f"check: held-out {check['held_out']:.4f} vs sweep best {check['sweep_best']['held_out']:.4f} "
              f"(r={check['sweep_best']['r']}): {check['verdict']}; cost {100 * check['cost_fraction']:.0f}% of the sweep")
    return 0
