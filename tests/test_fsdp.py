"""Sharded LoRA training (FSDP2 over gloo, 2 CPU processes under torchrun) against one process: the same loss
trajectory, the same saved adapter, each process holding about half of the frozen base, broken gathers refused,
and the recipe settings no sharded path can honour refused before anything loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False,
              "max_position_embeddings": 64, "attention_dropout": 0.0}
STEPS, ROWS, SEQ = 6, 4, 16


def _model() -> tuple[torch.nn.Module, object]:
    """The tiny Llama with LoRA on every linear layer (B random so A trains from the first step) and its config."""
    import transformers

    from lorakit.config import LoraConfig
    from lorakit.inject import inject

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**TINY_LLAMA))
    # a trained lm_head copy sits in the root unit beside the frozen embeddings: mixed requires_grad in one unit
    config = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear", modules_to_save=["lm_head"])
    inject(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model, config


def _batch(step: int, rank: int, size: int) -> list:
    from lorakit.train import MicroBatch

    ids = torch.randint(3, TINY_LLAMA["vocab_size"], (ROWS, SEQ), generator=torch.Generator().manual_seed(0))
    mine = ids[rank::size]
    return [MicroBatch({"input_ids": mine, "attention_mask": torch.ones_like(mine), "labels": mine.clone()})]


def worker(out: Path, sharding: str) -> None:
    """One process of the run (also the single-process reference): train, gather, check, save, report."""
    from lorakit import distributed
    from lorakit.fingerprint import base_fingerprint
    from lorakit.io import save_adapter
    from lorakit.sharding import ShardedSaveError, check_adapter, gather_adapter, shard_bytes
    from lorakit.train import StepSettings, run_training

    torch.set_num_threads(1)
    world = distributed.setup("cpu")
    model, config = _model()
    fingerprint = base_fingerprint(model, config)  # of the whole base: before it is sharded
    train_model = distributed.wrap(model, world, sharding=sharding)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    settings = StepSettings(task="causal-lm", world=world)
    results = run_training(train_model, optimizer, None, lambda s: _batch(s, world.rank, world.size), STEPS,
                           settings)
    with torch.no_grad():  # an evaluation forward leaves the root unit gathered: saving must still work
        train_model(**_batch(0, world.rank, world.size)[0].inputs)
    tensors = gather_adapter(model)
    check_adapter(model, tensors)
    refused = []
    broken = {"empty": {}, "one key lost": dict(list(tensors.items())[1:]),
              "local shard": {k: v[: (v.shape[0] + 1) // 2] for k, v in tensors.items()},
              "zeros": {k: torch.zeros_like(v) for k, v in tensors.items()}}
    for label, bad in broken.items():
        try:
            check_adapter(model, bad)
        except ShardedSaveError:
            refused.append(label)
    local, whole = shard_bytes(model)
    if world.is_main:
        save_adapter(model, out / "adapter", tensors=tensors, fingerprint=fingerprint)
        (out / "result.json").write_text(json.dumps({
            "losses": [r.loss for r in results], "refused": refused, "local_frozen": local, "whole_frozen": whole,
            "world": world.size}))
    distributed.barrier(world)
    distributed.teardown(world)


def _run(tmp: Path, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    if processes == 1:
        cmd = [sys.executable, __file__, str(tmp), "ddp"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, str(tmp), "fsdp"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path, Path]:
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    return _run(one, 1), _run(two, 2), one, two


def test_fsdp_loss_trajectory_equals_one_process(runs: tuple) -> None:
    single, sharded, _, _ = runs
    assert sharded["world"] == 2 and single["world"] == 1
    assert len(sharded["losses"]) == STEPS
    assert max(abs(a - b) for a, b in zip(single["losses"], sharded["losses"])) < 1e-4
    assert single["losses"][-1] < single["losses"][0]  # it trained


def test_saved_adapter_equals_one_process(runs: tuple) -> None:
    from lorakit.io import read_adapter

    _, _, one, two = runs
    a, b = read_adapter(one / "adapter").tensors, read_adapter(two / "adapter").tensors
    assert set(a) == set(b) and len(a) == 3 * 7 * 2 + 1  # A and B of 7 linears in 3 blocks, the lm_head copy
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)


def test_saved_adapter_loads_in_one_process(runs: tuple) -> None:
    from lorakit.io import load_adapter

    _, _, _, two = runs
    model, _ = _model()
    load_adapter(model, two / "adapter", adapter_name="sharded")


def test_each_process_holds_about_half_of_the_frozen_base(runs: tuple) -> None:
    _, sharded, _, _ = runs
    assert sharded["local_frozen"] <= 0.55 * sharded["whole_frozen"]


def test_broken_gathers_are_refused(runs: tuple) -> None:
    _, sharded, _, _ = runs
    assert sharded["refused"] == ["empty", "one key lost", "local shard", "zeros"]


E2E = ["train.max_train_examples=64", "eval.max_examples=16", "train.batch_size=16", "train.progress=false",
       "train.model_dropout=0", "lora.dropout=0", "train.num_threads=1", "train.lr=5e-4"]


@pytest.mark.slow
def test_recipe_under_torchrun_fsdp_equals_one_process(tmp_path: Path) -> None:
    """`lorakit train` of the default recipe (MiniLM, a 64-row slice, no dropout): 2 sharded processes give
    the single process's per-step losses and adapter file."""
    from lorakit.io import read_adapter

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = ["-m", "lorakit.cli", "train", "sentiment-minilm", *E2E]
    one = subprocess.run([sys.executable, *cli, "-o", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cli,
                          "train.sharding=fsdp", "-o", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]

    def losses(run: str) -> list[float]:
        rows = [json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        return [row["loss"] for row in rows if "loss" in row]

    assert len(losses("one")) == 4 and max(abs(a - b) for a, b in zip(losses("one"), losses("two"))) < 1e-4
    a, b = read_adapter(tmp_path / "one" / "adapter").tensors, read_adapter(tmp_path / "two" / "adapter").tensors
    assert set(a) == set(b) and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides, message", [
    (["train.sharding=fsdp", "quantize=nf4"], "train.dtype=bf16"),
    (["train.sharding=fsdp", "method=full"], "method=lora"),
    (["train.sharding=fsdp", "train.checkpoint_every=10"], "checkpoint_every=0"),
    (["train.sharding=zero3"], "ddp or fsdp"),
])
def test_settings_a_sharded_run_cannot_honour_are_refused(overrides: list[str], message: str) -> None:
    from lorakit.errors import ConfigError
    from lorakit.recipes import load_recipe

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_recipe("sentiment-minilm", overrides)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
