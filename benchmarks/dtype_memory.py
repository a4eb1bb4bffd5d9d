"""Peak memory and held-out metric of a recipe with the frozen base stored in fp32 vs bf16 (``train.dtype``).

    .venv/bin/python benchmarks/dtype_memory.py sentiment-minilm            # both dtypes, one process each
    .venv/bin/python benchmarks/dtype_memory.py instruct-smollm2 train.max_train_examples=256

Each run is `lorakit.train.train` in its own process with one thread. Measured (see benchmarks/plan_measure.py):
**tracked** = peak bytes of live tensors over the whole run (loading, evaluation, training), and **rss** = the
resident-set high-water mark minus the resident set after the imports (the interpreter and libraries).
Writes benchmarks/results/dtype-RECIPE.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def one_run(recipe_name: str, overrides: list[str], out: str) -> dict:
    import torch

    from lorakit.memory import LiveTensorBytes, resident_kib
    from lorakit.recipes import load_recipe
    from lorakit.train import train

    torch.set_num_threads(1)
    baseline = resident_kib("VmRSS")
    recipe = load_recipe(recipe_name, [*overrides, "train.progress=false", "train.num_threads=1"])
    with LiveTensorBytes() as tracker:
        metrics = train(recipe, out)
    return {"recipe": recipe_name, "overrides": overrides, "dtype": recipe.train.dtype,
            "tracked_peak_mb": tracker.peak / 2**20, "rss_peak_mb": (resident_kib("VmHWM") - baseline) / 1024,
            "eval": metrics["eval"], "base_eval": metrics["base_eval"], "steps": metrics["steps"]}


def main() -> int:
    if sys.argv[1] == "--one":
        print(json.dumps(one_run(sys.argv[2], sys.argv[4:], sys.argv[3])))
        return 0
    name, overrides = sys.argv[1], sys.argv[2:]
    rows = []
    for dtype in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run([sys.executable, __file__, "--one", name, out, *overrides, f"train.dtype={dtype}"],
                                  check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    fp32, bf16 = rows
    summary = {"runs": rows, "tracked_ratio": bf16["tracked_peak_mb"] / fp32["tracked_peak_mb"],
               "rss_ratio": bf16["rss_peak_mb"] / fp32["rss_peak_mb"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"dtype-{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"bf16 / fp32 peak: tracked {summary['tracked_ratio']:.3f}, rss {summary['rss_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
