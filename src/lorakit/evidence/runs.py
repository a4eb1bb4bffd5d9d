"""One run = one process: a training run (or a base-model probe) of a recipe in a fresh Python process.

Each run's peak memory (``ru_maxrss``, a per-process peak) and its time belong to that run alone. A run folder
whose ``run.json`` records the same spec is reused, so an interrupted ``lorakit compare`` continues where it
stopped. Checkpoints are deleted after each run; full fine-tuned weights too unless ``keep_weights``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import LorakitError
from ..files import write_json
from .probes import run_probe

#: version of run.json; a run recorded with another is run again
RUN_FORMAT = 2

Log = Callable[[str], None]

_CHILD = "import sys; from lorakit.evidence.runs import run_child; sys.exit(run_child(sys.argv[1]))"


def run_child(payload_json: str) -> int:
    """Entry point of a run process: `execute` the JSON payload."""
    execute(json.loads(payload_json))
    return 0


def execute(payload: dict[str, Any]) -> dict[str, Any]:
    """One run. ``mode`` ``train``: train the recipe, timing every step (wall and CPU), delete the checkpoint,
    score the probe on the result. ``probe``: score the untrained base model. Writes ``run.json``."""
    from .. import distributed
    from ..recipes import load_recipe, load_recipe_model, load_run
    from ..train import train

    out = Path(payload["output"])
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(payload["recipe"], payload["overrides"])
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    probe = payload.get("probe")
    record: dict[str, Any] = {"spec": payload, "load_average_start": os.getloadavg()}
    device = distributed.setup(recipe.train.device).device  # the probes run where training runs
    if payload["mode"] == "probe":
        loaded = load_recipe_model(recipe, device=device)
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
            loaded.model.to(device)
            record["probe"] = run_probe(probe, loaded.model, loaded.tokenizer)
    write_json(out / "run.json", record)
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


def check_specs(specs: Sequence[RunSpec]) -> None:
    """Read and check every run's recipe (keys, values, this machine's devices and data files) before the first
    run starts: a setting one run cannot take fails at once with its fix, not in a child process minutes later
    (e.g. ``quantize`` with the full fine-tuning runs of `compare`)."""
    from ..recipes import check_runtime, load_recipe

    for spec in specs:
        check_runtime(load_recipe(spec.recipe, spec.overrides))


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


def machine() -> dict[str, Any]:
    """What the numbers were measured on (reports print it; verdicts pick wall or CPU time from ``cuda``)."""
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__}
