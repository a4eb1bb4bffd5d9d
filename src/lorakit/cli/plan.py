"""``lorakit plan``: per-device training memory from a model's config alone (`lorakit.plan`); no weights read."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``lorakit plan``."""
    p = subparsers.add_parser("plan", help="estimate per-device training memory from a model's config.json",
                              description=run.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="config.json, a folder holding one, or a packaged model name (minilm, smollm2)")
    p.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    p.add_argument("--quantize", default=None, choices=["int8", "nf4"], help="qlora's base (default nf4)")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--sharding", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--batch", type=int, default=1, help="rows per device per micro-batch")
    p.add_argument("--seq", type=int, default=512, help="tokens per row")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device-memory", default=None, help="memory of one device, e.g. 80GB, 24GiB")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="storage dtype of the base")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--targets", default="all-linear", help="all-linear or comma-separated module-name suffixes")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (> 0 keeps a mask per input)")
    p.add_argument("--task", default=None, choices=["causal-lm", "sequence-classification", "base"],
                   help="the head (default: causal-lm for decoders, base for encoders)")
    p.add_argument("--device-type", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: AdamW's foreach step (a temporary per trained tensor); cpu: one tensor at a time")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(_run=run)


def run(args: argparse.Namespace) -> int:
    """Estimate per-device memory (base weights, adapter, gradients, optimizer state, activations,
    workspace) of LoRA, QLoRA or full fine-tuning from the model's config.json alone, say whether it fits
    --device-memory and, if not, the smallest setting that does."""
    from ..plan import PlanRequest, estimate_memory, format_plan, parse_bytes, read_architecture, smallest_fit

    request = PlanRequest(method=args.method, quantize=args.quantize, devices=args.devices, sharding=args.sharding,
                          batch=args.batch, seq=args.seq, gradient_checkpointing=args.gradient_checkpointing,
                          dtype=args.dtype, r=args.r, targets=args.targets, device_type=args.device_type,
                          lora_dropout=args.lora_dropout,
                          device_memory=parse_bytes(args.device_memory) if args.device_memory else None)
    request.check()  # before the config is read
    arch = read_architecture(args.model, task=args.task)
    estimate = estimate_memory(arch, request)
    if args.json:
        fit = smallest_fit(arch, request)
        print(json.dumps({"model": arch.name, "request": asdict(request), "components": estimate.components(),
                          "total": estimate.total, "host_loading_per_process": estimate.host_loading,
                          "trainable_parameters": estimate.trainable_parameters,
                          "total_parameters": estimate.total_parameters,
                          "fits": None if request.device_memory is None else estimate.total <= request.device_memory,
                          "smallest_fit": None if fit is None else asdict(fit[0])}, indent=2))
    else:
        print(format_plan(arch, request, estimate))
    return 0
