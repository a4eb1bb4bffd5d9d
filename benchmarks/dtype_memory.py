"""Peak memory of a recipe with the frozen base stored in fp32 vs bf16 (``train.dtype``), and of loading a
quantized base the old way (whole, then `quantize_model`) vs while reading (`lorakit.quant_load`).

    .venv/bin/python benchmarks/dtype_memory.py sentiment-minilm            # both dtypes, one process each
    .venv/bin/python benchmarks/dtype_memory.py instruct-smollm2 eval.generate_examples=0 eval.max_examples=64
    .venv/bin/python benchmarks/dtype_memory.py --quantized-load smollm2 causal-lm   # int8/nf4, old vs new

Every variant runs in its own fresh process with one thread. Two measures, both printed:
**tracked** = peak bytes of live tensors over the whole run (loading, evaluation, training; `LiveTensorBytes`,
what ``torch.cuda.max_memory_allocated`` reports on a GPU), the model's parameters and buffers counted from the
moment they are loaded (a memory-mapped weight is no op's output, so it must be added by hand); **rss** = the
resident-set high-water mark minus the resident set after the imports (the interpreter and libraries), i.e.
what the process really held, allocator caching included. Writes benchmarks/results/dtype-NAME.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def one_run(recipe_name: str, overrides: list[str], out: str) -> dict:
    import torch

    import lorakit.train as lktrain
    from lorakit.memory import LiveTensorBytes, resident_kib
    from lorakit.recipes import load_recipe

    torch.set_num_threads(1)
    baseline = resident_kib("VmRSS")
    recipe = load_recipe(recipe_name, [*overrides, "train.progress=false", "train.num_threads=1"])
    load = lktrain.load_recipe_model

    def counted_load(*args, **kwargs):  # the weights count from the moment they exist
        loaded = load(*args, **kwargs)
        for tensor in [*loaded.model.parameters(), *loaded.model.buffers()]:
            tracker.track(tensor)
        return loaded

    lktrain.load_recipe_model = counted_load
    with LiveTensorBytes() as tracker:
        metrics = lktrain.train(recipe, out)
    return {"recipe": recipe_name, "overrides": overrides, "dtype": recipe.train.dtype,
            "tracked_peak_mb": tracker.peak / 2**20, "rss_peak_mb": (resident_kib("VmHWM") - baseline) / 1024,
            "eval": metrics["eval"], "base_eval": metrics["base_eval"], "steps": metrics["steps"]}


def one_load(model: str, task: str, scheme: str, path: str) -> dict:
    """Peak RSS of loading ``model`` quantized: ``old`` (fp32 whole, then quantize_model) or ``new``."""
    import torch

    import accelerate  # noqa: F401 - imported before the baseline, as everything else (quant_load uses it)
    import lorakit.quant_load  # noqa: F401
    from lorakit.memory import resident_kib
    from lorakit.models import load_model
    from lorakit.quant import quantize_model, weight_bytes
    from transformers.models.bert import modeling_bert  # noqa: F401 - the model code, imported in both variants
    from transformers.models.llama import modeling_llama  # noqa: F401

    torch.set_num_threads(1)
    baseline = resident_kib("VmRSS")
    if path == "old":
        loaded = load_model(model, task)
        quantize_model(loaded.model, scheme)  # type: ignore[arg-type]
    else:
        loaded = load_model(model, task, quantize=scheme)
    model_bytes = sum(t.untyped_storage().nbytes() for t in
                      {id(t): t for t in [*loaded.model.parameters(), *loaded.model.buffers()]}.values())
    return {"model": model, "scheme": scheme, "path": path,
            "rss_peak_mb": (resident_kib("VmHWM") - baseline) / 1024,
            "rss_end_mb": (resident_kib("VmRSS") - baseline) / 1024, "model_tensors_mb": model_bytes / 2**20,
            "quantized_weights_mb": weight_bytes(loaded.model)[0] / 2**20}


def _child(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True, env=env)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def quantized_loads(model: str, task: str, repeats: int = 3) -> int:
    """Each (scheme, path) ``repeats`` times, interleaved; the ratio is of the median peaks (a small model's
    RSS moves by tens of MiB from run to run)."""
    runs = [_child("--one-load", model, task, s, p) for _ in range(repeats) for s in ("int8", "nf4")
            for p in ("old", "new")]
    rows = {}
    for s in ("int8", "nf4"):
        for p in ("old", "new"):
            peaks = sorted(r["rss_peak_mb"] for r in runs if (r["scheme"], r["path"]) == (s, p))
            rows[(s, p)] = {"scheme": s, "path": p, "rss_peak_mb": peaks[len(peaks) // 2], "all_peaks_mb": peaks}
    ratios = {s: rows[(s, "new")]["rss_peak_mb"] / rows[(s, "old")]["rss_peak_mb"] for s in ("int8", "nf4")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"quantized-load-{model}.json").write_text(json.dumps(
        {"medians": list(rows.values()), "runs": runs, "rss_peak_ratio_new_over_old": ratios,
         "load": os.getloadavg()}, indent=2)
        + "\n")
    for row in rows.values():
        print(json.dumps(row))
    print("new / old loading peak rss (medians): " + ", ".join(f"{s} {r:.3f}" for s, r in ratios.items()))
    return 0


def main() -> int:
    if sys.argv[1] == "--one":
        print(json.dumps(one_run(sys.argv[2], sys.argv[4:], sys.argv[3])))
        return 0
    if sys.argv[1] == "--one-load":
        print(json.dumps(one_load(*sys.argv[2:6])))
        return 0
    if sys.argv[1] == "--quantized-load":
        return quantized_loads(sys.argv[2], sys.argv[3])
    name, overrides = sys.argv[1], sys.argv[2:]
    rows = []
    for dtype in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory() as out:
            rows.append(_child("--one", name, out, *overrides, f"train.dtype={dtype}"))
    fp32, bf16 = rows
    summary = {"runs": rows, "tracked_ratio": bf16["tracked_peak_mb"] / fp32["tracked_peak_mb"],
               "rss_ratio": bf16["rss_peak_mb"] / fp32["rss_peak_mb"], "load": os.getloadavg()}
    RESULTS.mkdir(exist_ok=True)
    # a run under another allocator setting (e.g. MALLOC_MMAP_THRESHOLD_=65536) is its own result file
    suffix = f"-mmap{os.environ['MALLOC_MMAP_THRESHOLD_']}" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else ""
    summary["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    (RESULTS / f"dtype-{name}{suffix}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"bf16 / fp32 peak: tracked {summary['tracked_ratio']:.3f}, rss {summary['rss_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
