"""`lorakit plan` against published memory figures: estimate, published value and ratio (docs/scaling.md).

    .venv/bin/python benchmarks/plan_published.py

The models are written as config.json files under benchmarks/model_configs/ (the shapes from each model's paper
or released config); each row's setting is the one the source states, and the assumptions are in ``note``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from lorakit.plan import PlanRequest, estimate_memory, read_architecture

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


def main() -> int:
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
