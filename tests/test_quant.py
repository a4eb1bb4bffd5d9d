"""Quantized frozen base (int8, NF4 with double quantization) with LoRA on top."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, inject
from lorakit.quant import NF4_LEVELS, QuantizedLinear, dequantize, merge_drift, quantize, quantize_model, weight_bytes

from conftest import randomize_lora


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(96, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 10)).eval()


@pytest.mark.parametrize("scheme,ratio,max_rel", [("int8", 0.30, 0.01), ("nf4", 0.16, 0.12)])
def test_storage_and_error(scheme: str, ratio: float, max_rel: float) -> None:
    weight = torch.randn(256, 512)
    stored = quantize(weight, scheme)
    back = dequantize(stored, scheme, tuple(weight.shape), torch.float32)
    nbytes = sum(t.numel() * t.element_size() for t in stored.values())
    assert nbytes <= ratio * weight.numel() * 4
    assert ((back - weight).norm() / weight.norm()).item() <= max_rel


def test_nf4_represents_its_code_book_exactly() -> None:
    # a block made of the 16 levels times a scale comes back exactly (up to the double-quantized absmax)
    weight = (NF4_LEVELS.repeat(4 * 256) * 0.5).reshape(256, 64)
    back = dequantize(quantize(weight, "nf4"), "nf4", (256, 64), torch.float32)
    assert (back - weight).abs().max().item() < 1e-6


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_lora_on_quantized_base(scheme: str) -> None:
    model = _mlp()
    x = torch.randn(5, 96)
    full = model(x)
    quantize_model(model, scheme)
    assert all(isinstance(m, QuantizedLinear) for m in model if not isinstance(m, nn.GELU))
    stored, fp32 = weight_bytes(model)
    assert stored <= (0.30 if scheme == "int8" else 0.16) * fp32
    quantized = model(x)
    assert (quantized - full).abs().max() < (0.05 if scheme == "int8" else 0.3)
    inject(model, LoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(model(x), quantized)  # B = 0: exactly the quantized base
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    assert all(torch.equal(frozen[n], b) for n, b in model.named_buffers())  # the quantized base never moves
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_merge_into_quantized_base_reports_drift(scheme: str) -> None:
    model = quantize_model(_mlp(), scheme)
    inject(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(model, std=0.1)
    x = torch.randn(4, 96)
    unmerged = model.eval()(x)
    drift = merge_drift(model[0], "default")
    assert 0 < drift["relative"] < (0.01 if scheme == "int8" else 0.15)
    lorakit.merge(model)
    merged = model(x)
    assert (merged - unmerged).abs().max() < (0.05 if scheme == "int8" else 0.5)
    lorakit.unmerge(model)  # lossy for a quantized base, but close
    assert (model(x) - unmerged).abs().max() < (0.05 if scheme == "int8" else 0.5)


def test_safe_merge_restores_a_quantized_base() -> None:
    model = quantize_model(_mlp(), "int8")
    inject(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(model)
    with torch.no_grad():
        model[4].lora_B["default"].weight[0, 0] = float("nan")
    before = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.raises(lorakit.AdapterStateError, match="NaN/inf"):
        lorakit.merge(model)
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())


def test_bad_scheme() -> None:
    with pytest.raises(lorakit.ConfigError, match="'int8' or 'nf4'"):
        QuantizedLinear(nn.Linear(4, 4), "int4")  # type: ignore[arg-type]


def test_training_recipe_on_a_quantized_base(tmp_path) -> None:
    from lorakit.cli import main as cli_main
    from lorakit.recipes import load_recipe
    from lorakit.train import train

    recipe = load_recipe("sentiment-minilm", ["quantize=nf4", "train.max_steps=2", "train.max_train_examples=32",
                                              "train.batch_size=8", "eval.max_examples=8", "train.progress=false"])
    metrics = train(recipe, tmp_path)
    assert metrics["quantized_weight_bytes"] <= 0.16 * metrics["quantized_weight_fp32_bytes"]
    assert metrics["total_params"] == 22_868_356  # quantized weights still count as the model's parameters
    merged = metrics["quantized_merge"]  # merged into the NF4 base after saving: drift and merged metrics
    assert merged["layers"] == 25 and 0 < merged["mean_relative"] <= merged["worst_relative"] < 0.2
    assert abs(merged["eval"]["accuracy"] - metrics["eval"]["accuracy"]) <= 0.5 and merged["eval"]["examples"] == 8
    assert cli_main(["eval", str(tmp_path), "--max-examples", "8"]) == 0  # reloads: quantize, then the adapter
    with pytest.raises(lorakit.ConfigError, match="quantize needs method=lora"):
        load_recipe("sentiment-minilm", ["quantize=int8", "method=full"])
