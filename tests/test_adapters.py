"""Many adapters on one model: activation, disabling, deletion, mixed batches, combination, merge, unload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import AdapterStateError, ConfigError, LoraConfig, inject
from lorakit.layers import LoraLayer, ModulesToSave

from conftest import randomize_lora

FULL = LoraConfig(r=2, alpha=4, target_modules=["q", "v", "embed", "conv", "pointwise"], modules_to_save=["head"])


def _two_adapters(tiny):
    inject(tiny, FULL)
    lorakit.add_adapter(tiny, "b", LoraConfig(r=3, alpha=3, target_modules=["q", "embed", "conv"],
                                              modules_to_save=["head"]))
    randomize_lora(tiny, std=0.2)
    with torch.no_grad():
        tiny.head.modules_to_save["b"].weight.add_(0.5)
    return tiny


def test_set_adapter_switches_and_sums(tiny, tiny_ids) -> None:
    _two_adapters(tiny)
    with lorakit.disable_adapters(tiny):
        base = tiny(tiny_ids)
    lorakit.set_adapter(tiny, "default")
    out_a = tiny(tiny_ids)
    lorakit.set_adapter(tiny, "b")
    out_b = tiny(tiny_ids)
    assert lorakit.active_adapters(tiny) == ["b"]
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
    # both active: every layer adds both updates (checked per layer: the model is nonlinear)
    lorakit.set_adapter(tiny, ["default", "b"])
    layer = tiny.layers[0]["q"]
    x = torch.randn(2, 16)
    expected = layer.base_layer(x) + layer.lora_output(x, "default") + layer.lora_output(x, "b")
    torch.testing.assert_close(layer(x), expected)


def test_only_active_adapters_train(tiny) -> None:
    _two_adapters(tiny)
    lorakit.set_adapter(tiny, "b")
    trainable = [n for n, p in tiny.named_parameters() if p.requires_grad]
    assert trainable and all(".b." in n or n.endswith(".b") for n in trainable)


def test_disable_adapters_gives_base_output_even_when_merged(tiny, tiny_ids) -> None:
    base = tiny(tiny_ids)
    _two_adapters(tiny)
    with lorakit.disable_adapters(tiny):
        torch.testing.assert_close(tiny(tiny_ids), base, atol=1e-6, rtol=0)
    adapted = tiny(tiny_ids)
    lorakit.merge(tiny)
    with lorakit.disable_adapters(tiny):
        torch.testing.assert_close(tiny(tiny_ids), base, atol=1e-5, rtol=0)
    assert tiny.layers[0]["q"].merged_adapters == ["default"]  # merged again afterwards
    torch.testing.assert_close(tiny(tiny_ids), adapted, atol=1e-5, rtol=0)


def test_delete_adapter(tiny, tiny_ids) -> None:
    _two_adapters(tiny)
    lorakit.set_adapter(tiny, "b")
    out_b = tiny(tiny_ids)
    lorakit.delete_adapter(tiny, "default")
    assert lorakit.adapter_names(tiny) == ["b"]
    assert not isinstance(tiny.layers[0]["v"], LoraLayer)  # only "default" lived there
    torch.testing.assert_close(tiny(tiny_ids), out_b)
    with pytest.raises(AdapterStateError, match="no adapter named 'default'.*adapters: \\['b'\\]"):
        lorakit.delete_adapter(tiny, "default")
    with pytest.raises(AdapterStateError, match="no adapter named 'zzz'"):
        lorakit.set_adapter(tiny, "zzz")


def test_merge_twice_is_refused_and_model_unchanged(tiny, tiny_ids) -> None:
    _two_adapters(tiny)
    lorakit.merge(tiny, ["default"])
    weights = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(AdapterStateError, match="already merged"):
        lorakit.merge(tiny, ["b", "default"])
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in weights.items())
    assert tiny.layers[0]["q"].merged_adapters == ["default"]


def test_safe_merge_refuses_nan_and_keeps_weights(tiny) -> None:
    _two_adapters(tiny)
    with torch.no_grad():
        tiny.layers[1]["v"].lora_B["default"].weight[0, 0] = float("inf")
    weights = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(AdapterStateError, match="into layers.1.v gives NaN/inf"):
        lorakit.merge(tiny, safe=True)
    for key, value in weights.items():
        assert torch.equal(value, tiny.state_dict()[key]), key
    assert not any(layer.merged for _, layer in lorakit.adapters.lora_layers(tiny))
    lorakit.merge(tiny, safe=False)  # the unsafe merge goes through
    assert not torch.isfinite(tiny.layers[1]["v"].base_layer.weight).all()


@pytest.mark.parametrize("names", [
    ["b", None, "default", "b"],  # interleaved: gathered rows
    ["b", "b", None, "default"],  # contiguous runs of unequal length: views and one concatenation
    ["default", "default", "b", "b"],  # equal contiguous groups: plain reshapes
], ids=["interleaved", "runs", "equal-runs"])
def test_mixed_batch_equals_each_row_alone(tiny, tiny_ids, names) -> None:
    _two_adapters(tiny)
    with lorakit.route(tiny, names):
        mixed = tiny(tiny_ids)
        with torch.inference_mode():  # the update goes into the base output in place (baddbmm for Linear)
            torch.testing.assert_close(tiny(tiny_ids), mixed, atol=1e-6, rtol=0)
    for i, name in enumerate(names):
        if name is None:
            with lorakit.disable_adapters(tiny):
                alone = tiny(tiny_ids[i:i + 1])
        else:
            lorakit.set_adapter(tiny, name)
            alone = tiny(tiny_ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-6, rtol=0)


def test_mixed_batch_with_dora_and_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    inject(model, LoraConfig(r=2, target_modules=["0", "2"], use_dora=True))
    lorakit.add_adapter(model, "plain", LoraConfig(r=4, target_modules=["0"]))
    randomize_lora(model, std=0.3)
    lorakit.set_adapter(model, ["default", "plain"])  # both train
    x = torch.randn(3, 8)
    names = ["plain", "default", "plain"]
    with lorakit.route(model, names):
        mixed = model(x)
    mixed.sum().backward()
    grad_mixed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for i, name in enumerate(names):
        lorakit.set_adapter(model, name)
        alone = model(x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-6, rtol=0)
        alone.sum().backward()
    lorakit.set_adapter(model, ["default", "plain"])
    for name, grad in grad_mixed.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-6, rtol=1e-5)


def test_contiguous_mixed_batch_gradients_equal_each_group_alone(tiny, tiny_ids) -> None:
    """Multi-task batches (one task's rows after another) take the view path in every layer type (DoRA sends
    Linear there too); outputs and gradients must be those of running each group through its own adapter."""
    inject(tiny, LoraConfig(r=2, target_modules=["q", "v", "embed", "conv", "pointwise"],
                            modules_to_save=["head"]))
    lorakit.add_adapter(tiny, "b", LoraConfig(r=3, target_modules=["q", "v"], use_dora=True,
                                              modules_to_save=["head"]))
    randomize_lora(tiny, std=0.2)
    lorakit.set_adapter(tiny, ["default", "b"])
    tiny.train()
    names, groups = ["b", "b", "default", "default"], [("b", slice(0, 2)), ("default", slice(2, 4))]
    with lorakit.route(tiny, names):
        mixed = tiny(tiny_ids)
    mixed.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None}
    tiny.zero_grad()
    for name, rows in groups:
        lorakit.set_adapter(tiny, name)
        alone = tiny(tiny_ids[rows])
        torch.testing.assert_close(mixed[rows], alone, atol=1e-6, rtol=0)
        alone.pow(2).sum().backward()
    assert grads and set(grads) == {n for n, p in tiny.named_parameters() if p.grad is not None}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, tiny.get_parameter(name).grad, atol=1e-6, rtol=1e-5)


def test_route_rejects_unknown_names_and_merged_models(tiny, tiny_ids) -> None:
    _two_adapters(tiny)
    with pytest.raises(AdapterStateError, match="no adapter named 'c'"):
        with lorakit.route(tiny, ["c"] * 4):
            pass
    lorakit.merge(tiny)
    with pytest.raises(AdapterStateError, match="unmerged"):
        with lorakit.route(tiny, ["b"] * 4):
            pass


def test_add_weighted_adapter_cat_is_exact_and_svd_full_rank_is_exact(tiny, tiny_ids) -> None:
    _two_adapters(tiny)
    layer = tiny.layers[0]["q"]
    expected = 0.7 * layer.delta_weight("default") - 0.4 * layer.delta_weight("b")
    lorakit.add_weighted_adapter(tiny, ["default", "b"], [0.7, -0.4], "cat", method="cat")
    torch.testing.assert_close(layer.delta_weight("cat"), expected, atol=1e-6, rtol=0)
    assert layer.r["cat"] == 5
    lorakit.add_weighted_adapter(tiny, ["default", "b"], [0.7, -0.4], "svd", method="svd", svd_rank=5)
    torch.testing.assert_close(layer.delta_weight("svd"), expected, atol=1e-5, rtol=0)
    lorakit.add_weighted_adapter(tiny, ["default", "b"], [0.7, -0.4], "svd1", method="svd", svd_rank=1)
    assert layer.r["svd1"] == 1
    assert lorakit.get_config(tiny, "cat").rank_pattern  # per-layer ranks recorded
    for name in ("cat", "svd"):  # works through the whole model too, incl. embedding and conv layers
        emb = tiny.embed
        torch.testing.assert_close(emb.delta_weight(name),
                                   0.7 * emb.delta_weight("default") - 0.4 * emb.delta_weight("b"),
                                   atol=1e-5, rtol=0)


def test_add_weighted_adapter_linear_formula_and_errors(tiny) -> None:
    inject(tiny, LoraConfig(r=2, alpha=4, target_modules=["q"]))
    lorakit.add_adapter(tiny, "b", LoraConfig(r=2, alpha=2, target_modules=["q"]))
    randomize_lora(tiny)
    lorakit.add_weighted_adapter(tiny, ["default", "b"], [0.5, 2.0], "lin", method="linear")
    layer = tiny.layers[0]["q"]
    A = (0.5 * 2.0) ** 0.5 * layer.lora_A["default"].weight + (2.0 * 1.0) ** 0.5 * layer.lora_A["b"].weight
    B = (0.5 * 2.0) ** 0.5 * layer.lora_B["default"].weight + (2.0 * 1.0) ** 0.5 * layer.lora_B["b"].weight
    torch.testing.assert_close(layer.delta_weight("lin"), B @ A)
    lorakit.add_adapter(tiny, "r3", LoraConfig(r=3, target_modules=["q"]))
    with pytest.raises(ConfigError, match="method='linear' needs"):
        lorakit.add_weighted_adapter(tiny, ["default", "r3"], [1, 1], "x", method="linear")
    with pytest.raises(AdapterStateError, match="already exists"):
        lorakit.add_weighted_adapter(tiny, ["default"], [1], "b", method="cat")
    with pytest.raises(ConfigError, match="one weight per source"):
        lorakit.add_weighted_adapter(tiny, ["default", "b"], [1], "y", method="cat")
    assert "x" not in lorakit.adapter_names(tiny) and "y" not in lorakit.adapter_names(tiny)


def test_unload_merged_returns_plain_model_with_same_output(tiny, tiny_ids) -> None:
    _two_adapters(tiny)
    lorakit.set_adapter(tiny, "b")
    out = tiny(tiny_ids)
    plain = lorakit.unload(tiny, merge=True)
    assert plain is tiny
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in plain.modules())
    assert not any("lora" in k or "modules_to_save" in k for k in plain.state_dict())
    torch.testing.assert_close(plain(tiny_ids), out, atol=1e-5, rtol=0)
    assert lorakit.adapter_names(plain) == []


def test_unload_without_merge_restores_base(tiny, tiny_ids) -> None:
    base = tiny(tiny_ids)
    keys = set(tiny.state_dict())
    _two_adapters(tiny)
    lorakit.merge(tiny)
    plain = lorakit.unload(tiny, merge=False)
    assert set(plain.state_dict()) == keys
    torch.testing.assert_close(plain(tiny_ids), base, atol=1e-5, rtol=0)


def test_operations_on_a_model_without_adapters_are_clear(tiny) -> None:
    for call in (lambda: lorakit.set_adapter(tiny, "x"), lambda: lorakit.merge(tiny),
                 lambda: lorakit.unload(tiny)):
        with pytest.raises(AdapterStateError, match="no LoRA adapters"):
            call()


def test_lora_modules_walk_equals_named_modules_filter(tiny) -> None:
    """`lora_modules` skips the inside of LoRA layers (route walks the model every mixed batch): same names,
    same order as filtering ``named_modules``."""
    _two_adapters(tiny)
    from lorakit.layers import LoraLayer, ModulesToSave

    expected = [(n, m) for n, m in tiny.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))]
    assert list(lorakit.adapters.lora_modules(tiny)) == expected
    assert len(expected) > 5
