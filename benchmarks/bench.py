"""lorakit vs peft vs full fine-tuning, side by side: training step, peak memory, inference, mixed batches,
adapter save/load. One command; medians and ratios of medians.

    .venv/bin/python benchmarks/bench.py                  # MiniLM (8 x 128) and SmolLM2 (4 x 128), r=8, 2 threads
    .venv/bin/python benchmarks/bench.py --models minilm --steps 10
    .venv/bin/python benchmarks/bench.py --compiled       # also torch.compile'd training steps (MiniLM)
    .venv/bin/python benchmarks/bench.py --cases time-prefill   # long prompts of two adapters in one batch (not
                                                               # in the default run: SmolLM2 ~8 s a forward)
    python benchmarks/bench.py --device cuda --precision bf16 --model-dir minilm=DIR   # on a GPU

On a GPU (``--device cuda``) every timed call ends with ``torch.cuda.synchronize()`` and peak memory is
``torch.cuda.max_memory_allocated`` of the variant's own process (weights included) instead of peak RSS.
``--precision bf16`` runs forward passes under ``torch.autocast(bfloat16)`` for every variant alike (fp32
weights and optimizer state). ``--model-dir NAME=DIR`` loads that model from a Hugging Face folder instead of
the packaged one (e.g. a copy random-initialised from the same config where the weights cannot travel: timings
do not depend on the weights' values).

**Timings** alternate inside one process: a worker builds every variant it compares (e.g. the frozen-base floor,
lorakit and peft on attention and on all linear layers, full fine-tuning: separate copies of the same base) and
runs one step of each in turn, order reversed every round, so drifts of the machine (frequency, other tenants)
hit all variants alike; separate processes per variant differed by up to 20% on this machine for the same work.
Every timed step also records how much CPU *other* processes used meanwhile (/proc/stat minus our own
/proc/self/stat); steps where others took more than 10% of a core are discarded.
**Peak memory** needs a process per variant (peak RSS is per process): ``mem-*`` workers run two steps each.
Prints a table and writes benchmarks/results/bench.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"minilm": (8, 128), "smollm2": (4, 128)}
MIXED_ROWS = 64  # mixed-adapter batches: one row per adapter at 64 adapters
MIXED_TOKENS = {"minilm": 32, "smollm2": 16}
ATTENTION = {"minilm": ["query", "value"], "smollm2": ["q_proj", "v_proj"]}
TRAIN_VARIANTS = ["floor", "lorakit-attn", "peft-attn", "lorakit-all", "peft-all", "full"]
COMPILED_VARIANTS = ["lorakit-attn-compiled", "peft-attn-compiled"]  # torch.compile of the model (--compiled)
INFER_VARIANTS = ["infer-base", "infer-lorakit", "infer-lorakit-merged", "infer-peft", "infer-peft-merged"]
MIXED_COUNTS = (4, 16, 64)
#: time-prefill: rows x tokens of a batch of two adapters' long prompts (2,048 tokens per adapter: folded per run)
PREFILL_SHAPE = {"minilm": (8, 512), "smollm2": (2, 2048)}
CASES = ["time-train", "time-infer", "time-mixed", *(f"mem-{v}" for v in TRAIN_VARIANTS), "time-saveload"]


# -- worker side ------------------------------------------------------------------------------------------
DEVICE = "cpu"  # set in the worker from --device
PRECISION = "fp32"  # set in the worker from --precision
MODEL_DIRS: dict[str, str] = {}  # --model-dir NAME=DIR


def _sync() -> None:
    if DEVICE != "cpu":
        import torch

        torch.cuda.synchronize()


def _amp():
    """`lorakit.train`'s bf16 autocast on the benchmark's device for ``--precision bf16``, else nothing."""
    import torch

    from lorakit.train import autocast

    return autocast(PRECISION, torch.device(DEVICE))


def _peak_mb() -> float:
    """Peak memory of this process: CUDA allocations on a GPU, RSS on the CPU."""
    import resource

    if DEVICE != "cpu":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks used by this process)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    with open("/proc/self/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    own = int(parts[11]) + int(parts[12])  # utime + stime (this process, all threads)
    return busy, own


def _timed(fn, steps: int, warmup: int) -> dict:
    """`_alternate` of one function."""
    return _alternate({"x": fn}, steps, warmup)["x"]


def _alternate(fns: dict, steps: int, warmup: int) -> dict[str, dict]:
    """Median seconds of each function over ``steps`` clean calls, taking turns (order reversed every round).
    A call is clean when other processes used < 10% of a core meanwhile; a variant that never gets enough
    clean calls reports the median of all its calls with ``noisy: true``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    hz = os.sysconf("SC_CLK_TCK")
    names = list(fns)
    clean: dict[str, list[float]] = {k: [] for k in names}
    every: dict[str, list[float]] = {k: [] for k in names}
    for round_ in range(steps * 3):
        for k in (names if round_ % 2 == 0 else names[::-1]):
            if len(clean[k]) >= steps:
                continue
            busy0, own0 = _cpu_ticks()
            start = time.perf_counter()
            fns[k]()
            _sync()
            elapsed = time.perf_counter() - start
            busy1, own1 = _cpu_ticks()
            every[k].append(elapsed)
            if ((busy1 - busy0) - (own1 - own0)) / hz <= 0.10 * elapsed:
                clean[k].append(elapsed)
        if all(len(v) >= steps for v in clean.values()):
            break
    out = {}
    for k in names:
        noisy = len(clean[k]) < max(1, steps // 2)
        out[k] = {"median_s": statistics.median(every[k] if noisy else clean[k]), "kept": len(clean[k]),
                  "dropped": len(every[k]) - len(clean[k]), "noisy": noisy}
    return out


def _model(name: str):
    import torch

    from lorakit.models import load_model

    task = "causal-lm" if name == "smollm2" else "base"
    loaded = load_model(MODEL_DIRS.get(name, name), task=task)
    batch, seq = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (batch, seq), generator=gen).to(DEVICE)
    return loaded.model.to(DEVICE), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _out(model, inputs):
    with _amp():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _lora(name: str, model, library: str, targets, n: int = 1):
    """Add ``n`` r=8 adapters (B randomised so merged/unmerged work is real)."""
    import torch

    if library == "lorakit":
        import lorakit

        cfg = lorakit.LoraConfig(r=8, alpha=16, target_modules=targets)
        lorakit.inject(model, cfg, "a0")
        for i in range(1, n):
            lorakit.add_adapter(model, f"a{i}", cfg)
        wrapped = model
    else:
        import peft

        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)
        wrapped = peft.get_peft_model(model, cfg, adapter_name="a0")
        for i in range(1, n):
            wrapped.add_adapter(f"a{i}", cfg)
        wrapped.set_adapter("a0")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for pname, p in wrapped.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.01)
    return wrapped


def _train_step(name: str, base, inputs, variant: str):
    """A training-step function for ``variant`` on its own copy of ``base``."""
    import torch

    model = copy.deepcopy(base)
    if variant == "floor":  # frozen base, gradients flow to the inputs only: the cost LoRA cannot go below
        model.requires_grad_(False)
        embed = model.get_input_embeddings()
        params: list = []

        def forward():
            emb = embed(inputs["input_ids"]).detach().requires_grad_(True)
            with _amp():
                out = model(inputs_embeds=emb, attention_mask=inputs["attention_mask"])
            return out.logits if hasattr(out, "logits") else out.last_hidden_state
    elif variant == "full":
        params = list(model.parameters())

        def forward():
            return _out(model, inputs)
    else:
        library, scope, *compiled = variant.split("-")
        targets = ATTENTION[name] if scope == "attn" else "all-linear"
        model = _lora(name, model, library, targets)
        params = [p for p in model.parameters() if p.requires_grad]
        run = torch.compile(model) if compiled else model  # compiled during the warm-up steps

        def forward():
            return _out(run, inputs)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        out = forward()
        out.float().pow(2).mean().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def _saveload_cycle(name: str, base, library: str):
    """Save adapter ``a0`` (all linear layers) and load it back as a second adapter, removing the previous copy."""
    model = _lora(name, base, library, "all-linear")
    folder = Path(tempfile.mkdtemp())
    if library == "lorakit":
        import lorakit

        def cycle():
            lorakit.save_adapter(model, folder / "x", "a0")
            if "b" in lorakit.adapter_names(model):
                lorakit.delete_adapter(model, "b")
            lorakit.load_adapter(model, folder / "x", adapter_name="b")
    else:
        def cycle():
            model.save_pretrained(str(folder / "x"), selected_adapters=["a0"])
            if "b" in model.peft_config:
                model.delete_adapter("b")
            model.load_adapter(str(folder / "x" / "a0"), adapter_name="b")  # PEFT: non-default in a sub-folder
    return cycle


def _mixed_fns(name: str, base, shape: tuple[int, int], batches: dict[int, list[str]], label: str) -> dict:
    """Forward functions over ``shape`` (rows x tokens) inputs: each library's single-adapter batch
    (``{label}-{library}-1``) and, per entry of ``batches``, a batch whose rows use those adapters
    (``{label}-{library}-{n}``); lorakit also without folding adapters into temporary weights (``-unfolded``:
    `LoraLinear._folded_weight` / `_folded_runs`), the products a mixed batch otherwise computes."""
    import torch

    import lorakit
    from lorakit.layers import linear

    ids = torch.randint(100, 1000, shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    n_max = max(batches)
    lk = _lora(name, copy.deepcopy(base), "lorakit", "all-linear", n=n_max).eval()
    pf = _lora(name, copy.deepcopy(base), "peft", "all-linear", n=n_max).eval()

    def lk_run(names=None):
        if names is None:  # the reference: a plain batch with one active adapter, no routing
            return _out(lk, inputs)
        with lorakit.route(lk, names):
            return _out(lk, inputs)

    def unfolded(fn):
        def run():
            saved = linear.FOLD_RATIO, linear.RUN_FOLD_TOKENS
            linear.FOLD_RATIO = linear.RUN_FOLD_TOKENS = math.inf
            try:
                return fn()
            finally:
                linear.FOLD_RATIO, linear.RUN_FOLD_TOKENS = saved
        return run

    def pf_run(names=None):
        return _out(pf, inputs if names is None else {**inputs, "adapter_names": names})

    fns = {f"{label}-lorakit-1": lk_run, f"{label}-lorakit-1-unfolded": unfolded(lk_run), f"{label}-peft-1": pf_run}
    for n, names in batches.items():
        fns[f"{label}-lorakit-{n}"] = lambda names=names: lk_run(names)
        if label == "prefill":  # (short mixed rows never fold)
            fns[f"{label}-lorakit-{n}-unfolded"] = unfolded(lambda names=names: lk_run(names))
        fns[f"{label}-peft-{n}"] = lambda names=names: pf_run(names)
    return fns


def run_case(name: str, case: str, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    base, inputs = _model(name)
    result: dict = {}
    if case.startswith("time-train"):
        variants = TRAIN_VARIANTS + (COMPILED_VARIANTS if case.endswith("+compiled") else [])
        fns = {v: _train_step(name, base, inputs, v) for v in variants}
        result = {"variants": _alternate(fns, steps, warmup=2)}
    elif case.startswith("mem-"):
        step = _train_step(name, base, inputs, case[4:])
        del base
        result = _timed(step, 2, warmup=1)
    elif case == "time-infer":
        lk = _lora(name, copy.deepcopy(base), "lorakit", "all-linear")
        lk_merged = _lora(name, copy.deepcopy(base), "lorakit", "all-linear")
        pf = _lora(name, copy.deepcopy(base), "peft", "all-linear")
        pf_merged = _lora(name, copy.deepcopy(base), "peft", "all-linear")
        import lorakit

        lorakit.merge(lk_merged)
        pf_merged.merge_adapter()
        models = {"infer-base": base, "infer-lorakit": lk, "infer-lorakit-merged": lk_merged, "infer-peft": pf,
                  "infer-peft-merged": pf_merged}
        for m in models.values():
            m.eval()
        fns = {k: (lambda m=m: _out(m, inputs)) for k, m in models.items()}
        with torch.inference_mode():
            result = {"variants": _alternate(fns, steps, warmup=2)}
    elif case == "time-mixed":  # many adapters, rows interleaved (the general case), short rows
        batches = {n: [f"a{i % n}" for i in range(MIXED_ROWS)] for n in MIXED_COUNTS}
        fns = _mixed_fns(name, base, (MIXED_ROWS, MIXED_TOKENS[name]), batches, "mixed")
        del base
        with torch.inference_mode():
            result = {"variants": _alternate(fns, max(3, steps // 2), warmup=1)}
        for v in result["variants"].values():
            v["rows"] = MIXED_ROWS
    elif case == "time-prefill":  # long prompts of two adapters, rows grouped by adapter (as the server lays them out)
        rows, tokens = PREFILL_SHAPE[name]
        fns = _mixed_fns(name, base, (rows, tokens), {2: [f"a{2 * i // rows}" for i in range(rows)]}, "prefill")
        del base
        with torch.inference_mode():
            result = {"variants": _alternate(fns, max(2, steps // 4), warmup=1)}
    elif case == "time-saveload":  # both libraries in one process, alternated (separate copies of the base)
        result = {"variants": _alternate({"saveload-lorakit": _saveload_cycle(name, copy.deepcopy(base), "lorakit"),
                                          "saveload-peft": _saveload_cycle(name, base, "peft")}, steps, warmup=1)}
    else:
        raise SystemExit(f"unknown case {case}")
    result["peak_rss_mb"] = _peak_mb()  # on a GPU: peak CUDA allocations (the key keeps the CPU name)
    return result


# -- parent side ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=list(SHAPES))
    parser.add_argument("--cases", nargs="+", default=CASES)
    parser.add_argument("--rounds", type=int, default=1, help="fresh-process rounds per case, order alternated")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compiled", nargs="*", default=None, choices=list(SHAPES), metavar="MODEL",
                        help="also time torch.compile'd training steps of both libraries (LoRA on attention) for "
                             "these models (none named: MiniLM; compiling SmolLM2's backward on 2 cores takes minutes)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: forward passes under torch.autocast(bfloat16), weights and optimizer in fp32")
    parser.add_argument("--model-dir", action="append", default=[], metavar="NAME=DIR",
                        help="load MODEL from a Hugging Face folder instead of the packaged weights")
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=BxS",
                        help="batch x sequence length of MODEL's training and inference inputs (default: "
                             + ", ".join(f"{k}={b}x{t}" for k, (b, t) in SHAPES.items()) + ")")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "CASE"), help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS / "bench.json"))
    args = parser.parse_args()
    global DEVICE, PRECISION
    DEVICE, PRECISION = args.device, args.precision
    for item in args.model_dir:
        name, sep, folder = item.partition("=")
        if not sep or name not in SHAPES:
            parser.error(f"--model-dir wants NAME=DIR with NAME one of {', '.join(SHAPES)}, got {item!r}")
        MODEL_DIRS[name] = folder
    for item in args.shape:
        name, sep, value = item.partition("=")
        try:
            batch, seq = (int(v) for v in value.lower().split("x"))
        except ValueError:
            batch = 0
        if not sep or name not in SHAPES or batch < 1 or seq < 1:
            parser.error(f"--shape wants NAME=BxS (e.g. minilm=32x256) with NAME one of {', '.join(SHAPES)}, "
                         f"got {item!r}")
        SHAPES[name] = (batch, seq)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_case(args.worker[0], args.worker[1], args.steps)), flush=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    compiled_models = [] if args.compiled is None else (args.compiled or ["minilm"])
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        order = args.cases if round_ % 2 == 0 else list(reversed(args.cases))
        for model in args.models:
            for case in order:
                worker_case = f"{case}+compiled" if case == "time-train" and model in compiled_models else case
                started = time.perf_counter()
                done = subprocess.run([sys.executable, __file__, "--worker", model, worker_case, "--steps",
                                       str(args.steps), "--threads", str(args.threads), "--device", args.device,
                                       "--precision", args.precision,
                                       *(f"--model-dir={d}" for d in args.model_dir),
                                       *(f"--shape={d}" for d in args.shape)],
                                      env=env, capture_output=True, text=True)
                line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    print(f"{model}/{case} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                    continue
                result = json.loads(line[7:])
                for key, value in result.pop("variants", {"": result}).items():
                    entry = {**value, "peak_rss_mb": result.get("peak_rss_mb", value.get("peak_rss_mb"))}
                    runs.setdefault(f"{model}/{key or case}", []).append(entry)
                print(f"  round {round_ + 1} {model}/{case}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    summary = {key: {"median_s": statistics.median(r["median_s"] for r in rs),
                     "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                     "kept": sum(r["kept"] for r in rs), "dropped": sum(r["dropped"] for r in rs),
                     "noisy": any(r.get("noisy") for r in rs),
                     **({"rows": rs[0]["rows"]} if "rows" in rs[0] else {})}
               for key, rs in runs.items()}
    memory = "peak CUDA MB" if args.device != "cpu" else "peak RSS MB"
    ratios = _ratios(summary, args.models, memory[:-3])
    print(_table(summary, ratios, memory))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps({"machine": _machine(args.threads, args.device), "precision": args.precision,
                               "shapes": {m: SHAPES[m] for m in args.models},
                               "memory": memory, "model_dirs": MODEL_DIRS, "rounds": args.rounds, "steps": args.steps,
                               "summary": summary, "ratios": ratios, "runs": runs}, indent=2))
    tmp.replace(out)
    print(f"\nwritten {out}")


def _ratios(s: dict, models: list[str], memory: str = "peak RSS") -> dict[str, float]:
    def r(a: str, b: str) -> float | None:
        if a in s and b in s and s[b]["median_s"]:
            return s[a]["median_s"] / s[b]["median_s"]
        return None

    out = {}
    for m in models:
        for scope in ("attn", "all"):
            out[f"{m} train lorakit-{scope} / floor"] = r(f"{m}/lorakit-{scope}", f"{m}/floor")
            out[f"{m} train lorakit-{scope} / peft-{scope}"] = r(f"{m}/lorakit-{scope}", f"{m}/peft-{scope}")
            if f"{m}/mem-lorakit-{scope}" in s and f"{m}/mem-peft-{scope}" in s:
                out[f"{m} {memory} lorakit-{scope} / peft-{scope}"] = (
                    s[f"{m}/mem-lorakit-{scope}"]["peak_rss_mb"] / s[f"{m}/mem-peft-{scope}"]["peak_rss_mb"])
            if f"{m}/mem-lorakit-{scope}" in s and f"{m}/mem-full" in s:
                out[f"{m} {memory} lorakit-{scope} / full"] = (
                    s[f"{m}/mem-lorakit-{scope}"]["peak_rss_mb"] / s[f"{m}/mem-full"]["peak_rss_mb"])
        out[f"{m} train full / lorakit-attn"] = r(f"{m}/full", f"{m}/lorakit-attn")
        out[f"{m} train compiled lorakit-attn / peft-attn"] = r(f"{m}/lorakit-attn-compiled",
                                                                  f"{m}/peft-attn-compiled")
        out[f"{m} train compiled / eager lorakit-attn"] = r(f"{m}/lorakit-attn-compiled", f"{m}/lorakit-attn")
        out[f"{m} infer lorakit unmerged / base"] = r(f"{m}/infer-lorakit", f"{m}/infer-base")
        out[f"{m} infer peft unmerged / base"] = r(f"{m}/infer-peft", f"{m}/infer-base")
        out[f"{m} infer lorakit merged / base"] = r(f"{m}/infer-lorakit-merged", f"{m}/infer-base")
        out[f"{m} infer peft merged / base"] = r(f"{m}/infer-peft-merged", f"{m}/infer-base")
        for n in (4, 16, 64):  # throughput ratios: single-adapter time / mixed time
            out[f"{m} mixed {n} adapters / single (lorakit)"] = r(f"{m}/mixed-lorakit-1", f"{m}/mixed-lorakit-{n}")
            out[f"{m} mixed {n} adapters / single unfolded (lorakit)"] = r(f"{m}/mixed-lorakit-1-unfolded",
                                                                             f"{m}/mixed-lorakit-{n}")
            out[f"{m} mixed {n} adapters / single (peft)"] = r(f"{m}/mixed-peft-1", f"{m}/mixed-peft-{n}")
            out[f"{m} mixed {n} adapters lorakit / peft (time)"] = r(f"{m}/mixed-lorakit-{n}", f"{m}/mixed-peft-{n}")
        out[f"{m} prefill 2 adapters / single (lorakit)"] = r(f"{m}/prefill-lorakit-1", f"{m}/prefill-lorakit-2")
        out[f"{m} prefill 2 adapters / single (peft)"] = r(f"{m}/prefill-peft-1", f"{m}/prefill-peft-2")
        out[f"{m} prefill 2 adapters lorakit / peft (time)"] = r(f"{m}/prefill-lorakit-2", f"{m}/prefill-peft-2")
        out[f"{m} prefill 2 adapters folded / unfolded runs (time)"] = r(f"{m}/prefill-lorakit-2",
                                                                         f"{m}/prefill-lorakit-2-unfolded")
        out[f"{m} save+load lorakit / peft"] = r(f"{m}/saveload-lorakit", f"{m}/saveload-peft")
    return {k: v for k, v in out.items() if v is not None}


def _table(s: dict, ratios: dict, memory: str = "peak RSS MB") -> str:
    """Timings (alternated in one process) with the peak memory of the variant's own ``mem-*`` process."""
    lines = [f"| model/variant | median ms | steps kept/dropped | {memory} (own process) |", "|---|---:|---:|---:|"]
    for key, v in s.items():
        if "/mem-" in key:
            continue
        flag = " (noisy: machine busy)" if v.get("noisy") else ""
        model, variant = key.split("/", 1)
        mem = s.get(f"{model}/mem-{variant}")
        rss = "" if mem is None else f"{mem['peak_rss_mb']:.0f}"
        lines.append(f"| {key} | {1000 * v['median_s']:.1f} | {v['kept']}/{v['dropped']}{flag} | {rss} |")
    lines += ["", "| ratio of medians | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in ratios.items()]
    return "\n".join(lines)


def _machine(threads: int, device: str = "cpu") -> dict:
    import platform

    import torch

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name(torch.device(device)) if device != "cpu" else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "device": device, "gpu": gpu,
            "torch": torch.__version__, "peft": peft_version, "python": platform.python_version()}


if __name__ == "__main__":
    main()
