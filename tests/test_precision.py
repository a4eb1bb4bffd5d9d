"""``train.dtype``: a bf16/fp16-stored frozen base with fp32 adapters, heads and optimizer state."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit.config import LoraConfig
from lorakit.inject import inject
from lorakit.precision import keep_trainable_fp32

BERT = dict(model_type="bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=300, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _pair(use_dora: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same classifier with LoRA (and a trained head copy), stored in fp32 and in bf16."""
    import transformers

    torch.manual_seed(0)
    ref = transformers.AutoModelForSequenceClassification.from_config(transformers.AutoConfig.for_model(**BERT))
    low = copy.deepcopy(ref).to(torch.bfloat16)
    for model in (ref, low):
        torch.manual_seed(1)
        inject(model, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                                 use_dora=use_dora))
    return ref.train(), low.train()


@pytest.mark.parametrize("use_dora", [False, True])
def test_bf16_base_trains_fp32_adapters_close_to_the_fp32_model(use_dora: bool) -> None:
    ref, low = _pair(use_dora)
    assert keep_trainable_fp32(low) > 0
    assert {p.dtype for p in low.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in low.parameters() if not p.requires_grad} == {torch.bfloat16}
    ids = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(2))
    outs = []
    for model in (ref, low):
        with torch.no_grad():  # B random so the adapters change the output
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
        logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 0])).backward()
        outs.append(logits.float())
    torch.testing.assert_close(outs[1], outs[0], atol=5e-2, rtol=5e-2)
    for (name, p_ref), (_, p_low) in zip(ref.named_parameters(), low.named_parameters()):
        if p_ref.requires_grad:
            assert p_low.grad is not None and p_low.grad.dtype == torch.float32, name
            similarity = torch.nn.functional.cosine_similarity(p_low.grad.flatten(), p_ref.grad.flatten(), dim=0)
            assert similarity > 0.9, name  # bf16 rounding only


def test_fp32_model_is_left_alone() -> None:
    ref, _ = _pair(False)
    before = [p.data_ptr() for p in ref.parameters()]
    assert keep_trainable_fp32(ref) == 0
    assert [p.data_ptr() for p in ref.parameters()] == before


@pytest.mark.parametrize("overrides, message", [
    (["train.dtype=bf8"], "fp32, bf16 or fp16"),
    (["train.dtype=bf16", "method=full"], "full fine-tuning trains every weight"),
])
def test_recipe_dtype_refused(overrides: list[str], message: str) -> None:
    from lorakit.errors import ConfigError
    from lorakit.recipes import load_recipe

    with pytest.raises(ConfigError, match=message):
        load_recipe("sentiment-minilm", overrides)


def test_recipe_model_loads_in_the_storage_dtype() -> None:
    from lorakit.recipes import load_recipe, load_recipe_model

    recipe = load_recipe("sentiment-minilm", ["train.dtype=bf16"])
    model = load_recipe_model(recipe, labels=["fresh", "rotten"]).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _bert(dtype: torch.dtype, attention_dropout: float) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**{**BERT, "attention_probs_dropout_prob": attention_dropout})
    model = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    model = model.to(dtype)
    inject(model, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    return model.train()


def _attention_probability_dtypes(model: torch.nn.Module, ids: torch.Tensor) -> set[torch.dtype]:
    """dtypes of every (batch, heads, seq, seq) tensor a training forward + backward makes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[torch.dtype] = set()
    square = (ids.shape[0], BERT["num_attention_heads"], ids.shape[1], ids.shape[1])

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for item in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(item, torch.Tensor) and tuple(item.shape) == square and item.is_floating_point():
                    seen.add(item.dtype)
            return out

    with Watch():
        model(input_ids=ids).logits.float().sum().backward()
    return seen


def test_a_bf16_base_on_cpu_keeps_attention_with_dropout_in_bf16() -> None:
    """torch's CPU SDPA math kernel (attention dropout on) computed MiniLM's bf16 attention in fp32; after
    `keep_trainable_fp32` the attention probabilities are bf16 and the model still trains (finite grads)."""
    ids = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(0))
    before = _bert(torch.bfloat16, 0.1)
    assert torch.float32 in _attention_probability_dtypes(before, ids)  # the old behaviour
    model = _bert(torch.bfloat16, 0.1)
    keep_trainable_fp32(model)
    assert model.config._attn_implementation == "eager"
    assert _attention_probability_dtypes(model, ids) == {torch.bfloat16}
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype, dropout", [(torch.float32, 0.1), (torch.bfloat16, 0.0)])
def test_attention_is_left_alone_when_sdpa_already_fits(dtype: torch.dtype, dropout: float) -> None:
    """fp32 base, or no attention dropout (the fused CPU kernel runs in bf16): SDPA stays."""
    from lorakit.precision import low_precision_attention

    model = _bert(dtype, dropout)
    assert not low_precision_attention(model)
    assert model.config._attn_implementation == "sdpa"
