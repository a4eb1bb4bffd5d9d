"""`lorakit.evidence.sweep`: the sensitivity verdicts on synthetic rows and the refusal of full fine-tuning recipes
(`sweep` end to end runs in test_evidence_recommend.py, whose recommend check needs a sweep)."""

from __future__ import annotations

import pytest

from lorakit import ConfigError
from lorakit.evidence import sweep, sweep_summary
from lorakit.tasks import Metric


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


def test_sweep_rejects_full_recipes() -> None:
    with pytest.raises(ConfigError, match="method=full"):
        sweep("sentiment-minilm", [1], overrides=["method=full"])


def test_sweep_refuses_bad_ranks_before_loading(tmp_path) -> None:
    with pytest.raises(ConfigError, match="positive integers"):
        sweep("sentiment-minilm", [0, 4], output=tmp_path, isolate=False, log=lambda line: None)
    with pytest.raises(ConfigError, match="train.lr must be > 0"):  # every run's recipe is checked first
        sweep("sentiment-minilm", [1], lrs=[-1.0], output=tmp_path, isolate=False, log=lambda line: None)
    assert not any(tmp_path.iterdir())
