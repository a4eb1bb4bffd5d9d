"""Evidence commands: verdict rules on synthetic numbers (both directions), the rank/lr suggestion rules, the
knowledge probe, and `compare` / `sweep` / `recommend` / `inspect` end to end on tiny slices of the real data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from lorakit import ConfigError
from lorakit.cli import main as cli_main
from lorakit.compare import (COST_MARGIN, TOLERANCE, Metric, compare, fraction_sizes, judge, mean_reciprocal_rank,
                             next_power_of_two, probe_for, race_arms, recommend, run_probe, suggest_lr, suggest_rank,
                             sweep_summary)

# one thread: on 2 shared cores, two OpenMP threads per process slow everything down several times
TINY = ["train.max_steps=2", "train.max_train_examples=32", "train.batch_size=8", "train.max_length=32",
        "eval.max_examples=16", "eval.batch_size=16", "train.num_threads=1"]
PNG = b"\x89PNG\r\n\x1a\n"
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


def test_sweep_sensitivity_verdicts() -> None:
    metric = Metric("accuracy", True)
    flat = [{"r": r, "lr": 1e-3, "held_out": 0.80 + 0.001 * i} for i, r in enumerate((1, 4, 16))]
    steep = [{"r": r, "lr": 1e-3, "held_out": v} for r, v in ((1, 0.60), (4, 0.75), (16, 0.80))]
    steep += [{"r": 16, "lr": 1e-2, "held_out": 0.795}]
    flat_claims = sweep_summary(flat, metric)["claims"]
    steep_result = sweep_summary(steep, metric)
    assert [c["verdict"] for c in flat_claims] == ["does not hold", "not measured"]
    assert [c["verdict"] for c in steep_result["claims"]] == ["holds", "does not hold"]
    assert (steep_result["best"]["r"], steep_result["best"]["lr"]) == (16, 1e-3)


def test_suggestion_rules() -> None:
    assert [next_power_of_two(x) for x in (0.5, 1, 3, 8, 9)] == [1, 1, 4, 8, 16]
    assert suggest_rank([1, 2, 5, 7, 100]) == 8  # median 5 -> 8
    assert suggest_rank([300, 300], max_rank=64) == 64
    lrs = [1e-4 * 2 ** k for k in range(10)]
    losses = [1.0, 0.99, 0.95, 0.9, 0.8, 0.6, 0.5, 0.7, 1.5, 4.0]
    lr, smoothed = suggest_lr(lrs, losses)
    best = lrs[smoothed.index(min(smoothed))]
    assert lr == pytest.approx(best / 3) and len(smoothed) == len(losses)
    assert fraction_sizes(1000, [0.001, 0.5, 1.0], rows_per_step=8) == [8, 500, 1000]
    with pytest.raises(ConfigError, match="fractions"):
        fraction_sizes(1000, [1.5], 8)


def test_knowledge_probe(minilm) -> None:
    assert mean_reciprocal_rank(torch.eye(4)) == 1.0
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # each query ranks its answer second
    assert mean_reciprocal_rank(swapped) == 0.5
    assert probe_for("sequence-classification", "rotten-tomatoes") == "faq-retrieval"
    assert probe_for("causal-lm", "faq-en") == "general-perplexity"
    assert probe_for("image-classification", "mnist-5k") is None
    model, tokenizer = minilm
    score = run_probe("faq-retrieval", model, tokenizer, limit=16)
    assert 0.5 < score <= 1.0  # the pretrained encoder matches questions to their answers


def _check_report(folder: Path, figures: int) -> None:
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == figures
    for png in pngs:
        assert png.read_bytes()[:8] == PNG
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == figures and "<table>" in html
    markdown = (folder / "report.md").read_text()
    assert all(png.name in markdown for png in pngs)


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
    _check_report(tmp_path, figures=5)
    assert not (tmp_path / "full-f1" / "model").exists() and not (tmp_path / "full-f1" / "checkpoint.pt").exists()
    assert (tmp_path / "lora-f1" / "adapter" / "adapter_config.json").is_file()
    # a second call reuses the finished runs
    logs.clear()
    again = compare("sentiment-minilm", TINY, fractions=[0.5, 1.0], output=tmp_path, probe=False, isolate=False,
                    log=logs.append)
    assert sum("reusing" in line for line in logs) == 4
    assert again["claims"] == result["claims"]


def test_sweep_inspect_and_recommend(tmp_path: Path, capsys) -> None:
    sweep_dir = tmp_path / "sweep"
    # the real CLI: every run in its own process
    assert cli_main(["sweep", "sentiment-minilm", *TINY, "--ranks", "1,4", "-o", str(sweep_dir)]) == 0
    result = json.loads((sweep_dir / "sweep.json").read_text())
    assert [row["r"] for row in result["rows"]] == [1, 4]
    assert result["rows"][0]["trainable_params"] < result["rows"][1]["trainable_params"]
    assert len(result["claims"]) == 2
    _check_report(sweep_dir, figures=1)

    out = tmp_path / "inspect"
    assert cli_main(["inspect", str(sweep_dir / "r4-lr0.002"), "--against", str(sweep_dir / "r1-lr0.002"),
                     "-o", str(out)]) == 0
    inspected = json.loads((out / "inspect.json").read_text())
    assert len(inspected["layers"]) == 25 and {x["r"] for x in inspected["layers"]} == {4}
    assert all(s["r_a"] == 4 and s["r_b"] == 1 and 0 <= s["full"] <= 1 + 1e-9 for s in inspected["similarity"])
    _check_report(out, figures=4)
    assert "subspace similarity" in capsys.readouterr().out

    rec = tmp_path / "recommend"  # the API, its check run in this process (one process start less)
    recommend("sentiment-minilm", TINY, rec, grad_batches=2, lr_steps=4, sweep_dir=sweep_dir, isolate=False,
              log=lambda line: None)
    suggestion = json.loads((rec / "recommend.json").read_text())
    assert suggestion["rank"] in (1, 2, 4, 8, 16, 32, 64) and 1e-5 / 3 <= suggestion["lr"] <= 1e-1
    assert len(suggestion["layers"]) == 25 and len(suggestion["lr_range"]["lrs"]) <= 4
    check = suggestion["check"]
    assert check["verdict"] in ("holds", "does not hold") and check["cost_fraction"] > 0
    _check_report(rec, figures=2)

    raced = tmp_path / "race"  # --race: both arms train a whole epoch (validation) and the better is suggested
    one_epoch = [o for o in TINY if not o.startswith("train.max_steps")]
    with pytest.raises(ConfigError, match="validated nothing"):  # a sweep of 2 steps never reaches validation
        recommend("sentiment-minilm", TINY, raced, grad_batches=2, lr_steps=4, max_rank=8, sweep_dir=sweep_dir,
                  isolate=False, race=True, log=lambda line: None)
    recommend("sentiment-minilm", one_epoch, raced, grad_batches=2, lr_steps=4, max_rank=8, isolate=False,
              race=True, log=lambda line: None)
    suggestion = json.loads((raced / "recommend.json").read_text())
    arms = suggestion["race"]
    assert [(a["rank"], a["lr"]) for a in arms] == race_arms(suggestion["spectrum_suggestion"]["rank"],
                                                             suggestion["spectrum_suggestion"]["lr"], 8)
    chosen = next(a for a in arms if a["rank"] == suggestion["rank"])
    assert all(chosen["validation"] >= a["validation"] for a in arms)  # accuracy: higher is better
    assert suggestion["cpu_time_s"] >= sum(a["cpu_time_s"] for a in arms) and "check" not in suggestion
    _check_report(raced, figures=2)


def test_recommend_is_reproducible(tmp_path: Path) -> None:
    """Same recipe and seed, same suggestion and the same range-test losses (the probes run the base model in
    train mode: its dropout must be seeded)."""
    runs = [recommend("sentiment-minilm", TINY, tmp_path / str(k), grad_batches=3, lr_steps=5, isolate=False,
                      log=lambda line: None) for k in range(2)]
    assert runs[0]["lr_range"]["losses"] == runs[1]["lr_range"]["losses"]
    assert [x["energy_rank"] for x in runs[0]["layers"]] == [x["energy_rank"] for x in runs[1]["layers"]]
    assert (runs[0]["rank"], runs[0]["lr"]) == (runs[1]["rank"], runs[1]["lr"])


def test_race_arms_keep_rank_times_lr() -> None:
    assert race_arms(8, 4e-3) == [(8, 4e-3), (32, 1e-3)]
    assert race_arms(32, 1.96e-3) == [(32, 1.96e-3), (64, 0.00098)]  # capped at max_rank
    assert race_arms(64, 1e-3) == [(64, 1e-3)]  # nothing wider to try


def test_sweep_rejects_full_recipes() -> None:
    from lorakit.compare import sweep

    with pytest.raises(ConfigError, match="method=full"):
        sweep("sentiment-minilm", [1], overrides=["method=full"])
