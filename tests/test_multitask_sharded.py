"""`lorakit multitask` under torchrun (2 CPU processes over gloo) against one process: mixed batches of every task,
each process taking its share of every task's rows, with the model sharded by FSDP2 (and gradient checkpointing)
or replicated by DDP, give the single process's per-step per-task losses and saved task adapters; what such a run
cannot honour is refused before anything loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit import distributed
from lorakit.cli import main as cli_main

# two text tasks of the shipped recipe on a 2-layer Llama with SmolLM2's tokenizer; no dropout anywhere; two
# micro-batches per step; a tiny max_grad_norm, so every adapter's clip group really clips (on sharded gradients
# under FSDP)
OVERRIDES = ["tasks=[{name: instruct, data: faq-en}, {name: translate, data: faq-en-sv}]", "train.batch_size=2",
             "train.grad_accum=2", "train.max_steps=3", "train.max_length=64", "train.lr=1e-2", "train.warmup_ratio=0",
             "train.max_grad_norm=1e-3", "lora.dropout=0", "train.model_dropout=0", "eval.max_examples=4",
             "eval.batch_size=4", "combine.methods=[]", "train.progress=false", "train.num_threads=1"]
RUNS = {"one": [], "fsdp": ["train.sharding=fsdp", "train.gradient_checkpointing=true"],
        "ddp": ["train.sharding=ddp", "combine.methods=[linear]"]}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 2-layer Llama saved as a model folder (`model=FOLDER`), with SmolLM2's tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from lorakit.models import PACKAGED_MODELS

    folder, out = PACKAGED_MODELS["smollm2"].folder(), tmp_path_factory.mktemp("tiny-llama")
    config = AutoConfig.from_pretrained(folder)
    config.update({"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 8})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """``run(kind)``: the output folder of `lorakit multitask` for ``kind`` in `RUNS` (each run once)."""
    done: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in done:
            out = tmp_path_factory.mktemp(kind)
            launch = [sys.executable] if kind == "one" else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
            cmd = [*launch, "-m", "lorakit.cli", "multitask", "multitask-smollm2", f"model={tiny_model}", *OVERRIDES,
                   *RUNS[kind], "-o", str(out)]
            result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                                    timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
            done[kind] = out
        return done[kind]

    return get


def _history(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["history"]


@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_two_processes_train_every_task_as_one_process_does(run, kind: str) -> None:
    from lorakit.io import read_adapter

    one, two = run("one"), run(kind)
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and json.loads((one / "metrics.json").read_text())["world_size"] == 1
    single, sharded = [s["loss"] for s in _history(one)], [s["loss"] for s in _history(two)]
    assert len(single) == len(sharded) == 3 and all(set(s) == {"instruct", "translate"} for s in sharded)
    assert max(abs(a[t] - b[t]) for a, b in zip(single, sharded) for t in a) < 1e-4
    norms = [(a["grad_norm"], b["grad_norm"]) for a, b in zip(_history(one), _history(two))]
    assert all(a > 1e-2 and b == pytest.approx(a, rel=1e-4) for a, b in norms)  # clipped to 1e-3 per adapter
    for task in ("instruct", "translate"):
        a, b = read_adapter(one / "adapters" / task).tensors, read_adapter(two / "adapters" / task).tensors
        assert set(a) == set(b) and len(a) == 2 * 7 * 2  # A and B of 7 projections in 2 blocks
        assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-3  # it trained (B starts at 0)
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)
    if kind == "fsdp":  # the base really was sharded: each process held about half of it
        assert metrics["frozen_bytes_per_process"] <= 0.55 * metrics["frozen_bytes"]
    else:  # the combinations of a replicated run are scored as in one process
        assert {row["method"] for row in metrics["combinations"]} == {"linear"}


def _launched_as_two(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the CLI see a torchrun launch of 2 processes, and fail if any task's data is read."""
    import lorakit.multitask.data as data

    monkeypatch.setattr(distributed, "setup", lambda device=None, cpu_collectives=False: distributed.World(rank=0, size=2))

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was read before the refusal")

    monkeypatch.setattr(data, "load_tasks", no_loading)


@pytest.mark.parametrize("argv, message", [
    (["continual", "multitask-smollm2"], "lorakit continual trains in one process"),
    (["multitask", "multitask-smollm2", "combine.methods=[]", "--benchmark", "2"], "--benchmark times one process"),
    (["multitask", "multitask-smollm2", "train.batch_size=1", "combine.methods=[]"], "train.batch_size>=2"),
    (["multitask", "multitask-smollm2", "train.sharding=fsdp", "design=shared"], "design=per-task"),
    (["multitask", "multitask-smollm2", "train.sharding=fsdp"], "combine.methods=[]"),
])
def test_what_a_torchrun_launch_cannot_honour_is_refused_before_loading(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path, argv: list[str],
        message: str) -> None:
    _launched_as_two(monkeypatch)
    assert cli_main([*argv, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
