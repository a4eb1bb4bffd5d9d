"""Adapter files on a model (`lorakit.io`, `lorakit.peft_format`): PEFT format both ways with the real `peft`,
safe loading of corrupted and hostile files (fuzz), train/eval modes kept, atomic writes, what a saved adapter
records. Merge / export / info: test_export.py; fingerprints: test_fingerprint.py."""

from __future__ import annotations

import copy
import json
import random
import shutil
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterError, AdapterStateError, LoraConfig, inject
from lorakit.adapters import delete_adapter, lora_state
from lorakit.export import adapter_info
from lorakit.io import CONFIG_FILE, PICKLE_FILE, PREFIX, WEIGHTS_FILE, load_adapter, load_adapters, save_adapter

from conftest import randomize_lora

TEXTS = ["A gripping, beautifully acted film.", "The plot falls apart in the second half and never recovers."]


def _inputs(tokenizer) -> dict[str, torch.Tensor]:
    return dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, snapshot) -> None:
    now = model.state_dict()
    assert now.keys() == snapshot.keys()
    assert all(torch.equal(now[k], snapshot[k]) for k in snapshot)


def _randomize_dora(model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=gen))


# -- round trips --------------------------------------------------------------------------------------------
TINY_CASES = {
    "every-layer-type": LoraConfig(r=4, alpha=8, target_modules=["embed", "q", "v", "conv", "pointwise"]),
    "dora-rslora": LoraConfig(r=4, alpha=4, target_modules=["q", "v"], use_dora=True, use_rslora=True),
    "head-bias-patterns": LoraConfig(r=4, alpha=8, target_modules=["q", "v", "conv"], modules_to_save=["head"],
                                     bias="lora_only", rank_pattern={"v": 2, "conv": 3}, alpha_pattern={"q": 2.0}),
}


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_save_load_round_trip_gives_identical_outputs(case, tiny, tiny_ids, tmp_path) -> None:
    fresh = copy.deepcopy(tiny)
    inject(tiny, TINY_CASES[case])
    randomize_lora(tiny, seed=3)
    _randomize_dora(tiny)
    with torch.no_grad():
        for name, param in tiny.named_parameters():
            if param.requires_grad and ("modules_to_save" in name or name.endswith("bias")):
                param.add_(0.1)
    expected = _out(tiny, tiny_ids)
    save_adapter(tiny, tmp_path / "a", provenance={"steps": 7, "dataset": {"name": "toy", "sha256": "ab"}})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    keys = load_file(tmp_path / "a" / WEIGHTS_FILE).keys()
    assert all(k.startswith(PREFIX) and ".default" not in k for k in keys)
    assert load_adapter(fresh, tmp_path / "a") == "default"
    assert torch.equal(_out(fresh, tiny_ids), expected)
    assert all(not p.requires_grad for p in fresh.parameters())
    assert lorakit.get_config(fresh, "default") == TINY_CASES[case]
    assert adapter_info(tmp_path / "a")["provenance"]["steps"] == 7


def test_trainable_flag_and_name_collision(tiny, tmp_path) -> None:
    fresh = copy.deepcopy(tiny)
    inject(tiny, LoraConfig(r=2, target_modules=["q"]))
    save_adapter(tiny, tmp_path / "a")
    load_adapter(fresh, tmp_path / "a", trainable=True)
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(AdapterStateError, match="already loaded"):
        load_adapter(fresh, tmp_path / "a")
    assert load_adapter(fresh, tmp_path / "a", adapter_name="second") == "second"
    assert lorakit.active_adapters(fresh) == ["default"]  # added inactive, as PEFT's load_adapter


def test_several_adapters_use_peft_layout_both_ways(tiny, tiny_ids, tmp_path) -> None:
    fresh, for_peft = copy.deepcopy(tiny), copy.deepcopy(tiny)
    lorakit.add_adapter(tiny, "default", LoraConfig(r=2, target_modules=["q"]))
    lorakit.add_adapter(tiny, "other", LoraConfig(r=3, target_modules=["v"]))
    randomize_lora(tiny)
    expected = {}
    for name in ("default", "other"):
        lorakit.set_adapter(tiny, name)
        expected[name] = _out(tiny, tiny_ids)
    save_adapter(tiny, tmp_path / "multi", adapter_name=["default", "other"])
    assert (tmp_path / "multi" / WEIGHTS_FILE).is_file() and (tmp_path / "multi" / "other" / WEIGHTS_FILE).is_file()
    assert load_adapters(fresh, tmp_path / "multi") == ["default", "other"]
    for name in ("default", "other"):
        lorakit.set_adapter(fresh, name)
        assert torch.equal(_out(fresh, tiny_ids), expected[name])
    # PEFT reads the same layout: the top folder, then the sub-folder by name
    model = peft.PeftModel.from_pretrained(for_peft, tmp_path / "multi")
    model.load_adapter(tmp_path / "multi" / "other", adapter_name="other")
    for name in ("default", "other"):
        model.set_adapter(name)
        assert torch.allclose(_out(model, tiny_ids), expected[name], atol=1e-6)


# -- interoperability with the real peft on the real models ----------------------------------------------------
PEFT_CASES = {
    "lora": dict(target_modules=["query", "value"]),
    "dora": dict(target_modules=["query", "value"], use_dora=True),
    "head": dict(target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"),
}


@pytest.fixture(scope="module")
def minilm_classifier():
    from lorakit.models import load_model

    return load_model("minilm", task="sequence-classification", num_labels=2)


def _minilm_for(case, minilm, minilm_classifier):
    if case == "head":
        return copy.deepcopy(minilm_classifier.model).eval(), minilm_classifier.tokenizer
    return minilm


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_lorakit_adapter_loads_in_peft_with_same_outputs(case, minilm, minilm_classifier, tmp_path) -> None:
    model, tokenizer = _minilm_for(case, minilm, minilm_classifier)
    base, inputs = copy.deepcopy(model), _inputs(tokenizer)
    kwargs = dict(PEFT_CASES[case])
    task_type = kwargs.pop("task_type", None)
    inject(model, LoraConfig(r=8, alpha=16, task_type=task_type, **kwargs))
    randomize_lora(model, std=0.05)
    _randomize_dora(model)
    if case == "head":
        with torch.no_grad():
            model.classifier.modules_to_save["default"].weight.add_(0.5)
    expected = _out(model, inputs)
    save_adapter(model, tmp_path / "a", tokenizer=tokenizer)
    with warnings.catch_warnings(record=True) as caught:  # lorakit's fields live where PEFT does not look
        warnings.simplefilter("always")
        peft.LoraConfig.from_pretrained(tmp_path / "a")
        peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]
    assert (_out(peft_model, inputs) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_loads_in_lorakit_with_same_outputs(case, minilm, minilm_classifier, tmp_path) -> None:
    model, tokenizer = _minilm_for(case, minilm, minilm_classifier)
    base, inputs = copy.deepcopy(model), _inputs(tokenizer)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, **PEFT_CASES[case]))
    randomize_lora(peft_model, std=0.05)
    _randomize_dora(peft_model)
    peft_model.eval()
    expected = _out(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "p")
    load_adapter(base, tmp_path / "p")
    assert (_out(base, inputs) - expected).abs().max().item() <= 1e-5
    assert lorakit.get_config(base, "default").use_dora == (case == "dora")


def test_smollm2_all_linear_interop_both_ways(smollm2, tmp_path) -> None:
    model, tokenizer = smollm2
    inputs = _inputs(tokenizer)
    base_for_peft, base_for_lorakit = copy.deepcopy(model), copy.deepcopy(model)
    inject(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model, std=0.02)
    expected = _out(model, inputs)
    save_adapter(model, tmp_path / "a", tokenizer=tokenizer)
    peft_model = peft.PeftModel.from_pretrained(base_for_peft, tmp_path / "a").eval()
    assert (_out(peft_model, inputs) - expected).abs().max().item() <= 1e-5
    # the other way: peft's own adapter (its B randomized again) into lorakit
    randomize_lora(peft_model, seed=5, std=0.02)
    expected = _out(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "p")
    load_adapter(base_for_lorakit, tmp_path / "p", tokenizer=tokenizer)
    assert (_out(base_for_lorakit, inputs) - expected).abs().max().item() <= 1e-5


# -- safe loading ------------------------------------------------------------------------------------------
def test_pickle_is_refused_unless_allowed(tiny, tiny_ids, tmp_path) -> None:
    fresh = copy.deepcopy(tiny)
    inject(tiny, LoraConfig(r=2, target_modules=["q", "v"]))
    randomize_lora(tiny)
    save_adapter(tiny, tmp_path / "a")
    torch.save(load_file(tmp_path / "a" / WEIGHTS_FILE), tmp_path / "a" / PICKLE_FILE)
    (tmp_path / "a" / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterError, match="pickle.*allow_pickle=True"):
        load_adapter(fresh, tmp_path / "a")
    assert lora_state(fresh) is None
    load_adapter(fresh, tmp_path / "a", allow_pickle=True)
    assert torch.equal(_out(fresh, tiny_ids), _out(tiny, tiny_ids))


def test_failure_after_injection_rolls_back(tiny, tmp_path, monkeypatch) -> None:
    fresh = copy.deepcopy(tiny)
    inject(tiny, LoraConfig(r=2, target_modules=["q", "embed"], modules_to_save=["head"], bias="lora_only"))
    save_adapter(tiny, tmp_path / "a")
    before = _snapshot(fresh)

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("lorakit.io.set_adapter", boom)
    with pytest.raises(AdapterError, match="disk on fire.*unchanged"):
        load_adapter(fresh, tmp_path / "a")
    _assert_same_state(fresh, before)
    assert lora_state(fresh) is None


def _property_adapters(tiny, root: Path) -> list[Path]:
    """Two good adapters covering every tensor kind: embedding, conv, rank_pattern, a head; DoRA."""
    first, second = copy.deepcopy(tiny), copy.deepcopy(tiny)
    inject(first, LoraConfig(r=4, alpha=8, target_modules=["embed", "q", "conv"], modules_to_save=["head"],
                             rank_pattern={"conv": 2}))
    inject(second, LoraConfig(r=3, alpha=6, target_modules=["q", "v"], use_dora=True))
    for model, name in ((first, "mixed"), (second, "dora")):
        randomize_lora(model)
        save_adapter(model, root / name)
    return [root / "mixed", root / "dora"]


FILE_DAMAGE = ["truncate", "flip_header", "flip_body", "flip_length", "shape", "drop_key", "extra_key", "dtype", "nan",
               "rename_key", "no_weights", "pickle", "empty"]
CONFIG_EDITS = ["unknown_key", "peft_version", "config_value"]
MUTATIONS = FILE_DAMAGE + CONFIG_EDITS + ["bad_json", "flip_config"]


def _mutate(folder: Path, rng: random.Random, kinds: list[str] = MUTATIONS) -> str:
    """Damage one adapter folder in one random way; returns what was done."""
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    data = bytearray(weights.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    kind = rng.choice(kinds)
    if kind == "truncate":
        cut = rng.randrange(0, len(data))
        weights.write_bytes(bytes(data[:cut]))
        return f"truncate at {cut}"
    if kind in ("flip_header", "flip_body", "flip_length"):
        low, high = {"flip_header": (8, header_end), "flip_body": (header_end, len(data)),
                     "flip_length": (0, 8)}[kind]
        pos = rng.randrange(low, high)
        data[pos] ^= 1 << rng.randrange(8)
        weights.write_bytes(bytes(data))
        return f"{kind} at {pos}"
    if kind in ("no_weights", "pickle", "empty"):
        tensors = load_file(weights)
        weights.unlink()
        if kind == "pickle":
            torch.save(tensors, folder / PICKLE_FILE)
        if kind == "empty":
            save_file({}, weights)
        return kind
    if kind in ("shape", "drop_key", "extra_key", "dtype", "nan", "rename_key"):
        tensors = load_file(weights)
        key = rng.choice(sorted(tensors))
        t = tensors[key]
        if kind == "shape":
            tensors[key] = torch.zeros(t.shape[0] + rng.choice([-1, 1, 2]), *t.shape[1:]) if t.shape[0] > 1 \
                else torch.zeros(*t.shape, 2)
        elif kind == "drop_key":
            del tensors[key]
        elif kind == "extra_key":
            extra = rng.choice([PREFIX + "layers.0.q.lora_C.weight", PREFIX + "missing.lora_A.weight",
                                PREFIX + "layers.0.q.base_layer.bias", "not_prefixed.lora_A.weight",
                                PREFIX + "layers.1.v.lora_magnitude_vector"])
            tensors[extra] = torch.zeros(3, 16)
        elif kind == "dtype":
            tensors[key] = t.to(rng.choice([torch.int32, torch.int8, torch.bool]))
        elif kind == "nan":
            t = t.clone()
            t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf")])
            tensors[key] = t
        else:
            tensors[key.replace("lora_", "lora")] = tensors.pop(key)
        save_file(tensors, weights, metadata={"format": "pt"})  # as PEFT writes: no lorakit checksum
        return f"{kind} {key}"
    text = config.read_text()
    if kind == "bad_json":
        config.write_text(text[: rng.randrange(0, len(text) - 2)])
        return "bad_json"
    if kind == "flip_config":
        pos = rng.randrange(len(text))
        config.write_text(text[:pos] + rng.choice("{}[]\",:0x- ") + text[pos + 1:])
        return f"flip_config at {pos}"
    raw = json.loads(text)
    if kind == "unknown_key":
        raw[rng.choice(["use_quantum", "lora_bias", "trainable_token_indices"])] = rng.choice([True, [1, 2], "x"])
    elif kind == "peft_version":
        raw["peft_version"] = "9.9.9"
    else:
        key, value = rng.choice([("r", 5), ("r", 0), ("r", -2), ("r", "8"), ("r", 2.5), ("r", None),
                                 ("target_modules", ["q"]), ("target_modules", ["nothing"]), ("target_modules", 5),
                                 ("target_modules", "all-linear"), ("target_modules", "(("), ("use_dora", True),
                                 ("use_dora", False), ("bias", "all"), ("bias", "sideways"),
                                 ("modules_to_save", None), ("modules_to_save", ["nope"]), ("rank_pattern", {"q": 3}),
                                 ("rank_pattern", []), ("lora_alpha", -1), ("lora_alpha", 3), ("lora_dropout", 2.0),
                                 ("init_lora_weights", "weird"), ("layers_to_transform", [0]), ("peft_type", "IA3"),
                                 ("alpha_pattern", {"q": "x"}), ("exclude_modules", ["q"])])
        raw[key] = value
    config.write_text(json.dumps(raw))
    return f"{kind} {raw.get('peft_version') if kind == 'peft_version' else ''}"


# hostile edits (issue 18): each must end in an AdapterError (or load an adapter that computes finite outputs)
DEEP = 100_000


def _rewrite_header(weights: Path, edit) -> None:
    """Apply ``edit`` to the parsed safetensors header and write the file back with the new header length."""
    data = weights.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    text = edit(header)
    raw = (text if isinstance(text, str) else json.dumps(header)).encode()
    weights.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + size:])


def _hostile(folder: Path, rng: random.Random) -> str:
    """One hostile edit of the kinds issue 18 found uncaught: deep JSON, wrong JSON types, bad regexes, huge or
    non-finite numbers, path-like stored names, extreme weights."""
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    kind = rng.choice(["deep_config", "deep_header", "deep_metadata", "metadata", "dtype", "config", "config",
                       "huge_r", "weights"])
    if kind == "deep_config":
        config.write_text('{"r": 4, "target_modules": ' + "[" * DEEP + "]" * DEEP + "}")
    elif kind == "deep_header":
        _rewrite_header(weights, lambda h: json.dumps(h)[:-1] + ', "x": ' + "[" * DEEP + "]" * DEEP + "}")
    elif kind in ("deep_metadata", "metadata"):
        tensors = load_file(weights)
        value = "[" * DEEP + "]" * DEEP if kind == "deep_metadata" else json.dumps(rng.choice([
            [1, 2], 5, "x", {"adapter_name": "/tmp/x"}, {"adapter_name": "../escape"}, {"adapter_name": "a/b"},
            {"adapter_name": ""}, {"adapter_name": 5}, {"adapter_name": "a\x00b"}, {"adapter_name": "a" * 500},
            {"fingerprint": {"sha256": 5}}, {"fingerprint": "abc"}, {"fingerprint": {"sha256": "z" * 64}},
            {"fingerprint": {"sha256": "0" * 64, "algorithm": "x", "bytes": "many"}}, {"provenance": "x"},
            {"lorakit_version": ["1"]}, {"tensors_sha256": 7}]))
        save_file(tensors, weights, metadata={"format": "pt", "lorakit": value})
        kind += " " + value[:40]
    elif kind == "dtype":
        key, value = rng.choice([("dtype", ["F32"]), ("dtype", {"a": 1}), ("dtype", 5), ("shape", "abc"),
                                 ("shape", [[4]]), ("data_offsets", ["0", "4"]), ("shape", [10 ** 30])])

        def edit(header):
            entry = header[rng.choice(sorted(k for k in header if k != "__metadata__"))]
            entry[key] = value
        _rewrite_header(weights, edit)
        kind += f" {key}={value!r}"
    elif kind == "config":
        raw = json.loads(config.read_text())
        key, value = rng.choice([
            ("rank_pattern", {"(": 4}), ("alpha_pattern", {"[": 2.0}), ("rank_pattern", {"q": True}),
            ("layers_to_transform", "abc"), ("layers_to_transform", [0, "1"]), ("layers_to_transform", -1),
            ("lora_alpha", float("nan")), ("lora_alpha", float("inf")), ("lora_alpha", -float("inf")),
            ("lora_alpha", 1e300), ("lora_alpha", 0), ("lora_alpha", -1), ("alpha_pattern", {"q": 0}),
            ("alpha_pattern", {"q": -1}), ("alpha_pattern", {"q": float("inf")}), ("alpha_pattern", {"q": 1e300}),
            ("use_rslora", "false"), ("use_dora", "true"), ("use_rslora", 1), ("lora_dropout", float("nan")),
            ("bias", ["none"]), ("init_lora_weights", [1]), ("init_lora_weights", {"a": 1}), ("task_type", 5),
            ("base_model_name_or_path", ["/usr"]), ("base_model_name_or_path", "/" * 5000), ("target_modules", [["q"]]),
            ("modules_to_save", [5]), ("r", 10 ** 12), ("r", 1e300), ("peft_type", ["LORA"]), ("rank_pattern", 5)])
        raw[key] = value
        config.write_text(json.dumps(raw))  # NaN/Infinity written as JS literals, as Python reads them back
        kind += f" {key}={value!r}"[:60]
    elif kind == "huge_r":
        text = config.read_text()
        config.write_text(text.replace('"r": ', '"r": ' + "9" * 5000 + ", \"_r\": ", 1))
    else:
        tensors = load_file(weights)
        key = rng.choice(sorted(k for k in tensors if tensors[k].is_floating_point()))
        tensors[key] = torch.full_like(tensors[key], rng.choice([3e38, -3e38, 1e20, 1e6]))
        save_file(tensors, weights, metadata={"format": "pt"})
        kind += f" {key}"
    return kind


def _flags(model) -> list:
    return [(m, m.training) for m in model.modules()] + [(p, p.requires_grad) for p in model.parameters()]


def _check_model_unchanged(model, before_state, before_flags, names, module_types, what) -> None:
    _assert_same_state(model, before_state)
    assert [(m, m.training) for m, _ in before_flags[:len(module_types)]] == before_flags[:len(module_types)], what
    assert [(p, p.requires_grad) for p, _ in before_flags[len(module_types):]] == before_flags[len(module_types):], \
        what
    assert lorakit.adapter_names(model) == names and [type(m) for m in model.modules()] == module_types, what


@pytest.mark.parametrize("start", ["clean", "with-adapter"])
def test_corrupted_adapters_raise_only_adapter_errors_and_leave_model_unchanged(start, tiny, tiny_ids,
                                                                                tmp_path) -> None:
    """Seeded fuzz: 250 damaged or hostile adapter folders per start state; each load ends in an AdapterError
    with the model exactly as before (tensors, train/eval modes, requires_grad, adapters, module types), or
    loads an adapter whose outputs are finite; `adapter_info` on the same folder raises AdapterError only."""
    from lorakit.export import format_info

    good = _property_adapters(tiny, tmp_path / "good")
    model = copy.deepcopy(tiny)
    if start == "with-adapter":  # a frozen adapter already loaded, base partly trainable, mixed modes
        load_adapter(model, good[1], adapter_name="keep")
        model.embed.weight.requires_grad_(True)
        model.layers[0].train()
    before, flags = _snapshot(model), _flags(model)
    names, module_types = lorakit.adapter_names(model), [type(m) for m in model.modules()]
    rng = random.Random(20240601 if start == "clean" else 20261130)
    outcomes = {"error": 0, "loaded": 0}
    for i in range(250):
        source = rng.choice(good)
        folder = tmp_path / f"m{i}"
        shutil.copytree(source, folder)
        roll = rng.random()
        if roll < 0.15:  # two at once: an edited config and damaged weights
            what = _mutate(folder, rng, CONFIG_EDITS) + " + " + _mutate(folder, rng, FILE_DAMAGE)
        elif roll < 0.55:
            what = _hostile(folder, rng)
        else:
            what = _mutate(folder, rng)
        try:
            name = load_adapter(model, folder, adapter_name=None if start == "clean" else f"new{i}")
        except AdapterError as err:
            assert str(err), what
            outcomes["error"] += 1
            _check_model_unchanged(model, before, flags, names, module_types, what)
        except Exception as err:  # noqa: BLE001 - the property under test
            pytest.fail(f"mutation {i} ({what}) of {source.name} raised {type(err).__name__}: {err}")
        else:
            outcomes["loaded"] += 1
            lorakit.set_adapter(model, name)
            assert torch.isfinite(_out(model, tiny_ids)).all(), what
            delete_adapter(model, name)
            if names:
                lorakit.set_adapter(model, names)
            for param, requires_grad in flags[len(module_types):]:
                param.requires_grad_(requires_grad)
        try:
            format_info(adapter_info(folder))
        except AdapterError:
            pass
        except Exception as err:  # noqa: BLE001 - the property under test
            pytest.fail(f"adapter_info on mutation {i} ({what}) raised {type(err).__name__}: {err}")
        shutil.rmtree(folder)
    assert outcomes["error"] >= 180 and outcomes["loaded"] >= 1, outcomes


def test_clear_messages_for_common_damage(tiny, tmp_path) -> None:
    (good,) = _property_adapters(tiny, tmp_path)[:1]
    model = copy.deepcopy(tiny)

    def damaged(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        return folder

    folder = damaged("truncated")
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated or corrupted"):
        load_adapter(model, folder)
    folder = damaged("flipped")
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0x10
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="checksum"):
        load_adapter(model, folder)
    folder = damaged("newer")
    raw = json.loads((folder / CONFIG_FILE).read_text())
    raw["use_quantum"] = True
    (folder / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(AdapterError, match="use_quantum.*newer PEFT"):
        load_adapter(model, folder)
    folder = damaged("shape")
    tensors = load_file(folder / WEIGHTS_FILE)
    tensors[PREFIX + "layers.0.q.lora_B.weight"] = torch.zeros(17, 4)
    save_file(tensors, folder / WEIGHTS_FILE)
    with pytest.raises(AdapterError, match=r"layers.0.q.*lora_B has shape \(17, 4\), the model needs \(16, 4\)"):
        load_adapter(model, folder)
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(model, tmp_path / "nowhere")


# -- atomic writes ---------------------------------------------------------------------------------------------
def test_failed_write_leaves_no_partial_adapter(tiny, tiny_ids, tmp_path, monkeypatch) -> None:
    inject(tiny, LoraConfig(r=2, target_modules=["q"]))
    randomize_lora(tiny)
    import lorakit.io as lio

    real_write, calls = lio.write_file, []

    def failing_write(path, data):
        calls.append(path)
        if len(calls) == 2:  # the weights are on disk, the config is not
            raise OSError("no space left on device")
        real_write(path, data)

    monkeypatch.setattr(lio, "write_file", failing_write)
    with pytest.raises(OSError, match="no space"):
        save_adapter(tiny, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one

    monkeypatch.setattr(lio, "write_file", real_write)
    save_adapter(tiny, tmp_path / "old")
    (tmp_path / "old" / "README.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    with torch.no_grad():
        tiny.layers[0]["q"].lora_B["default"].weight.add_(1.0)
    calls.clear()
    monkeypatch.setattr(lio, "write_file", failing_write)
    with pytest.raises(OSError):
        save_adapter(tiny, tmp_path / "old")
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    monkeypatch.setattr(lio, "write_file", real_write)
    save_adapter(tiny, tmp_path / "old")  # a successful overwrite keeps files that are not the adapter's
    assert (tmp_path / "old" / "README.md").read_text() == "mine"
    fresh = copy.deepcopy(tiny)
    lorakit.unload(fresh, merge=False)
    load_adapter(fresh, tmp_path / "old")
    assert torch.equal(_out(fresh, tiny_ids), _out(tiny, tiny_ids))


# -- loading keeps train/eval mode (issue 14) --------------------------------------------------------------------
def _modes(model) -> list[tuple[object, bool]]:
    return [(m, m.training) for m in model.modules()]


def _dropout_adapter(tiny, folder: Path) -> Path:
    source = copy.deepcopy(tiny)
    inject(source, LoraConfig(r=4, target_modules=["q", "v", "conv"], dropout=0.5, modules_to_save=["head"]))
    randomize_lora(source)
    save_adapter(source, folder)
    return folder


@pytest.mark.parametrize("mode", ["eval", "train", "mixed"])
def test_loading_keeps_every_modules_train_eval_mode(mode, tiny, tiny_ids, tmp_path) -> None:
    folder = _dropout_adapter(tiny, tmp_path / "a")
    model = copy.deepcopy(tiny).train(mode == "train")
    if mode == "mixed":
        model.layers[0].train()
        model.conv.train()
    before = _modes(model)
    load_adapter(model, folder)
    assert [(m, m.training) for m, _ in before] == before
    for module in model.modules():  # new modules follow the layer they wrap
        if isinstance(module, (lorakit.LoraLayer,)):
            assert all(sub.training == module.base_layer.training for sub in module.modules())
    if mode == "eval":
        assert not any(m.training for m in model.modules())
        outs = [_out(model, tiny_ids) for _ in range(3)]  # dropout 0.5 would make these differ
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


def test_load_adapters_keeps_modes(tiny, tmp_path) -> None:
    source = copy.deepcopy(tiny)
    lorakit.add_adapter(source, "default", LoraConfig(r=2, target_modules=["q"], dropout=0.2))
    lorakit.add_adapter(source, "other", LoraConfig(r=3, target_modules=["v"], dropout=0.2))
    save_adapter(source, tmp_path / "multi", adapter_name=["default", "other"])
    model = copy.deepcopy(tiny).eval()
    assert load_adapters(model, tmp_path / "multi") == ["default", "other"]
    assert not any(m.training for m in model.modules())


def test_loading_onto_real_minilm_in_eval_mode_gives_deterministic_outputs(minilm, tmp_path) -> None:
    model, tokenizer = minilm
    source = copy.deepcopy(model)
    inject(source, LoraConfig(r=4, target_modules=["query", "value"], dropout=0.1))
    randomize_lora(source)
    save_adapter(source, tmp_path / "a", tokenizer=tokenizer)
    model.eval()
    load_adapter(model, tmp_path / "a", tokenizer=tokenizer)
    assert [n for n, m in model.named_modules() if m.training] == []  # was 225 (108 for query/value)
    inputs = _inputs(tokenizer)
    assert torch.equal(_out(model, inputs), _out(model, inputs))


def test_failed_load_keeps_modes_and_requires_grad(tiny, tmp_path) -> None:
    folder = _dropout_adapter(tiny, tmp_path / "a")
    tensors = load_file(folder / WEIGHTS_FILE)
    tensors[PREFIX + "layers.1.v.lora_B.weight"] = torch.zeros(15, 4)  # refused by the shape probe
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    model = copy.deepcopy(tiny).eval()
    model.layers[1]["v"].weight.requires_grad_(False)
    before, grads = _modes(model), [(p, p.requires_grad) for p in model.parameters()]
    with pytest.raises(AdapterError, match="shape"):
        load_adapter(model, folder)
    assert [(m, m.training) for m, _ in before] == before
    assert [(p, p.requires_grad) for p, _ in grads] == grads


# -- hostile files (issue 18): names, numbers, rollback, info -----------------------------------------------------
def _resave_metadata(folder: Path, **fields) -> None:
    weights = folder / WEIGHTS_FILE
    data = weights.read_bytes()
    meta = json.loads(json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]["lorakit"])
    meta.update(fields)
    meta.pop("tensors_sha256", None)
    save_file(load_file(weights), weights, metadata={"format": "pt", "lorakit": json.dumps(meta)})


@pytest.mark.parametrize("stored", ["/tmp/x", "../x", "a/b", "a\\b", "a.b", ""])
def test_stored_name_is_checked_and_saving_never_leaves_the_folder(stored, tiny, tmp_path) -> None:
    source = copy.deepcopy(tiny)
    inject(source, LoraConfig(r=2, target_modules=["q"]))
    save_adapter(source, tmp_path / "a")
    _resave_metadata(tmp_path / "a", adapter_name=stored)
    model = copy.deepcopy(tiny)
    with pytest.raises(AdapterError, match="stored adapter_name"):
        load_adapter(model, tmp_path / "a")
    assert load_adapter(model, tmp_path / "a", adapter_name="mine") == "mine"
    # a name that got onto the model some other way is still never a path
    lora_state(model).configs["../escape"] = lora_state(model).configs["mine"]
    with pytest.raises(AdapterStateError, match="without dots, slashes"):
        lorakit.save_adapters(model, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    with pytest.raises(AdapterStateError, match="without dots, slashes"):
        lorakit.add_adapter(tiny, "/tmp/x", LoraConfig(r=2, target_modules=["q"]))


@pytest.mark.parametrize("key,value,match", [
    ("use_rslora", "false", "use_rslora must be true or false"),
    ("lora_alpha", float("nan"), "lora_alpha must be a finite number"),
    ("lora_alpha", 1e300, "lora_alpha must be a finite number"),
    ("alpha_pattern", {"q": -1}, "alpha_pattern must be"),
    ("rank_pattern", {"(": 2}, "rank_pattern must be"),
    ("layers_to_transform", "abc", "layers_to_transform must be"),
])
def test_bad_config_values_are_refused_by_name(key, value, match, tiny, tmp_path) -> None:
    source = copy.deepcopy(tiny)
    inject(source, LoraConfig(r=2, target_modules=["q"]))
    save_adapter(source, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    raw[key] = value
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(AdapterError, match=match):
        load_adapter(copy.deepcopy(tiny), tmp_path / "a")


def test_extreme_finite_weights_are_refused(tiny, tmp_path) -> None:
    source = copy.deepcopy(tiny)
    inject(source, LoraConfig(r=2, target_modules=["q"]))
    save_adapter(source, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / WEIGHTS_FILE)
    key = PREFIX + "layers.0.q.lora_A.weight"
    tensors[key] = torch.full_like(tensors[key], 3e38)  # finite, but every output would be NaN
    save_file(tensors, tmp_path / "a" / WEIGHTS_FILE, metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="values up to 3e\\+38"):
        load_adapter(copy.deepcopy(tiny), tmp_path / "a")
    tensors[key] = torch.full_like(tensors[key], 1e3)  # each factor sane, their product is not
    tensors[PREFIX + "layers.0.q.lora_B.weight"] = torch.full((16, 2), 1e3)
    save_file(tensors, tmp_path / "a" / WEIGHTS_FILE, metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="update s\\*B\\*A can reach"):
        load_adapter(copy.deepcopy(tiny), tmp_path / "a")


def test_load_adapters_rollback_restores_requires_grad(tiny, tmp_path) -> None:
    source = copy.deepcopy(tiny)
    lorakit.add_adapter(source, "default", LoraConfig(r=2, target_modules=["q"]))
    lorakit.add_adapter(source, "other", LoraConfig(r=3, target_modules=["v"]))
    save_adapter(source, tmp_path / "multi", adapter_name=["default", "other"])
    (tmp_path / "multi" / "other" / WEIGHTS_FILE).write_bytes(b"garbage")  # the second sub-folder is corrupt
    fresh = copy.deepcopy(tiny).train()  # a plain model: everything trainable
    with pytest.raises(AdapterError):
        load_adapters(fresh, tmp_path / "multi")
    assert all(p.requires_grad for p in fresh.parameters()) and all(m.training for m in fresh.modules())
    frozen = copy.deepcopy(tiny)
    inject(frozen, LoraConfig(r=2, target_modules=["v"]), adapter_name="mine")
    for param in frozen.parameters():
        param.requires_grad_(False)  # a frozen adapter, e.g. loaded for inference
    with pytest.raises(AdapterError):
        load_adapters(frozen, tmp_path / "multi")
    assert not any(p.requires_grad for p in frozen.parameters())
    assert lorakit.adapter_names(frozen) == ["mine"]


# -- what a saved adapter says about its base (issue 17) -----------------------------------------------------------
def test_python_api_records_task_type_and_hub_id(minilm, minilm_classifier, smollm2, tmp_path) -> None:
    from lorakit.hf import base_model_id

    model, _ = _minilm_for("head", minilm, minilm_classifier)
    inject(model, LoraConfig(r=2, target_modules=["query"]))  # no task_type given
    save_adapter(model, tmp_path / "cls")
    raw = json.loads((tmp_path / "cls" / CONFIG_FILE).read_text())
    assert raw["task_type"] == "SEQ_CLS"  # was null
    assert raw["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"  # was a site-packages path
    lm, _ = smollm2
    inject(lm, LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(lm, tmp_path / "lm")
    raw = json.loads((tmp_path / "lm" / CONFIG_FILE).read_text())
    assert raw["task_type"] == "CAUSAL_LM" and raw["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    base, _ = minilm
    base.config._name_or_path = "/home/u/.cache/huggingface/hub/models--org--my-model/snapshots/0123abcd"
    assert base_model_id(base) == "org/my-model"
    base.config._name_or_path = "org/other"
    assert base_model_id(base) == "org/other"


def test_saved_adapter_folders_follow_the_umask(tiny, tmp_path) -> None:
    import os
    import stat

    inject(tiny, LoraConfig(r=2, target_modules=["q"]))
    old = os.umask(0o022)
    try:
        save_adapter(tiny, tmp_path / "a")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755  # was 0o700 whatever the umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a").iterdir()} == {0o644}


def test_load_walks_the_targets_once_for_its_checks(tiny, tmp_path, monkeypatch) -> None:
    """The checks before a load share one targeting report (each walks the whole model; three walks per load made
    SmolLM2 all-linear loads 1.2x slower than PEFT's); `add_adapter` makes the only other one."""
    import importlib

    inject_module, io_module = importlib.import_module("lorakit.inject"), importlib.import_module("lorakit.io")
    inject(tiny, LoraConfig(r=2, target_modules="all-linear"))
    randomize_lora(tiny)
    save_adapter(tiny, tmp_path / "a")
    calls = []
    real = inject_module.targeting_report

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(inject_module, "targeting_report", counted)
    monkeypatch.setattr(io_module, "targeting_report", counted)
    load_adapter(tiny, tmp_path / "a", adapter_name="b")
    assert len(calls) == 2
    for before, after in zip(io_module.adapter_state_dict(tiny, "default").values(),
                             io_module.adapter_state_dict(tiny, "b").values()):
        assert torch.equal(before, after)
