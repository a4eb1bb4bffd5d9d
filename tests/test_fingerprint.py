"""Base-model fingerprints (`lorakit.fingerprint`): computed once per base and reused while the weights are
unchanged; any change — in place, through ``.data``, a new tensor, another dtype — recomputes it."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
import lorakit.fingerprint as fingerprint
from lorakit import AdapterError, AdapterStateError, LoraConfig, inject, load_adapter, save_adapter
from lorakit.export import adapter_info
from lorakit.fingerprint import base_fingerprint, clear_cache

from test_io import _assert_same_state, _snapshot

TARGETS = ["layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v", "embed"]


@pytest.fixture
def hashed(monkeypatch):
    """Counts the tensors whose bytes are read (hashed) by each fingerprint."""
    calls: list[int] = []
    real = fingerprint._hash_all

    def counting(tensors):
        calls.append(len(tensors))
        return real(tensors)
    monkeypatch.setattr(fingerprint, "_hash_all", counting)
    clear_cache()
    yield calls
    clear_cache()


def test_fingerprint_is_computed_once_and_reused(tiny, hashed) -> None:
    first = base_fingerprint(tiny, TARGETS)
    again = base_fingerprint(tiny, TARGETS)
    assert again == first and hashed == [5, 0]  # the second call read no weight bytes
    clear_cache()
    assert base_fingerprint(tiny, TARGETS) == first  # the cache changes nothing but the time


@pytest.mark.parametrize("change", ["in-place", "data-copy", "data-add", "data-assign", "load-state-dict", "dtype"])
def test_any_change_to_a_weight_recomputes_it(change, tiny, hashed) -> None:
    first = base_fingerprint(tiny, TARGETS)
    weight = tiny.layers[1]["v"].weight
    with torch.no_grad():
        if change == "in-place":
            weight.mul_(1.5)
        elif change == "data-copy":  # through an alias whose version counter is not the parameter's
            weight.data.copy_(torch.randn_like(weight))
        elif change == "data-add":
            weight.data.add_(0.25)
        elif change == "data-assign":  # a new storage
            weight.data = weight.data + 1.0
        elif change == "load-state-dict":
            tiny.layers[1]["v"].load_state_dict({"weight": torch.zeros_like(weight), "bias": tiny.layers[1]["v"].bias})
        else:
            tiny.layers[1]["v"].to(torch.float64)
    second = base_fingerprint(tiny, TARGETS)
    assert second["sha256"] != first["sha256"]
    assert hashed == [5, 1]  # only the changed weight was read again
    clear_cache()
    assert base_fingerprint(tiny, TARGETS) == second  # and the result is what a fresh computation gives


def test_copies_of_a_model_hash_their_own_weights(tiny, hashed) -> None:
    first = base_fingerprint(tiny, TARGETS)
    twin = copy.deepcopy(tiny)
    assert base_fingerprint(twin, TARGETS) == first and hashed == [5, 5]
    with torch.no_grad():
        twin.embed.weight[0, 0] += 1
    assert base_fingerprint(twin, TARGETS) != first and base_fingerprint(tiny, TARGETS) == first


def test_save_then_load_reads_the_base_once(tiny, tmp_path, hashed) -> None:
    inject(tiny, LoraConfig(r=2, target_modules=["q", "v"]))
    save_adapter(tiny, tmp_path / "a")
    save_adapter(tiny, tmp_path / "b")
    lorakit_loaded = load_adapter(tiny, tmp_path / "a", adapter_name="again")
    assert lorakit_loaded == "again"
    base_reads = [n for n in hashed if n == 4]  # the 4 targeted base weights (adapter tensors are hashed too)
    assert len(base_reads) == 1, hashed


def test_entries_leave_with_their_tensors(tiny, hashed) -> None:
    model = copy.deepcopy(tiny)
    base_fingerprint(model, TARGETS)
    held = len(fingerprint._CACHE)
    del model
    import gc

    gc.collect()
    assert len(fingerprint._CACHE) == held - 5


# -- another base refused -----------------------------------------------------------------------------------
class _Vocab:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def test_fingerprint_refuses_another_base_unless_forced(minilm, tmp_path) -> None:
    model, tokenizer = minilm
    base = copy.deepcopy(model)
    inject(model, LoraConfig(r=4, target_modules=["query", "value"]))
    save_adapter(model, tmp_path / "a", tokenizer=tokenizer)
    stored = adapter_info(tmp_path / "a")["fingerprint"]
    assert stored["modules"] == 12 and stored["vocab_size"] == len(tokenizer)
    assert stored["sha256"] == base_fingerprint(base, LoraConfig(r=4, target_modules=["query", "value"]),
                                                tokenizer)["sha256"]

    other_weights = copy.deepcopy(base)  # weights outside the targets do not count
    with torch.no_grad():
        other_weights.encoder.layer[0].attention.self.key.weight[0, 0] += 1.0
    load_adapter(other_weights, tmp_path / "a", tokenizer=tokenizer)

    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.encoder.layer[3].attention.self.query.weight[5, 7] += 1e-3
    before = _snapshot(changed)
    with pytest.raises(AdapterError, match="another base model.*force=True"):
        load_adapter(changed, tmp_path / "a", tokenizer=tokenizer)
    _assert_same_state(changed, before)
    with pytest.raises(AdapterError, match="vocabulary 100 != 30522"):
        load_adapter(copy.deepcopy(base), tmp_path / "a", tokenizer=_Vocab(100))
    with pytest.warns(UserWarning, match="another base model"):
        load_adapter(changed, tmp_path / "a", tokenizer=tokenizer, force=True)


def test_fingerprint_of_merged_weights_is_refused(tiny) -> None:
    inject(tiny, LoraConfig(r=2, target_modules=["q"]))
    lorakit.merge(tiny)
    with pytest.raises(AdapterStateError, match="unmerge"):
        base_fingerprint(tiny, ["layers.0.q"])


def test_an_adapter_trained_on_a_bf16_copy_loads_on_the_fp32_base(minilm, tmp_path, caplog) -> None:
    """`train.dtype: bf16` stores the fp32 checkpoint's weights in bf16; the adapter it saves records the bf16
    weights' hash. On the fp32 base it was refused as "another base model" (the everyday path: train on a bf16
    copy, apply to the original, as PEFT users do); now the fp32 weights rounded to bf16 are hashed and match.
    Another checkpoint is still refused, and a bf16 base cannot be checked against an fp32 fingerprint."""
    import logging

    model, tokenizer = minilm
    config = LoraConfig(r=4, target_modules=["query", "value"])
    trained = copy.deepcopy(model).to(torch.bfloat16)
    inject(trained, config)
    save_adapter(trained, tmp_path / "bf16", tokenizer=tokenizer)
    with caplog.at_level(logging.INFO, logger="lorakit.io"):
        load_adapter(copy.deepcopy(model), tmp_path / "bf16", tokenizer=tokenizer)
    assert "bfloat16 copy of these float32 weights" in caplog.text
    stored = adapter_info(tmp_path / "bf16")["fingerprint"]
    assert stored["dtype"] == "bfloat16"
    assert base_fingerprint(model, config, tokenizer, as_dtype=torch.bfloat16) == stored

    other = copy.deepcopy(model)  # another checkpoint: a change that survives rounding to bf16
    with torch.no_grad():
        other.encoder.layer[3].attention.self.query.weight[5, 7] += 0.5
    with pytest.raises(AdapterError, match="another base model"):
        load_adapter(other, tmp_path / "bf16", tokenizer=tokenizer)

    fp32 = copy.deepcopy(model)
    inject(fp32, config)
    save_adapter(fp32, tmp_path / "fp32", tokenizer=tokenizer)
    assert adapter_info(tmp_path / "fp32")["fingerprint"]["dtype"] == "float32"
    with pytest.raises(AdapterError, match="another base model"):
        load_adapter(copy.deepcopy(model).to(torch.bfloat16), tmp_path / "fp32", tokenizer=tokenizer)
