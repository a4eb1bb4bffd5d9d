"""`lorakit.evidence.compare`: verdict rules on synthetic numbers (both directions, margins), data fractions, and
`compare` end to end on a tiny slice of the real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evidence_helpers import TINY, check_report
from lorakit import ConfigError
from lorakit.evidence import COST_MARGIN, TOLERANCE, compare, fraction_sizes, judge
from lorakit.tasks import Metric

CLAIMS = 10  # rows of the compare table: one per seed claim


def _method(params: int, size: int, memory: float, step: float, total: float, held_out: float, gap: float,
            curve: list[float], drop: float) -> dict:
    return {"trainable_params": params, "total_params": 1000, "checkpoint_bytes": size, "peak_memory_mb": memory,
            "train_peak_mb": memory,
            "step_time_s": step, "step_cpu_s": step, "train_time_s": total, "cpu_time_s": total,
            "held_out": held_out, "train": held_out + gap, "generalization_gap": gap, "curve": curve,
            "probe_after": 0.7 - drop, "probe_drop": drop, "base_held_out": 0.5}


def _comparison(lora_wins: bool) -> dict:
    full = _method(1000, 4000, 1000.0, 1.0, 100.0, 0.85, 0.10, [0.60, 0.70, 0.85], 0.05)
    if lora_wins:  # LoRA cheaper on every cost, better everywhere
        lora = _method(10, 40, 500.0, 0.5, 50.0, 0.90, 0.02, [0.70, 0.75, 0.90], 0.01)
    else:  # LoRA costs as much or more, worse everywhere
        lora = _method(900, 3900, 990.0, 0.99, 99.0, 0.80, 0.20, [0.50, 0.60, 0.80], 0.10)
    serving = [{"tasks": n, "lora_bytes": n * lora["checkpoint_bytes"] + full["checkpoint_bytes"],
                "full_bytes": n * full["checkpoint_bytes"]} for n in (1, 10, 100)]
    return {"metric": {"name": "accuracy", "higher_is_better": True}, "fractions": [0.1, 0.5, 1.0],
            "methods": {"full": full, "lora": lora}, "probe": "faq-retrieval", "probe_before": 0.7,
            "serving": serving, "machine": {"cuda": None}}


def test_verdicts_follow_the_rules_in_both_directions() -> None:
    good = {row.claim: row.verdict for row in judge(_comparison(lora_wins=True))}
    bad = {row.claim: row.verdict for row in judge(_comparison(lora_wins=False))}
    assert len(good) == len(bad) == CLAIMS
    lower_metric = "LoRA may reach a lower held-out metric than full fine-tuning"
    for claim in good:
        if claim == lower_metric:  # this claim is about LoRA being worse
            assert (good[claim], bad[claim]) == ("does not hold", "holds"), claim
        else:
            assert (good[claim], bad[claim]) == ("holds", "does not hold"), claim


def test_verdict_margins_and_missing_probe() -> None:
    comparison = _comparison(lora_wins=True)
    lora, full = comparison["methods"]["lora"], comparison["methods"]["full"]
    # a memory saving smaller than the margin does not count; within the metric tolerance is not "lower"
    lora["train_peak_mb"] = full["train_peak_mb"] * (1 - COST_MARGIN / 2)
    lora["held_out"] = full["held_out"] - TOLERANCE / 2
    comparison["probe"] = None
    rows = {row.claim: row for row in judge(comparison)}
    assert rows["LoRA needs less memory"].verdict == "does not hold"
    assert rows["LoRA may reach a lower held-out metric than full fine-tuning"].verdict == "does not hold"
    assert rows["LoRA preserves pretrained knowledge (less forgetting)"].verdict == "not measured"
    # learning curves equal below the full budget (e.g. neither method has learned yet): no evidence of less data
    lora["curve"] = list(full["curve"])
    rows = {row.claim: row for row in judge(comparison)}
    assert rows["LoRA needs less data"].verdict == "does not hold"
    # lower-is-better metrics (causal-LM loss) flip the comparisons
    loss = Metric("loss", False)
    assert loss.better(1.0, 2.0) and loss.worse_by(2.0, 1.5) == 0.5


def test_fraction_sizes() -> None:
    assert fraction_sizes(1000, [0.001, 0.5, 1.0], rows_per_step=8) == [8, 500, 1000]
    with pytest.raises(ConfigError, match="fractions"):
        fraction_sizes(1000, [1.5], 8)


@pytest.mark.parametrize("fractions", [[], [0.5, 1.5]])
def test_compare_refuses_bad_fractions_before_loading(tmp_path: Path, fractions: list) -> None:
    with pytest.raises(ConfigError, match="fraction"):  # [] was an IndexError after the dataset was read
        compare("sentiment-minilm", TINY, fractions=fractions, output=tmp_path, isolate=False, log=lambda line: None)
    assert not any(tmp_path.iterdir())


def test_compare_end_to_end(tmp_path: Path) -> None:
    logs: list[str] = []
    result = compare("sentiment-minilm", TINY, fractions=[0.5, 1.0], output=tmp_path, probe=False, isolate=False,
                     log=logs.append)
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert len(saved["claims"]) == CLAIMS
    assert {c["verdict"] for c in saved["claims"]} <= {"holds", "does not hold", "not measured"}
    table = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| LoRA")
             or line.startswith("| One base")]
    assert len(table) == CLAIMS
    assert saved["examples"] == [16, 32] and saved["methods"]["lora"]["steps"] == 2
    verdicts = {c["claim"]: c["verdict"] for c in result["claims"]}
    assert verdicts["LoRA trains far fewer parameters"] == "holds"
    assert verdicts["LoRA checkpoints are far smaller"] == "holds"
    check_report(tmp_path, figures=5)
    assert not (tmp_path / "full-f1" / "model").exists() and not (tmp_path / "full-f1" / "checkpoint.pt").exists()
    assert (tmp_path / "lora-f1" / "adapter" / "adapter_config.json").is_file()
    # a second call reuses the finished runs
    logs.clear()
    again = compare("sentiment-minilm", TINY, fractions=[0.5, 1.0], output=tmp_path, probe=False, isolate=False,
                    log=logs.append)
    assert sum("reusing" in line for line in logs) == 4
    assert again["claims"] == result["claims"]


def test_compare_checks_every_run_before_the_first(tmp_path: Path) -> None:
    """quantize is valid for the LoRA runs but not for full fine-tuning: refused before any run starts."""
    with pytest.raises(ConfigError, match="quantize needs method=lora"):
        compare("sentiment-minilm", [*TINY, "quantize=int8"], fractions=[1.0], output=tmp_path, isolate=False,
                log=lambda line: None)
    assert not any(tmp_path.iterdir())
