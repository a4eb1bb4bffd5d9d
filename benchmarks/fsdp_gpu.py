"""The FSDP path on one GPU: measured peak memory against `lorakit plan`'s estimate for the same setting.

A world of one process over nccl (an in-memory process group, `lorakit.distributed.single_process_group`: no
torchrun, no port), the model sharded by `lorakit.sharding.shard` exactly as ``train.sharding: fsdp`` shards it
(FSDP2 per ``_no_split_modules`` block plus the root, bf16 compute / fp32 gradient reduction), the base stored in
``--dtype`` with fp32 LoRA factors and AdamW state (`lorakit.precision.keep_trainable_fp32`), and
``--steps`` steps of `lorakit.train.run_training` (the one training loop) on random token ids. The model is
built with random weights from a ``config.json`` (packaged weights cannot travel to the GPU machine; memory does
not depend on the values). Rows: without offload, and with ``CPUOffloadPolicy`` (``train.fsdp_cpu_offload``).

On the GPU machine (carry ``.gpu``, filled by scripts/gpu_carry.sh)::

    export PYTHONPATH=$PWD/src
    python3 benchmarks/fsdp_gpu.py --config .gpu/smollm2 --batch 8 --seq 512 --output /tmp/fsdp_gpu.json

``--device cpu`` runs the same code over gloo on a CPU (no offload row, no CUDA peak: a dry run that checks
the script, e.g. ``--config`` a tiny config, in tests/test_fsdp.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="folder holding config.json (a causal LM)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="storage dtype of the base")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-offload", action="store_true", help="skip the CPUOffloadPolicy row")
    parser.add_argument("--output", type=Path, required=True, help="JSON file for the results")
    args = parser.parse_args(argv)
    if not (args.config / "config.json").is_file():
        parser.error(f"{args.config} has no config.json (fix: scripts/gpu_carry.sh fills .gpu/smollm2)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here (fix: --device cpu for a dry run)")
    return args


def build_model(config_dir: Path, dtype: torch.dtype, r: int, checkpointing: bool) -> torch.nn.Module:
    """Random-weight causal LM of ``config_dir`` with LoRA (r, alpha 2r, dropout 0) on every linear layer; the
    base in ``dtype``, the LoRA factors in fp32 (as ``train.dtype`` does)."""
    import transformers

    from lorakit.config import LoraConfig
    from lorakit.inject import inject
    from lorakit.precision import keep_trainable_fp32

    config = transformers.AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    inject(model, LoraConfig(r=r, alpha=2 * r, dropout=0.0, target_modules="all-linear"))
    keep_trainable_fp32(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def plan_estimate(config_dir: Path, args: argparse.Namespace) -> int:
    """`lorakit.plan`'s per-device peak for this setting (one device, fsdp)."""
    from lorakit.plan import PlanRequest, estimate_memory, read_architecture

    request = PlanRequest(method="lora", devices=1, sharding="fsdp", batch=args.batch, seq=args.seq,
                          gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, r=args.r,
                          targets="all-linear", device_type=args.device)
    return estimate_memory(read_architecture(str(config_dir), task="causal-lm"), request).total


def run_one(args: argparse.Namespace, offload: bool) -> dict[str, Any]:
    """Build, shard and train one model; its peak memory (CUDA only) and losses."""
    from lorakit import distributed
    from lorakit.sharding import is_sharded, shard, shard_bytes
    from lorakit.train import MicroBatch, StepSettings, run_training

    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    world = distributed.World(device=device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(args.config, dtype, args.r, args.gradient_checkpointing)
    if not offload:
        model.to(device)  # offload: the shards stay in (pinned) CPU memory, FSDP copies each block in
    precision = "bf16" if device.type == "cuda" else "fp32"  # bf16 compute, fp32 reduce (MixedPrecisionPolicy)
    shard(model, device.type, 1, precision=precision, offload=offload)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    batch = [MicroBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})]
    settings = StepSettings(task="causal-lm", precision=precision, world=world)
    started = time.perf_counter()
    results = run_training(model, optimizer, None, lambda step: batch, args.steps, settings)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    local, whole = shard_bytes(model)
    row = {"offload": offload, "sharded": is_sharded(model), "losses": [r.loss for r in results],
           "seconds": seconds, "frozen_bytes": whole, "frozen_bytes_local": local,
           "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    del model, optimizer, batch
    gc.collect()  # the next row's peak starts from an empty device
    return row


def table(rows: list[dict[str, Any]], estimate: int) -> str:
    mib = 2**20
    lines = [f"{'setting':<22} {'measured peak':>14} {'plan estimate':>14} {'ratio':>7} {'steps s':>8}"]
    for row in rows:
        name = "fsdp + cpu offload" if row["offload"] else "fsdp"
        peak = row["peak_bytes"]
        shown = f"{peak / mib:,.0f} MiB" if peak is not None else "n/a (cpu)"
        ratio = f"{estimate / peak:.2f}" if peak and not row["offload"] else "-"  # offload: not in the plan
        lines.append(f"{name:<22} {shown:>14} {estimate / mib:>10,.0f} MiB {ratio:>7} {row['seconds']:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lorakit import distributed

    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    distributed.single_process_group(device)  # nccl on the GPU, gloo on a CPU
    try:
        rows = [run_one(args, offload=False)]
        if device.type == "cuda" and not args.no_offload:
            rows.append(run_one(args, offload=True))
    finally:
        distributed.teardown(distributed.World())
    estimate = plan_estimate(args.config, args)
    bad = [row for row in rows if not row["sharded"] or not all(map(math.isfinite, row["losses"]))]
    result = {"config": str(args.config), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "batch": args.batch, "seq": args.seq, "steps": args.steps,
              "r": args.r, "dtype": args.dtype, "gradient_checkpointing": args.gradient_checkpointing,
              "plan_estimate_bytes": estimate, "rows": rows,
              "command": "python3 benchmarks/fsdp_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows, estimate))
    print(f"wrote {args.output}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
