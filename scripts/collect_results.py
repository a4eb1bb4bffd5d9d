"""Print a markdown table of finished training runs (their metrics.json) for docs/results.md.

    .venv/bin/python scripts/collect_results.py runs/sentiment-minilm runs/instruct-smollm2 ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(folder: Path) -> str:
    m = json.loads((folder / "metrics.json").read_text())
    before, after = m["base_eval"], m["eval"]
    key = "accuracy" if "accuracy" in after else "loss"
    shown = [f"{key} {before[key]:.4f} → {after[key]:.4f}"]
    for extra in ("perplexity", "chrf"):
        if extra in after:
            shown.append(f"{extra} {before.get(extra, float('nan')):.2f} → {after[extra]:.2f}")
    return (f"| {m['recipe']} | {m['method']} | {'<br>'.join(shown)} | {m['trainable_params']:,} "
            f"({100 * m['trainable_fraction']:.3f}%) | {m['steps']} | {m['train_time_s']:.0f} s | "
            f"{m['peak_memory_mb']:.0f} MB | {m['adapter_bytes'] / 1e6:.2f} MB |")


if __name__ == "__main__":
    print("| recipe | method | held-out test: before → after | trained params | steps | train time | "
          "peak RSS | adapter size |")
    print("|---|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        print(row(Path(arg)))
