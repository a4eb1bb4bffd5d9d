"""Adapter folders for other tools (`lorakit.export`): merge into a model folder with a drift a user can trust,
export for vLLM / plain PEFT, and `lorakit info`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterError, LoraConfig, inject
from lorakit.cli import main
from lorakit.export import adapter_info, export_adapter, merge_to_folder, output_drift
from lorakit.fingerprint import base_fingerprint
from lorakit.io import CONFIG_FILE, PISSA_INIT_FILE, WEIGHTS_FILE, adapter_state_dict, load_adapter, save_adapter

from conftest import randomize_lora
from test_io import _inputs, _minilm_for, _out, minilm_classifier  # noqa: F401 - a module-scoped fixture


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


# -- merge -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["base", "sequence-classification"])
def test_merge_cli_writes_a_transformers_folder(task, minilm, minilm_classifier, tmp_path, capsys) -> None:
    import transformers

    head = task == "sequence-classification"
    model, tokenizer = _minilm_for("head" if head else "lora", minilm, minilm_classifier)
    inject(model, LoraConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"] if head
                             else None, task_type="SEQ_CLS" if head else None))
    randomize_lora(model, std=0.05)
    save_adapter(model, tmp_path / "a", tokenizer=tokenizer)
    inputs = _inputs(tokenizer)
    unmerged = _out(model, inputs)

    assert main(["merge", "minilm", str(tmp_path / "a"), str(tmp_path / "merged")]) == 0
    printed = capsys.readouterr().out
    assert "max |diff|" in printed and "mean |diff|" in printed
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    auto = transformers.AutoModelForSequenceClassification if head else transformers.AutoModel
    merged = auto.from_pretrained(tmp_path / "merged").eval()
    real = inputs["attention_mask"].bool() if not head else slice(None)  # padding positions carry no meaning
    diff = (_out(merged, inputs)[real] - unmerged[real]).abs().max().item()
    assert diff <= 1e-5 * max(1.0, unmerged[real].abs().max().item()), diff
    record = json.loads((tmp_path / "merged" / "lorakit_merge.json").read_text())
    assert record["max_abs_diff"] <= 1e-4 and record["task"] == task


# -- export ----------------------------------------------------------------------------------------------------
def test_export_vllm_lists_what_it_cannot_serve(tiny, tmp_path, capsys) -> None:
    dora = copy.deepcopy(tiny)
    inject(tiny, LoraConfig(r=2, target_modules=["embed", "q"], modules_to_save=["head"], bias="lora_only"))
    save_adapter(tiny, tmp_path / "a")
    report = export_adapter(tmp_path / "a", "vllm")
    reasons = " | ".join(report.reasons)
    assert not report.ok and "bias" in reasons and "modules_to_save ['head']" in reasons and "embedding" in reasons
    assert main(["export", str(tmp_path / "a"), "--target", "vllm", "--output", str(tmp_path / "out")]) == 1
    assert "cannot serve" in capsys.readouterr().out and not (tmp_path / "out").exists()
    with pytest.raises(AdapterError, match="cannot serve"):
        export_adapter(tmp_path / "a", "vllm", tmp_path / "out")
    inject(dora, LoraConfig(r=8, target_modules=["q"], use_dora=True))
    save_adapter(dora, tmp_path / "d")
    assert any("DoRA" in r for r in export_adapter(tmp_path / "d", "vllm").reasons)
    assert export_adapter(tmp_path / "d", "peft").ok


def test_export_vllm_pads_ranks_and_folds_scaling(tiny, tiny_ids, tmp_path) -> None:
    fresh, plain = copy.deepcopy(tiny), copy.deepcopy(tiny)
    inject(tiny, LoraConfig(r=4, alpha=8, target_modules=["q", "v"], rank_pattern={"v": 2}, use_rslora=True))
    randomize_lora(tiny)
    save_adapter(tiny, tmp_path / "a")
    assert main(["export", str(tmp_path / "a"), "--target", "vllm", "--output", str(tmp_path / "v")]) == 0
    config = json.loads((tmp_path / "v" / CONFIG_FILE).read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8 and config["rank_pattern"] == {}
    assert all(t.shape[0 if k.endswith("lora_A.weight") else 1] == 8
               for k, t in load_file(tmp_path / "v" / WEIGHTS_FILE).items())
    load_adapter(fresh, tmp_path / "v")
    assert (_out(fresh, tiny_ids) - _out(tiny, tiny_ids)).abs().max().item() <= 1e-5
    inject(plain, LoraConfig(r=8, target_modules=["q"]))  # already servable: copied unchanged
    save_adapter(plain, tmp_path / "p")
    report = export_adapter(tmp_path / "p", "vllm", tmp_path / "pv")
    assert report.ok and not report.conversions
    original, exported = load_file(tmp_path / "p" / WEIGHTS_FILE), load_file(tmp_path / "pv" / WEIGHTS_FILE)
    assert all(torch.equal(original[k], exported[k]) for k in original)


def test_pissa_exports_as_rank_2r_lora_for_the_original_base(minilm, tmp_path) -> None:
    model, tokenizer = minilm
    original, inputs = copy.deepcopy(model), _inputs(tokenizer)
    config = LoraConfig(r=4, alpha=8, target_modules=["query", "value"], init="pissa")
    fingerprint = base_fingerprint(model, config, tokenizer)  # before PiSSA rewrites the base weights
    inject(model, config)
    initial = adapter_state_dict(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "training" moves both A and B away from their SVD start
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.add_(0.02 * torch.randn(param.shape, generator=gen))
    trained = _out(model, inputs)
    assert (trained - _out(original, inputs)).abs().max().item() > 1e-2
    save_adapter(model, tmp_path / "pissa", tokenizer=tokenizer, fingerprint=fingerprint, pissa_initial=initial)
    assert (tmp_path / "pissa" / PISSA_INIT_FILE).is_file()

    report = export_adapter(tmp_path / "pissa", "peft", tmp_path / "lora")
    assert report.ok and "2r=8" in report.conversions[0]
    converted = json.loads((tmp_path / "lora" / CONFIG_FILE).read_text())
    assert converted["r"] == 8 and converted["lora_alpha"] == 16 and converted["init_lora_weights"] is True
    plain = copy.deepcopy(original)
    load_adapter(plain, tmp_path / "lora", tokenizer=tokenizer)  # fingerprint: the original base
    assert (_out(plain, inputs) - trained).abs().max().item() <= 1e-4
    lorakit.merge(plain)
    assert (_out(plain, inputs) - trained).abs().max().item() <= 1e-4
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "lora").eval()
    assert (_out(in_peft, inputs) - trained).abs().max().item() <= 1e-4

    vllm = export_adapter(tmp_path / "pissa", "vllm", tmp_path / "vllm")
    assert vllm.ok and json.loads((tmp_path / "vllm" / CONFIG_FILE).read_text())["r"] == 8
    served = copy.deepcopy(original)
    load_adapter(served, tmp_path / "vllm", tokenizer=tokenizer)
    assert (_out(served, inputs) - trained).abs().max().item() <= 1e-4
    # the PiSSA adapter itself, as PEFT does, recomputes the residual from the original base on load
    again = copy.deepcopy(original)
    load_adapter(again, tmp_path / "pissa", tokenizer=tokenizer)
    assert (_out(again, inputs) - trained).abs().max().item() <= 1e-4


def test_pissa_without_fingerprint_warns(tiny, tmp_path) -> None:
    inject(tiny, LoraConfig(r=2, target_modules=["q"], init="pissa"))
    with pytest.warns(UserWarning, match="no base fingerprint"):
        save_adapter(tiny, tmp_path / "a")
    assert adapter_info(tmp_path / "a")["fingerprint"] is None
    assert any("PiSSA" in r for r in export_adapter(tmp_path / "a", "vllm").reasons)


# -- info ------------------------------------------------------------------------------------------------------
def test_info_cli_shows_config_size_fingerprint_and_provenance(minilm, tmp_path, capsys) -> None:
    model, tokenizer = minilm
    inject(model, LoraConfig(r=8, alpha=16, target_modules=["query", "value"]))
    save_adapter(model, tmp_path / "a", provenance={"dataset": "rotten-tomatoes", "steps": 100}, tokenizer=tokenizer)
    base = model.config._name_or_path  # the packaged model folder, given by the user with --base
    assert main(["info", str(tmp_path / "a"), "--base", base]) == 0
    text = capsys.readouterr().out
    for expected in ("r=8", "query x6", "value x6", "73,728", "fingerprint    sha256", "rotten-tomatoes",
                     "% of it"):
        assert expected in text, expected
    assert main(["info", str(tmp_path / "a"), "--json", "--base", base]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 12 * 8 * (384 + 384) and info["ranks"] == [8]
    assert info["weights_bytes"] < info["base_model_bytes"] / 100
    assert main(["info", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("base", ["/usr", "/proc", "/", ["/usr"], "x" * 5000])
def test_info_never_opens_the_base_named_in_the_file(base, tiny, tmp_path, monkeypatch, capsys) -> None:
    source = copy.deepcopy(tiny)
    inject(source, LoraConfig(r=2, target_modules=["q"]))
    save_adapter(source, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    raw["base_model_name_or_path"] = base
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps(raw))
    walked = []
    for method in ("rglob", "glob", "iterdir"):
        real = getattr(Path, method)

        def spy(self, *args, _real=real, **kwargs):
            walked.append(self)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(Path, method, spy)
    if isinstance(base, str) and len(base) < 100:
        info = adapter_info(tmp_path / "a")
        assert info["base_model_name_or_path"] == base and "base_model_bytes" not in info
    else:
        assert main(["info", str(tmp_path / "a")]) == 2
        assert "base_model_name_or_path must be" in capsys.readouterr().err
    assert all(p == tmp_path / "a" or tmp_path / "a" in p.parents for p in walked), walked


def test_info_cli_on_malformed_metadata_is_one_line_error(tiny, tmp_path, capsys) -> None:
    source = copy.deepcopy(tiny)
    inject(source, LoraConfig(r=2, target_modules=["q"]))
    save_adapter(source, tmp_path / "a")
    for metadata in ("[1, 2]", json.dumps({"fingerprint": {"sha256": 5}}), "[" * 10_000 + "]" * 10_000):
        save_file(load_file(tmp_path / "a" / WEIGHTS_FILE), tmp_path / "a" / WEIGHTS_FILE,
                  metadata={"format": "pt", "lorakit": metadata})
        assert main(["info", str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lorakit: error:") and err.count("\n") == 1 and "metadata" in err
