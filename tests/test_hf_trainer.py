"""HF Trainer and TRL's SFTTrainer on a model holding lorakit adapters (lorakit.hf + lorakit.hf_trainer): their
checkpoints and save_model hold the adapter and no base weight, and resuming from a checkpoint continues training
the adapter exactly as the uninterrupted run did."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import lorakit
from lorakit.errors import AdapterError, ConfigError
from lorakit.hf_trainer import AdapterCheckpoints, LoraTrainer

from test_hf import tiny_llama_config

CONFIG = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
BODY = CONFIG.replace(modules_to_save=None)
#: full-model files a checkpoint of an adapter must not hold
FULL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "config.json")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def rows(n: int = 24) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 64, (10,), generator=gen).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * 10, "labels": ids})
    return out


def model_with_adapter(adapter_seed: int = 0, config: lorakit.LoraConfig = CONFIG) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    torch.manual_seed(adapter_seed)  # A's init: a resumed run must not depend on it
    return lorakit.inject(model, config)


def args(out: Path, steps: int = 6, lr: float = 5e-3, **extra) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=3, per_device_train_batch_size=4,
                             learning_rate=lr, logging_steps=1, report_to="none", use_cpu=True, seed=7,
                             save_strategy="steps", disable_tqdm=True, **extra)


def adapter_of(model) -> dict[str, torch.Tensor]:
    return lorakit.adapter_state_dict(model)


def assert_adapter_only(folder: Path, base_only_lora: bool = False) -> None:
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names, names
    assert not names & set(FULL_WEIGHTS), names
    # the weights file holds the adapter (LoRA + the lm_head copy), not the 100k-parameter base
    saved = lorakit.read_adapter(folder).tensors
    assert all(".lora_" in k or (".lm_head." in k and not base_only_lora) for k in saved), sorted(saved)
    assert any(".lora_" in k for k in saved)


def test_trainer_checkpoints_hold_the_adapter_and_resume_continues_it_exactly(tmp_path):
    straight = model_with_adapter()
    LoraTrainer(model=straight, args=args(tmp_path / "run"), train_dataset=rows()).train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert_adapter_only(checkpoint)
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json").is_file()

    resumed = model_with_adapter(adapter_seed=1)  # another starting adapter: the checkpoint must replace it
    params = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    trainer = LoraTrainer(model=resumed, args=args(tmp_path / "again"), train_dataset=rows())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 6
    want, got = adapter_of(straight), adapter_of(resumed)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6, rtol=0), key
    # the same parameter objects train on (peft #282: a resumed adapter was left frozen)
    assert {n: p for n, p in resumed.named_parameters() if p.requires_grad} == params
    assert all(p.requires_grad for p in params.values())
    trainer.save_model(str(tmp_path / "final"))
    assert_adapter_only(tmp_path / "final")
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(tiny_llama_config())  # the same base
    lorakit.load_adapter(fresh, tmp_path / "final")
    for key, value in adapter_of(fresh).items():
        assert torch.equal(value, got[key]), key


def test_resume_refuses_a_checkpoint_of_another_adapter_and_changes_nothing(tmp_path):
    model = model_with_adapter()
    LoraTrainer(model=model, args=args(tmp_path / "run", steps=3), train_dataset=rows()).train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    other = model_with_adapter(config=CONFIG.replace(alpha=16))  # same shapes, another scaling
    before = adapter_of(other)
    with pytest.raises(AdapterError, match="lora_alpha"):
        LoraTrainer(model=other, args=args(tmp_path / "again"), train_dataset=rows()).train(
            resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(v, adapter_of(other)[k]) for k, v in before.items())
    # transformers' own Trainer saves the adapter too, but cannot read it back into a non-peft model: it stops
    # loudly (never a silent fresh start); LoraTrainer / AdapterCheckpoints is the documented fix
    with pytest.raises(ValueError, match="checkpoint index"):
        Trainer(model=model_with_adapter(), args=args(tmp_path / "plain"), train_dataset=rows()).train(
            resume_from_checkpoint=str(checkpoint))


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    model = model_with_adapter()
    # "best" is the highest eval loss: the step-3 checkpoint, while training on the eval rows lowers the loss after
    trainer = LoraTrainer(model=model, args=args(tmp_path / "run", lr=3e-2, eval_strategy="steps", eval_steps=3,
                                                 load_best_model_at_end=True, metric_for_best_model="loss",
                                                 greater_is_better=True),
                          train_dataset=rows(), eval_dataset=rows(8))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-3"
    assert_adapter_only(best)
    saved, last = (lorakit.read_adapter(tmp_path / "run" / n).tensors for n in ("checkpoint-3", "checkpoint-6"))
    now = adapter_of(model)
    assert all(torch.equal(value, saved[key]) for key, value in now.items())
    assert not all(torch.equal(value, last[key]) for key, value in now.items())  # not the end of training


def test_trl_sft_trainer_saves_and_resumes_the_adapter(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(64)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
                                        pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")
    data = Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows()])

    class LoraSFTTrainer(AdapterCheckpoints, trl.SFTTrainer):
        pass

    def sft(model, out: Path):
        config = trl.SFTConfig(output_dir=str(out), max_steps=6, save_steps=3, per_device_train_batch_size=4,
                               learning_rate=5e-3, report_to="none", use_cpu=True, seed=7, disable_tqdm=True,
                               logging_steps=1)
        return LoraSFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)

    # TRL's loss reads lm_head.weight directly: an adapter there would never train, so it is refused
    for head in (CONFIG, CONFIG.replace(modules_to_save=None, target_modules=["q_proj", "lm_head"])):
        with pytest.raises(ConfigError, match="fused LM head"):
            sft(model_with_adapter(config=head), tmp_path / "head")
    straight = model_with_adapter(config=BODY)
    trainer = sft(straight, tmp_path / "run")
    trainer.train()
    assert_adapter_only(tmp_path / "run" / "checkpoint-3")
    trainer.save_model(str(tmp_path / "final"))  # TRL wrote a full model.safetensors here
    assert_adapter_only(tmp_path / "final")
    resumed = model_with_adapter(adapter_seed=1, config=BODY)
    sft(resumed, tmp_path / "again").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    want, got = adapter_of(straight), adapter_of(resumed)
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6, rtol=0), key


def test_docs_trainer_example(tmp_path):
    """docs/coming-from-peft.md's Trainer example, run as written on a tiny saved Llama."""
    text = (Path(__file__).parents[1] / "docs" / "coming-from-peft.md").read_text()
    code = text.split("<!-- example: trainer -->\n```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    scope = {"base": str(tmp_path / "base"), "out": str(tmp_path / "out"), "train_rows": rows()}
    exec(compile(code, "coming-from-peft.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert_adapter_only(tmp_path / "out" / "checkpoint-3", base_only_lora=True)
    assert_adapter_only(tmp_path / "out" / "adapter", base_only_lora=True)
    want, got = adapter_of(scope["model"]), adapter_of(scope["resumed"])
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6, rtol=0), key


def test_restore_adapters_copies_every_adapter_in_place_or_changes_nothing(tmp_path):
    from conftest import randomize_lora
    from lorakit.hf_trainer import restore_adapters

    model = model_with_adapter(config=BODY)
    lorakit.add_adapter(model, "other", lorakit.LoraConfig(r=2, target_modules=["o_proj"]))
    randomize_lora(model, seed=1)
    model.save_pretrained(tmp_path / "ckpt")  # default at the top, other/ beside it
    want = {name: lorakit.adapter_state_dict(model, name) for name in ("default", "other")}
    params = dict(model.named_parameters())
    randomize_lora(model, seed=2)
    assert restore_adapters(model, tmp_path / "ckpt") == ["default", "other"]
    assert dict(model.named_parameters()) == params  # the same objects: an optimizer's references stay valid
    for name, tensors in want.items():
        assert all(torch.equal(v, lorakit.adapter_state_dict(model, name)[k]) for k, v in tensors.items()), name
    # refused before any value is copied: a missing adapter, another base
    randomize_lora(model, seed=3)
    before = {name: lorakit.adapter_state_dict(model, name) for name in ("default", "other")}
    lorakit.save_adapter(model, tmp_path / "one")
    with pytest.raises(AdapterError, match=r"holds adapters \['default'\], the model \['default', 'other'\]"):
        restore_adapters(model, tmp_path / "one")
    torch.manual_seed(9)
    other_base = lorakit.inject(LlamaForCausalLM(tiny_llama_config()), BODY)
    lorakit.add_adapter(other_base, "other", lorakit.LoraConfig(r=2, target_modules=["o_proj"]))
    other_base.save_pretrained(tmp_path / "elsewhere")
    with pytest.raises(AdapterError, match="another base model"):
        restore_adapters(model, tmp_path / "elsewhere")
    for name, tensors in before.items():
        assert all(torch.equal(v, lorakit.adapter_state_dict(model, name)[k]) for k, v in tensors.items()), name
