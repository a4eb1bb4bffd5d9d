"""Target selection, the targeting report, freezing, and bad input leaving the model unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import ConfigError, LoraConfig, TargetError, inject, targeting_report, trainable_parameters
from lorakit.cli import main as cli_main
from lorakit.layers import LoraLayer

from conftest import randomize_lora


def _adapted(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _snapshot(model: nn.Module) -> tuple[dict, list]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__) for n, m in model.named_modules()])


def test_suffix_list_regex_and_all_linear(tiny) -> None:
    inject(tiny, LoraConfig(r=2, target_modules=["q"]))
    assert _adapted(tiny) == ["layers.0.q", "layers.1.q"]
    lorakit.delete_adapter(tiny, "default")
    assert _adapted(tiny) == [] and lorakit.adapter_names(tiny) == []

    inject(tiny, LoraConfig(r=2, target_modules=r"layers\.1\.(q|v)"))
    assert _adapted(tiny) == ["layers.1.q", "layers.1.v"]
    lorakit.delete_adapter(tiny, "default")

    inject(tiny, LoraConfig(r=2, target_modules="all-linear"))
    assert _adapted(tiny) == ["layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v", "head"]


def test_suffix_means_whole_name_components(tiny) -> None:
    # "v" must not match "conv" or a name merely ending in the letter v
    report = targeting_report(tiny, LoraConfig(r=2, target_modules=["v"]))
    assert [row.name for row in report.rows] == ["layers.0.v", "layers.1.v"]


def test_exclude_and_layers_to_transform(tiny) -> None:
    cfg = LoraConfig(r=2, target_modules="all-linear", exclude_modules=["head"], layers_to_transform=[1])
    assert [row.name for row in targeting_report(tiny, cfg).rows] == ["layers.1.q", "layers.1.v"]
    cfg = LoraConfig(r=2, target_modules=["q", "v"], exclude_modules=r"layers\.0\..*")
    assert [row.name for row in targeting_report(tiny, cfg).rows] == ["layers.1.q", "layers.1.v"]


def test_all_linear_skips_output_embeddings_and_modules_to_save(smollm2_session) -> None:
    report = targeting_report(smollm2_session.model, LoraConfig(r=2, target_modules="all-linear"))
    names = [row.name for row in report.rows]
    assert "lm_head" not in names and len(names) == 30 * 7


def test_all_linear_leaves_modules_to_save_alone(tiny) -> None:
    cfg = LoraConfig(r=2, target_modules="all-linear", modules_to_save=["head"])
    assert "head" not in [row.name for row in targeting_report(tiny, cfg).rows]


def test_rank_and_alpha_patterns(tiny) -> None:
    cfg = LoraConfig(r=2, alpha=4, target_modules=["q", "v"], rank_pattern={r"layers\.1\.q": 5},
                     alpha_pattern={"v": 1})
    inject(tiny, cfg)
    layer = tiny.layers[1]["q"]
    assert layer.r["default"] == 5 and layer.scaling["default"] == 4 / 5
    assert tiny.layers[0]["q"].r["default"] == 2
    assert tiny.layers[0]["v"].scaling["default"] == 1 / 2


def test_report_lists_shapes_ranks_params_and_totals(tiny) -> None:
    cfg = LoraConfig(r=4, target_modules=["q", "v", "embed"], modules_to_save=["head"])
    report = targeting_report(tiny, cfg)
    rows = {row.name: row for row in report.rows}
    assert rows["layers.0.q"].shape == (16, 16) and rows["layers.0.q"].added_params == 4 * (16 + 16)
    assert rows["embed"].added_params == 4 * (20 + 16)
    assert report.modules_to_save == [("head", 16 * 3 + 3)]
    inject(tiny, cfg)
    trainable, total = trainable_parameters(tiny)
    assert trainable == report.trainable_params
    assert total == report.base_params + report.trainable_params
    text = str(report)
    assert "layers.0.q" in text and "16x16" in text and f"{report.trainable_params:,}" in text


def test_inject_freezes_everything_but_adapters_and_modules_to_save(tiny) -> None:
    inject(tiny, LoraConfig(r=2, target_modules=["q"], modules_to_save=["head"]))
    trainable = sorted(n for n, p in tiny.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        [f"layers.{i}.q.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"]
        + ["head.modules_to_save.default.weight", "head.modules_to_save.default.bias"])


@pytest.mark.parametrize("bias,expected", [("none", 0), ("lora_only", 2), ("all", 8)])
def test_bias_modes(tiny, bias: str, expected: int) -> None:
    inject(tiny, LoraConfig(r=2, target_modules=["q"], bias=bias))
    assert sum(1 for n, p in tiny.named_parameters() if p.requires_grad and n.endswith("bias")) == expected


BAD_CONFIGS = [
    (dict(target_modules=["qq"]), TargetError, "closest module names: q"),
    (dict(target_modules=r"layer\.\d+\.q"), TargetError, "matches no module"),
    (dict(target_modules=["q", "nonexistent"]), TargetError, "'nonexistent' matches no module"),
    (dict(target_modules=["layers"]), TargetError, "ModuleList, which lorakit cannot adapt"),
    (dict(target_modules=["q"], r=17, init="pissa"), ConfigError, "rank 17 is above the layer's 16 singular"),
    (dict(target_modules=["embed"], lora_bias=True), ConfigError, "lora_bias is not supported on Embedding"),
    (dict(target_modules=["conv"], init="pissa"), ConfigError, "pissa"),
    (dict(target_modules=["depthwise"]), TargetError, "adapts no module"),
    (dict(target_modules=["q"], modules_to_save=["haed"]), TargetError, "closest module names: head"),
    (dict(target_modules=["q"], layers_to_transform=[7]), TargetError, "no module after"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_CONFIGS)
def test_bad_targets_raise_clear_errors_and_leave_model_unchanged(tiny, tiny_ids, kwargs, error, message) -> None:
    before_state, before_modules = _snapshot(tiny)
    out = tiny(tiny_ids)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        inject(tiny, LoraConfig(**{"r": 2, **kwargs}))
    after_state, after_modules = _snapshot(tiny)
    assert before_modules == after_modules and before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert lorakit.adapter_names(tiny) == []
    assert torch.equal(tiny(tiny_ids), out)


@pytest.mark.parametrize("r", [0, -1, 2.5, True])
def test_rank_must_be_positive_int(r) -> None:
    with pytest.raises(ConfigError, match="positive integer rank"):
        LoraConfig(r=r, target_modules=["q"])


def test_duplicate_adapter_name_leaves_model_unchanged(tiny, tiny_ids) -> None:
    inject(tiny, LoraConfig(r=2, target_modules=["q"]))
    before_state, before_modules = _snapshot(tiny)
    with pytest.raises(lorakit.AdapterStateError, match="already exists"):
        lorakit.add_adapter(tiny, "default", LoraConfig(r=2, target_modules=["v"]))
    assert _snapshot(tiny)[1] == before_modules


def test_second_adapter_reuses_wrappers_and_can_target_new_layers(tiny) -> None:
    inject(tiny, LoraConfig(r=2, target_modules=["q"]))
    lorakit.add_adapter(tiny, "other", LoraConfig(r=3, target_modules=["q", "v"]))
    assert tiny.layers[0]["q"].adapter_names() == ["default", "other"]
    assert tiny.layers[0]["v"].adapter_names() == ["other"]
    assert not any("lora_A.default.lora" in n for n, _ in tiny.named_modules())  # never nested


def test_targets_cli_prints_report(capsys) -> None:
    assert cli_main(["targets", "minilm", "--target", "query", "value", "--rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.0.attention.self.query" in out and "12 modules adapted" in out
    assert cli_main(["targets", "minilm", "--target", "qeury"]) == 2
    assert "closest module names: query" in capsys.readouterr().err


def test_rank_above_a_layer_size_is_accepted_with_a_warning(tiny, tiny_ids) -> None:
    """Issue 20: r=17 on 16x16 layers was refused; PEFT accepts it (the extra rank adds parameters only)."""
    with pytest.warns(UserWarning, match="rank 17 on 'layers.0.q' .* above the 16 directions"):
        report = lorakit.targeting_report(tiny, LoraConfig(r=17, target_modules=["q"]))
    assert [row.r for row in report.targeted] == [17, 17] and report.added_params == 2 * 17 * 32
    with pytest.warns(UserWarning):
        inject(tiny, LoraConfig(r=17, target_modules=["q"]))
    randomize_lora(tiny, std=0.1)
    unmerged = tiny(tiny_ids)
    lorakit.merge(tiny)
    torch.testing.assert_close(tiny(tiny_ids), unmerged, atol=1e-5, rtol=1e-5)


def _candidates_by_named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The candidate rule written over ``named_modules`` (the walk before it stopped entering wrappers)."""
    from lorakit.layers import LoraParameter, ModulesToSave

    inside, out = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            inside.append(name + ".")
            if isinstance(module, LoraLayer):
                base = module.base_layer
                while isinstance(base, LoraParameter):
                    base = base.base_layer
                out.append((name, base))
            continue
        out.append((name, module))
    return out


def test_candidate_walk_skips_wrapper_insides_and_keeps_named_modules_order(tiny) -> None:
    from lorakit.inject import _candidates

    shared = nn.Linear(4, 4)
    tiny.extra = nn.ModuleDict({"a": shared, "b": shared})  # one module at two places: listed once, first place
    inject(tiny, LoraConfig(r=2, target_modules=["q", "extra.a"], modules_to_save=["head"]), "one")
    lorakit.add_adapter(tiny, "two", LoraConfig(r=3, target_modules="all-linear", exclude_modules=["head"]))
    lorakit.add_adapter(tiny, "three", LoraConfig(r=2, target_parameters=["embed.weight"]))
    got = list(_candidates(tiny))
    want = _candidates_by_named_modules(tiny)
    assert [n for n, _ in got] == [n for n, _ in want] and all(a is b for (_, a), (_, b) in zip(got, want))
    assert "extra.b" not in dict(got) and not any(".lora_" in n or "modules_to_save" in n for n, _ in got)


def test_list_targets_match_by_dotted_suffix_sets(tiny) -> None:
    from lorakit.inject import dotted_suffixes, suffix_match

    names = [n for n, _ in tiny.named_modules() if n]
    keys = ["q", "0.q", "layers.1.v", "ayers.1.v", "", ".q", "head", "layers", "1"]
    for name in names:
        assert {k for k in keys if k in dotted_suffixes(name)} == {k for k in keys if suffix_match(k, name)}
    report = targeting_report(tiny, LoraConfig(r=2, target_modules=["0.q", "layers.1.v", "head"]))
    assert [row.name for row in report.targeted] == ["layers.0.q", "layers.1.v", "head"]
    with pytest.raises(TargetError, match="target 'ayers.1.v' matches no module"):
        targeting_report(tiny, LoraConfig(r=2, target_modules=["q", "ayers.1.v"]))
