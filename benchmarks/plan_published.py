"""`lorakit plan` against published memory figures: estimate, published value and ratio (docs/scaling.md).

    .venv/bin/python benchmarks/plan_published.py           # estimate vs published
    .venv/bin/python benchmarks/plan_published.py --sizes   # the 1B / 8B / 70B table (what `lorakit plan` prints)

The models are written as config.json files under benchmarks/model_configs/ (the shapes from each model's paper
or released config); each row's setting is the one the source states, and the assumptions are in ``note``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from lorakit.plan import PlanRequest, estimate_memory, parse_bytes, read_architecture, smallest_fit

CONFIGS = Path(__file__).resolve().parent / "model_configs"


@dataclass(frozen=True)
class Published:
    model: str
    request: PlanRequest
    published_gb: float  # 10^9 bytes
    claim: str  # what the source says, as it says it
    source: str
    note: str = ""


ROWS = [
    Published("llama-65b", PlanRequest(method="qlora", quantize="nf4", r=64, targets="all-linear", batch=1, seq=512,
                                       gradient_checkpointing=True, dtype="bf16"),
              48, "fits a single 48GB GPU (upper bound)",
              "Dettmers et al. 2023, QLoRA, arXiv:2305.14314, abstract",
              "r=64 on all linear layers as in the paper (0.8B LoRA parameters); batch 1 x 512 assumed; lorakit keeps "
              "adapters and their AdamW moments in fp32 (9.6 GB here), the paper paged the optimizer state to CPU"),
    Published("llama-65b", PlanRequest(method="full", batch=1, seq=512, gradient_checkpointing=True, dtype="bf16"),
              780, "regular 16-bit finetuning needs more than 780 GB",
              "Dettmers et al. 2023, QLoRA, arXiv:2305.14314, section 1",
              "lorakit's bf16 full fine-tune keeps AdamW's moments in bf16 (torch's default for bf16 parameters); "
              "780 GB is 12 bytes a parameter, i.e. 32-bit moments"),
    Published("gpt3-175b", PlanRequest(method="full", batch=1, seq=2048, gradient_checkpointing=True, dtype="fp16"),
              1200, "1.2 TB of VRAM during training (full fine-tuning with Adam)",
              "Hu et al. 2021, LoRA, arXiv:2106.09685, section 4.2",
              "total over all devices (planner with 1 device = the whole model); batch 1 x 2048 assumed; fp16 "
              "weights, gradients and AdamW moments plus the foreach step's temporary copy of the gradients "
              "(8 bytes a parameter + 2); the paper does not say how its 1.2 TB was counted"),
    Published("gpt3-175b", PlanRequest(method="lora", r=4, targets="q_proj,v_proj", batch=1, seq=2048,
                                       gradient_checkpointing=True, dtype="fp16"),
              350, "350 GB of VRAM with LoRA r=4 on the query and value projections",
              "Hu et al. 2021, LoRA, arXiv:2106.09685, section 4.2",
              "total over all devices; batch 1 x 2048 assumed"),
    Published("llama-3-8b", PlanRequest(method="lora", r=8, targets="q_proj,v_proj", batch=2, seq=512,
                                        gradient_checkpointing=True, dtype="bf16"),
              19, "LoRA on a single GPU: peak allocated memory of ~19GB",
              "torchtune README at commit c69fba18b (2024-04-19), config llama3/8B_lora_single_device",
              "batch 2, alpaca_cleaned (max_seq_len 512), activation checkpointing, bf16, AdamW"),
    Published("llama-3-8b", PlanRequest(method="qlora", quantize="nf4", r=8,
                                        targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", batch=2,
                                        seq=512, gradient_checkpointing=True, dtype="bf16"),
              9, "QLoRA: peak allocated memory of ~9GB",
              "torchtune README at commit c69fba18b (2024-04-19), config llama3/8B_qlora_single_device",
              "batch 2, alpaca_cleaned (max_seq_len 512), activation checkpointing, bf16"),
]


#: docs/scaling.md's "1B, 8B and 70B": bf16 base, batch 4 x 2048, checkpointing, r=8 all-linear, 80 GB devices
SIZES = [("Llama 3.2 1B", "llama-3.2-1b"), ("Llama 3 8B", "llama-3-8b"), ("Llama 3 70B", "llama-3-70b")]
SIZE_SETTINGS = [("full", None, 1), ("lora", None, 1), ("qlora", "nf4", 1), ("full", None, 8), ("lora", None, 8)]


def sizes_table() -> None:
    """Each row is ``lorakit plan benchmarks/model_configs/MODEL --method M [--devices 8 --sharding fsdp]
    --batch 4 --seq 2048 --gradient-checkpointing --device-memory 80GB``, in GiB."""
    print("| model | method | devices | base | adapter | gradients | AdamW | activations | workspace | peak | "
          "fits 80 GB | smallest that fits |\n|---|---|---|" + "---:|" * 7 + "---|---|")
    for label, folder in SIZES:
        arch = read_architecture(str(CONFIGS / folder))
        for method, quantize, devices in SIZE_SETTINGS:
            req = PlanRequest(method=method, quantize=quantize, devices=devices,
                              sharding="fsdp" if devices > 1 else "ddp", batch=4, seq=2048,
                              gradient_checkpointing=True, dtype="bf16", device_memory=parse_bytes("80GB"))
            est = estimate_memory(arch, req)
            parts = [est.base_weights, est.adapter, est.gradients, est.optimizer_state, est.activations,
                     est.workspace, est.total]
            fits = est.total <= req.device_memory
            smallest = "" if fits else _smallest(arch, req)
            print(f"| {label} | {method}{' ' + quantize if quantize else ''} | "
                  f"{devices}{' fsdp' if devices > 1 else ''} | " + " | ".join(_gib(v) for v in parts) +
                  f" | {'yes' if fits else 'no'} | {smallest} |")


def _gib(n: int) -> str:
    return "0" if n == 0 else f"{n / 2**30:,.1f}"


def _smallest(arch, req: PlanRequest) -> str:
    found = smallest_fit(arch, replace(req))
    if found is None:
        return "nothing up to 1,024 devices"
    option, _ = found
    method = option.method + (f" {option.quantize or 'nf4'}" if option.method == "qlora" else "")
    return f"{method}, {option.devices} device{'s' if option.devices > 1 else ''}" + \
        (", fsdp" if option.sharding == "fsdp" else "") + (f", batch {option.batch}" if option.batch != req.batch else "")


def main() -> int:
    if sys.argv[1:] == ["--sizes"]:
        sizes_table()
        return 0
    print("| model | setting | estimate GB | published | ratio | source |\n|---|---|---:|---|---:|---|")
    for row in ROWS:
        arch = read_architecture(str(CONFIGS / row.model))
        estimate = estimate_memory(arch, row.request).total / 1e9
        r = row.request
        setting = (f"{r.method}" + (f" {r.quantize}" if r.quantize else "") +
                   ("" if r.method == "full" else f" r={r.r} {r.targets}") +
                   f", {r.dtype}, batch {r.batch} x {r.seq}" + (", ckpt" if r.gradient_checkpointing else ""))
        print(f"| {row.model} | {setting} | {estimate:,.1f} | {row.claim} | {estimate / row.published_gb:.2f} | "
              f"{row.source}; {row.note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
