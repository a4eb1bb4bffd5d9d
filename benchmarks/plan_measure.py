"""Measure peak training memory of the packaged models, to check `lorakit plan` against (docs/scaling.md).

One configuration per process (peak figures are per process):

    .venv/bin/python benchmarks/plan_measure.py --model smollm2 --method lora --batch 4 --seq 128
    .venv/bin/python benchmarks/plan_measure.py --all            # the table of docs/scaling.md, one child each

What is measured, for a few training steps (random token ids, fixed shape, one thread, AdamW as `lorakit train`):

- **tracked**: the peak of the bytes held by live tensor storages, counted by a `TorchDispatchMode` (`lorakit.memory.LiveTensorBytes`) that sees
  every tensor an op returns (forward, backward, recomputation, optimizer) plus the model's parameters and
  buffers at the start. This is what ``torch.cuda.max_memory_allocated`` reports on a GPU, measured on a CPU.
  It does not depend on other processes, so it is valid on a busy machine.
- **rss**: the process's resident-set high-water mark during the steps (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs`` once the model is ready) minus the resident set before the model was loaded
  (the interpreter, torch and transformers). It adds what the allocator keeps (freed but not returned pages).

The planner's estimate for the same configuration is printed beside both, with the tracked ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from lorakit.memory import LiveTensorBytes, reset_peak_resident, resident_kib

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = {"minilm": "sequence-classification", "smollm2": "causal-lm"}
# the recipes' targets: sentiment-minilm (attention) and the SmolLM2 recipes (attention + MLP = all-linear)
TARGETS = {"minilm": "query,key,value,attention.output.dense", "smollm2": "all-linear"}
#: (model, method, quantize, gradient checkpointing, batch, seq, base dtype) of the table in docs/scaling.md
CONFIGS = [
    ("minilm", "lora", None, False, 8, 128, "fp32"), ("minilm", "lora", None, True, 8, 128, "fp32"),
    ("minilm", "full", None, False, 8, 128, "fp32"), ("minilm", "full", None, True, 8, 128, "fp32"),
    ("minilm", "lora", None, False, 8, 128, "bf16"),
    ("smollm2", "lora", None, False, 4, 128, "fp32"), ("smollm2", "lora", None, True, 4, 128, "fp32"),
    ("smollm2", "full", None, False, 4, 128, "fp32"), ("smollm2", "full", None, True, 4, 128, "fp32"),
    ("smollm2", "lora", "int8", False, 4, 128, "fp32"), ("smollm2", "lora", "nf4", False, 4, 128, "fp32"),
    ("smollm2", "lora", "nf4", True, 4, 128, "fp32"), ("smollm2", "lora", None, False, 4, 128, "bf16"),
    ("smollm2", "lora", None, True, 4, 128, "bf16"),
]


def measure(model_name: str, method: str, quantize: str | None, checkpointing: bool, batch: int, seq: int,
            r: int, steps: int, dtype: str) -> dict[str, Any]:
    """Peak memory of ``steps`` training steps of one configuration (see the module docstring)."""
    from lorakit.config import LoraConfig
    from lorakit.evaluate import forward, loss_sum
    from lorakit.inject import inject
    from lorakit.models import load_model

    torch.set_num_threads(1)
    rss_before = resident_kib("VmRSS")
    task = TASKS[model_name]
    loaded = load_model(model_name, task=task, num_labels=2 if task == "sequence-classification" else None,
                        dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    model = loaded.model
    if quantize:
        from lorakit.quant import quantize_model

        quantize_model(model, quantize)
    if method == "lora":
        targets = TARGETS[model_name]
        inject(model, LoraConfig(r=r, alpha=2 * r, dropout=0.0, target_modules=targets if targets == "all-linear"
                                 else targets.split(","), modules_to_save=["classifier"] if task != "causal-lm"
                                 else None))
    else:
        model.requires_grad_(True)
    if dtype != "fp32":  # as `lorakit train` with train.dtype: adapters and heads back to fp32
        from lorakit.precision import keep_trainable_fp32

        keep_trainable_fp32(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, loaded.tokenizer.vocab_size, (batch, seq), generator=generator)
    labels = ids.clone() if task == "causal-lm" else torch.randint(0, 2, (batch,), generator=generator)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    reset_peak_resident()  # the load's own peak is not training's
    tracker = LiveTensorBytes([*model.parameters(), *model.buffers()])
    with tracker:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            logits = forward(model, task, data)
            loss, count = loss_sum(task, logits, data["labels"])
            (loss / count).backward()
            del logits, loss
            optimizer.step()
    return {"model": model_name, "method": method, "quantize": quantize, "gradient_checkpointing": checkpointing,
            "batch": batch, "seq": seq, "r": r, "dtype": dtype, "steps": steps,
            "tracked_peak_bytes": tracker.peak, "rss_peak_bytes": (resident_kib("VmHWM") - rss_before) * 1024,
            "targets": TARGETS[model_name] if method == "lora" else None}


def estimate(row: dict[str, Any]) -> int:
    """The planner's per-device peak for a measured row (same model config, method, shape)."""
    from lorakit.models import model_path
    from lorakit.plan import PlanRequest, estimate_memory, read_architecture

    arch = read_architecture(str(model_path(row["model"])), task=TASKS[row["model"]])
    method = "qlora" if row["quantize"] else row["method"]
    request = PlanRequest(method=method, quantize=row["quantize"], batch=row["batch"], seq=row["seq"],
                          gradient_checkpointing=row["gradient_checkpointing"], r=row["r"], dtype=row["dtype"],
                          targets=row["targets"] or "all-linear", device_type="cpu")
    return estimate_memory(arch, request).total


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | method | dtype | ckpt | batch x seq | estimate MiB | tracked MiB | estimate / tracked "
            "| rss MiB |\n|---|---|---|---|---|---:|---:|---:|---:|")
    lines = [head]
    for row in rows:
        method = f"{row['method']}" + (f" ({row['quantize']})" if row["quantize"] else "")
        ckpt = "yes" if row["gradient_checkpointing"] else "no"
        lines.append(f"| {row['model']} | {method} | {row['dtype']} | {ckpt} | "
                     f"{row['batch']} x {row['seq']} | {row['estimate_bytes'] / 2**20:,.0f} | "
                     f"{row['tracked_peak_bytes'] / 2**20:,.0f} | "
                     f"{row['estimate_bytes'] / row['tracked_peak_bytes']:.3f} | {row['rss_peak_bytes'] / 2**20:,.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(TASKS), default="smollm2")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--quantize", choices=["int8", "nf4"], default=None)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--all", action="store_true", help="every configuration of CONFIGS, one process each")
    parser.add_argument("--json", action="store_true", help="print one JSON row (used by --all)")
    args = parser.parse_args()
    if not args.all:
        row = measure(args.model, args.method, args.quantize, args.gradient_checkpointing, args.batch, args.seq,
                      args.r, args.steps, args.dtype)
        row["estimate_bytes"] = estimate(row)
        print(json.dumps(row) if args.json else _table([row]))
        return 0
    rows = []
    for model, method, quant, ckpt, batch, seq, dtype in CONFIGS:
        cmd = [sys.executable, __file__, "--json", "--model", model, "--method", method, "--batch", str(batch),
               "--seq", str(seq), "--steps", str(args.steps), "--r", str(args.r), "--dtype", dtype]
        cmd += ["--quantize", quant] if quant else []
        cmd += ["--gradient-checkpointing"] if ckpt else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "plan-measured.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
