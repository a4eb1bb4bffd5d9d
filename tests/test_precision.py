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
