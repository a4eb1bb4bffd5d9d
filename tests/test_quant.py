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


# -- quantize while reading (lorakit.quant_load) ----------------------------------------------------------------
def _same_model(new: nn.Module, old: nn.Module) -> None:
    """Every tensor (state dict and non-persistent buffers), dtype, requires_grad, tying and mode equal."""
    new_state, old_state = new.state_dict(), old.state_dict()
    assert new_state.keys() == old_state.keys()
    for key in new_state:
        assert new_state[key].dtype == old_state[key].dtype and torch.equal(new_state[key], old_state[key]), key
    for (name, buf), (_, other) in zip(new.named_buffers(), old.named_buffers()):
        assert torch.equal(buf, other), name
    assert [(n, p.requires_grad) for n, p in new.named_parameters()] == \
        [(n, p.requires_grad) for n, p in old.named_parameters()]
    assert [type(m).__name__ for m in new.modules()] == [type(m).__name__ for m in old.modules()]
    assert new.training == old.training


def _tiny_llama(folder, shard: str | None = None) -> None:
    """A random 2-layer Llama with tied embeddings saved as safetensors (sharded when ``shard`` is a size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))


def _maps_of(folder) -> list[str]:
    with open("/proc/self/maps") as maps:
        return [line for line in maps if str(folder) in line]


@pytest.mark.parametrize("scheme,dtype", [("int8", torch.float32), ("nf4", torch.float32), ("int8", torch.bfloat16),
                                          ("nf4", torch.bfloat16), (None, torch.bfloat16)])
@pytest.mark.parametrize("shard", [None, "60KB"])
def test_quantize_while_reading_equals_loading_then_quantizing(tmp_path, scheme, dtype, shard) -> None:
    """A Llama (tied lm_head, rotary buffers), whole or sharded (model.safetensors.index.json): the model built
    while reading (quantized, or only cast to bf16) equals from_pretrained (+ quantize_model) exactly, and no
    checkpoint file stays mapped."""
    from transformers import AutoModelForCausalLM

    from lorakit.models import load_model

    _tiny_llama(tmp_path, shard)
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    new = load_model(str(tmp_path), "causal-lm", dtype=dtype, quantize=scheme).model
    assert _maps_of(tmp_path) == []
    old = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    if scheme:
        quantize_model(old, scheme)
    _same_model(new, old)
    assert new.get_output_embeddings().weight is new.get_input_embeddings().weight
    assert sum(isinstance(m, QuantizedLinear) for m in new.modules()) == (2 * 7 if scheme else 0)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(new(input_ids=ids).logits, old(input_ids=ids).logits)


@pytest.mark.parametrize("scheme", ["int8", "nf4", None])
def test_quantize_while_reading_a_classifier_draws_the_same_new_head(scheme) -> None:
    """MiniLM (a BertModel checkpoint read into BertForSequenceClassification: key prefix added) with a new,
    seeded classifier kept full precision: equal to the old path, head included."""
    from lorakit.models import load_model

    kwargs = dict(num_labels=3, seed=7, dtype=torch.bfloat16)
    new = load_model("minilm", "sequence-classification", quantize=scheme, keep_full=("classifier",), **kwargs)
    old = load_model("minilm", "sequence-classification", **kwargs)
    if scheme:
        quantize_model(old.model, scheme, skip=("classifier",))
    else:  # the old way: transformers' own bf16 load
        import transformers

        with torch.random.fork_rng():
            torch.manual_seed(7)
            old.model = transformers.AutoModelForSequenceClassification.from_pretrained(
                old.path, num_labels=3, dtype=torch.bfloat16).eval()
    _same_model(new.model, old.model)
    assert type(new.model.classifier) is nn.Linear and new.model.classifier.weight.requires_grad


def test_a_checkpoint_that_does_not_map_onto_the_model_falls_back(tmp_path) -> None:
    """A weight missing outside the head (transformers would re-initialise it): `load_while_reading` declines,
    and `load_model` gives the old path's model."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.models import load_model
    from lorakit.quant_load import load_while_reading

    _tiny_llama(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = AutoConfig.from_pretrained(tmp_path)
    assert load_while_reading(tmp_path, AutoModelForCausalLM, config, "nf4") is None
    torch.manual_seed(1)
    new = load_model(str(tmp_path), "causal-lm", quantize="nf4", seed=1).model
    old = quantize_model(load_model(str(tmp_path), "causal-lm", seed=1).model, "nf4")
    _same_model(new, old)
