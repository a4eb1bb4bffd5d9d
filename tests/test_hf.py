"""transformers' own methods on a model holding lorakit adapters (lorakit.hf): ``save_pretrained`` writes a PEFT
adapter folder that transformers + peft reload exactly, every option is honoured or refused, ``set_adapter`` /
``active_adapters`` are lorakit's, and the plain model (unloaded, or never injected) saves as transformers does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

import lorakit
from lorakit.errors import AdapterStateError, ConfigError

from conftest import TinyNet, randomize_lora

IDS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 0, 6]])


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    """A tiny random Llama saved as a plain transformers folder (the 'hub id' its adapters point at)."""
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def injected(base_dir: Path, **config) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    lorakit.inject(model, lorakit.LoraConfig(**({"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
                                               | config)))
    randomize_lora(model, std=0.2)
    return model


def test_save_pretrained_writes_a_peft_adapter_that_from_pretrained_reloads_exactly(base_dir, tmp_path):
    model = injected(base_dir)
    with torch.no_grad():
        want = model(IDS).logits
    model.save_pretrained(tmp_path / "out")
    # the adapter only: no config.json (which would make from_pretrained load a half-initialised model), no weights
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(base_dir)
    keys = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert keys and all(k.startswith("base_model.model.") and ".lora_" in k and ".default." not in k for k in keys)
    # what the issue reported: from_pretrained(folder) re-initialised q_proj/v_proj silently (logits off by 34.85)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # base + adapter, through peft
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, want, atol=1e-6)
    fresh = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    lorakit.load_adapter(fresh, tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, want)


def test_save_pretrained_options_are_honoured_or_refused(base_dir, tmp_path):
    model = injected(base_dir)
    for options, error in [({"push_to_hub": True}, ConfigError), ({"safe_serialization": False}, ConfigError),
                           ({"variant": "fp16"}, ConfigError), ({"save_peft_format": False}, ConfigError),
                           ({"distributed_checkpoint": True}, ConfigError), ({"max_shard_size": "1KB"}, ConfigError),
                           ({"token": "hf_x"}, ConfigError), ({"shard_everything": True}, TypeError),
                           ({"selected_adapters": []}, AdapterStateError),
                           ({"state_dict": {"model.norm.weight": torch.ones(32)}}, ConfigError)]:
        with pytest.raises(error):
            model.save_pretrained(tmp_path / "refused", **options)
        assert not (tmp_path / "refused").exists(), options  # checked before anything is written
    model.save_pretrained(tmp_path / "other", is_main_process=False)  # another process writes
    assert not (tmp_path / "other").exists()
    model.save_pretrained(tmp_path / "own", safe_serialization=True, max_shard_size="10MB")
    # a state dict (Trainer passes the gathered one under FSDP/DeepSpeed) is where the tensors come from
    given = {k: v * 2 if ".lora_B." in k else v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "given", state_dict=given)
    own, doubled = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("own", "given"))
    assert own.keys() == doubled.keys()
    for key in own:
        assert torch.equal(doubled[key], own[key] * 2 if ".lora_B." in key else own[key]), key


def test_several_adapters_are_saved_in_peft_layout(base_dir, tmp_path):
    model = injected(base_dir)
    lorakit.add_adapter(model, "other", lorakit.LoraConfig(r=2, target_modules=["o_proj"]))
    model.save_pretrained(tmp_path / "all")
    assert (tmp_path / "all" / "adapter_config.json").is_file()
    assert (tmp_path / "all" / "other" / "adapter_config.json").is_file()  # PeftModel.save_pretrained's layout
    model.save_pretrained(tmp_path / "one", selected_adapters=["other"])
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["other"]
    fresh = AutoModelForCausalLM.from_pretrained(base_dir)
    assert sorted(lorakit.load_adapters(fresh, tmp_path / "all")) == ["default", "other"]
    with pytest.raises(ConfigError, match="one adapter"):
        model.save_pretrained(tmp_path / "sd", state_dict=model.state_dict())


def test_set_adapter_and_active_adapters_are_lorakits(base_dir):
    model = injected(base_dir)
    lorakit.add_adapter(model, "other", lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.active_adapters() == ["default"]
    model.set_adapter("other")  # transformers' method raised "No adapter loaded" here
    assert lorakit.active_adapters(model) == model.active_adapters() == ["other"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    model.set_adapter(["default", "other"])
    assert model.active_adapters() == ["default", "other"]
    with pytest.raises(AdapterStateError, match="no adapter named 'nope'"):
        model.set_adapter("nope")
    for method, pointer in [("load_adapter", "lorakit.load_adapter"), ("disable_adapters", "lorakit.disable_adapters"),
                            ("get_adapter_state_dict", "lorakit.adapter_state_dict")]:
        with pytest.raises(AdapterStateError, match=pointer):
            getattr(model, method)("x")


def test_unloaded_or_plain_models_save_as_transformers_does(base_dir, tmp_path):
    model = injected(base_dir)
    other = AutoModelForCausalLM.from_pretrained(base_dir)
    assert "save_pretrained" not in vars(other)  # the class is never patched: only the injected object
    assert type(model).save_pretrained is PreTrainedModel.save_pretrained
    lorakit.unload(model)  # merge_and_unload
    assert not {"save_pretrained", "set_adapter", "active_adapters"} & set(vars(model))
    with torch.no_grad():
        want = model(IDS).logits
    model.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(IDS).logits, want)
    again = injected(base_dir)
    lorakit.delete_adapter(again, "default")  # its last adapter: transformers' own methods again
    assert "save_pretrained" not in vars(again)
    with pytest.raises(Exception, match="No adapter loaded|peft"):
        again.set_adapter("default")
    net = lorakit.inject(TinyNet(), lorakit.LoraConfig(r=2, target_modules=["q"]))
    assert "save_pretrained" not in vars(net)  # not a transformers model: nothing attached


def test_copied_and_pickled_models_save_their_own_adapter(base_dir, tmp_path):
    import copy
    import io

    model = injected(base_dir)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        randomize_lora(other, seed=5)  # differs from the original: the save must be the copy's own
        folder = tmp_path / str(id(other))
        other.save_pretrained(folder)
        assert not (folder / "model.safetensors").exists()
        saved = load_file(folder / "adapter_model.safetensors")
        assert saved.keys() == lorakit.adapter_state_dict(other).keys()
        assert all(torch.equal(t, lorakit.adapter_state_dict(other)[k]) for k, t in saved.items())
        assert not all(torch.equal(t, lorakit.adapter_state_dict(model)[k]) for k, t in saved.items())
