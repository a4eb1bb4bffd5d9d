"""The core on the real packaged models: invariants, and agreement with the real `peft` package.

MiniLM (BertModel, LoRA on query/value) and SmolLM2-135M-Instruct (LlamaForCausalLM, all-linear).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from lorakit import LoraConfig, inject, trainable_parameters

from conftest import randomize_lora

TEXTS = ["A gripping, beautifully acted film.", "The plot falls apart in the second half and never recovers."]
TARGETS = {"minilm": ["query", "value"], "smollm2": "all-linear"}


def _inputs(tokenizer) -> dict[str, torch.Tensor]:
    return dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))


def _output(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _masked(t: torch.Tensor, inputs) -> torch.Tensor:
    """Positions of real tokens only (padding positions carry no meaning)."""
    return t[inputs["attention_mask"].bool()]


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_invariants_on_real_model(name: str, request) -> None:
    model, tokenizer = request.getfixturevalue(name)
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        base = _output(model, inputs)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        inject(model, LoraConfig(r=8, alpha=16, target_modules=TARGETS[name]))
        assert torch.equal(_output(model, inputs), base)  # B = 0: exactly the base model
        randomize_lora(model, std=0.02)
        unmerged = _output(model, inputs)
        assert not torch.allclose(unmerged, base)
        lorakit.merge(model)
        diff = (_masked(_output(model, inputs), inputs) - _masked(unmerged, inputs)).abs().max().item()
        assert diff <= 1e-5 * max(1.0, _masked(unmerged, inputs).abs().max().item()), diff
        lorakit.unmerge(model)
        restored = {k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
        assert restored.keys() == weights.keys()
        assert max((restored[k] - weights[k]).abs().max().item() for k in weights) <= 1e-6
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)


def test_training_step_changes_only_adapter_on_minilm(minilm) -> None:
    model, tokenizer = minilm
    inject(model, LoraConfig(r=4, alpha=8, target_modules=["query", "value"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(**_inputs(tokenizer)).last_hidden_state.pow(2).mean().backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


def test_mixed_batch_on_real_model(smollm2) -> None:
    model, tokenizer = smollm2
    inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorakit.add_adapter(model, "other", LoraConfig(r=8, alpha=4, target_modules="all-linear"))
    randomize_lora(model, std=0.02)
    inputs = _inputs(tokenizer)
    names = ["other", "default"]
    with torch.no_grad():
        with lorakit.route(model, names):
            mixed = _output(model, inputs)
        for i, adapter in enumerate(names):
            lorakit.set_adapter(model, adapter)
            alone = _output(model, {k: v[i:i + 1] for k, v in inputs.items()})
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)


VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_same_outputs_and_counts_as_peft(name: str, variant: str, request) -> None:
    model, tokenizer = request.getfixturevalue(name)
    config = LoraConfig(r=8, alpha=16, target_modules=TARGETS[name], **VARIANTS[variant])
    peft_config = peft.LoraConfig(**{**{k: v for k, v in config.to_peft_dict().items() if k != "peft_type"},
                                     "inference_mode": False})
    theirs = peft.get_peft_model(copy.deepcopy(model), peft_config)
    inject(model, config)
    randomize_lora(model, std=0.02)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_magnitude_vector" in key:
                param.mul_(1 + 0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))
    # our state-dict keys are PEFT's minus the "base_model.model." prefix (magnitudes: PEFT adds ".weight")
    ours = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    mapped = {"base_model.model." + k + (".weight" if "lora_magnitude_vector" in k else ""): v
              for k, v in ours.items()}
    their_keys = {k for k in theirs.state_dict() if "lora_" in k}
    assert set(mapped) == their_keys
    theirs.load_state_dict(mapped, strict=False)
    theirs.eval()
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        a = _masked(_output(model, inputs), inputs)
        b = _masked(_output(theirs, inputs), inputs)
    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    assert trainable_parameters(model) == tuple(theirs.get_nb_trainable_parameters())
