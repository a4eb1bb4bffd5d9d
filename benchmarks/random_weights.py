"""A Hugging Face folder with the architecture of CONFIG_DIR and random weights, for timing runs on a machine the
real weights cannot reach (timings do not depend on the weights' values; accuracy does, so never evaluate it).

    python benchmarks/random_weights.py CONFIG_DIR OUT_DIR [--task base|causal-lm] [--seed 0]

CONFIG_DIR needs ``config.json`` (tokenizer files beside it are copied too).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "chat_template.jinja", "generation_config.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--task", default="base", choices=["base", "causal-lm"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.config_dir / "config.json").is_file():
        raise SystemExit(f"{args.config_dir} has no config.json (fix: point at a model folder)")
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(args.config_dir)
    auto = transformers.AutoModelForCausalLM if args.task == "causal-lm" else transformers.AutoModel
    torch.manual_seed(args.seed)
    model = auto.from_config(config, dtype=torch.float32)
    tmp = args.out_dir.with_name(f".{args.out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (args.config_dir / name).is_file():
            shutil.copy(args.config_dir / name, tmp / name)
    shutil.rmtree(args.out_dir, ignore_errors=True)
    tmp.rename(args.out_dir)
    print(f"{args.out_dir}: {sum(p.numel() for p in model.parameters()):,} random parameters ({config.model_type})")


if __name__ == "__main__":
    main()
