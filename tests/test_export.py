"""Adapter folders for other tools (`lorakit.export`): merge into a model folder with a drift a user can trust,
export for vLLM / plain PEFT, and `lorakit info`."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit import LoraConfig, inject
from lorakit.export import merge_to_folder, output_drift
from lorakit.io import save_adapter

from conftest import randomize_lora


# -- merge drift over real tokens (issues 14 and 17) -------------------------------------------------------------
def test_output_drift_leaves_padding_positions_out() -> None:
    before = torch.zeros(2, 3, 4)
    after = before.clone()
    after[0, 0] = 1e-4  # a real token
    after[1, 2] = 5.0  # padding: meaningless, must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    drift = output_drift(before, after, {"attention_mask": mask})
    assert drift.numel() == 5 * 4 and float(drift.max()) == pytest.approx(1e-4)
    per_row = output_drift(torch.zeros(2, 3), torch.ones(2, 3), {"attention_mask": mask})  # (batch, labels)
    assert per_row.numel() == 6  # per-row outputs: nothing is padding


def test_merge_reports_the_true_drift_with_dropout_adapters(minilm, tmp_path) -> None:
    model, tokenizer = minilm
    inject(model, LoraConfig(r=8, alpha=16, target_modules=["query", "value"], dropout=0.1))
    randomize_lora(model, std=0.05)
    save_adapter(model, tmp_path / "a", tokenizer=tokenizer)
    report = merge_to_folder("minilm", tmp_path / "a", tmp_path / "merged")
    # the merge is exact up to float rounding: dropout left on by loading (old code) gave 0.33
    assert report.max_abs_diff < 1e-3, report
    assert report.mean_abs_diff < 1e-4, report


@pytest.mark.parametrize("mode", [True, False])
def test_merge_and_unload_keep_modes(mode, tiny) -> None:
    inject(tiny, LoraConfig(r=2, target_modules=["q", "v"], dropout=0.3, modules_to_save=["head"]))
    tiny.train(mode)
    tiny.layers[0].train(not mode)
    lorakit.merge(tiny)
    lorakit.unmerge(tiny)
    modes = [(m, m.training) for m in tiny.modules()]
    lorakit.unload(tiny, merge=True)
    kept = {id(m): t for m, t in modes}
    assert all(kept[id(m)] == m.training for m in tiny.modules())
