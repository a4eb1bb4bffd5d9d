"""Sharded LoRA training (FSDP2 over gloo, 2 CPU processes under torchrun) against one process: the same loss
trajectory, the same saved adapter, each process holding about half of the frozen base, broken gathers refused,
the recipe settings no sharded path can honour refused before anything loads; sharded checkpoints (killed runs
resumed on 2 or 1 processes, a kill during the commit, Ctrl-C seen by one process, no pickle read, stale folders
cleaned); and the CPU dry path of benchmarks/fsdp_gpu.py."""

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
    # the sharded run scores the base once sharded (its adapters as initialised add nothing): the same numbers
    one, two = (json.loads((tmp_path / run / "metrics.json").read_text())["base_eval"] for run in ("one", "two"))
    assert one["examples"] == two["examples"] and one["accuracy"] == two["accuracy"]
    assert abs(one["loss"] - two["loss"]) < 1e-5
    a, b = read_adapter(tmp_path / "one" / "adapter").tensors, read_adapter(tmp_path / "two" / "adapter").tensors
    assert set(a) == set(b) and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)


def test_a_sharded_run_never_moves_the_whole_base_to_the_device(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """FSDP is for a base larger than one device: `lorakit train` and `lorakit multitask` under fsdp load it into
    CPU memory and leave the move to `fully_shard`, which brings it to the device one block at a time, sharded.
    Before, the whole base went to the device first (and was evaluated there), so it had to fit one device.
    DDP still loads onto the device (every process holds the whole base there anyway)."""
    import types

    import lorakit.multitask.data as multitask_data
    import lorakit.train as lktrain
    from lorakit import distributed
    from lorakit.multitask import load_multitask_recipe
    from lorakit.recipes import load_recipe

    on_gpus = distributed.World(rank=0, size=2, device=torch.device("meta"))  # stands for a process's GPU
    monkeypatch.setattr(distributed, "setup", lambda device=None, cpu_collectives=False: on_gpus)
    asked: list[object] = []

    class Loaded(Exception):
        pass

    def load_recipe_model(recipe: object, labels: object = None, device: object = None) -> None:
        asked.append(device)
        raise Loaded

    monkeypatch.setattr(lktrain, "load_recipe_model", load_recipe_model)
    monkeypatch.setattr(multitask_data, "load_recipe_model", load_recipe_model)
    for sharding in ("fsdp", "ddp"):
        with pytest.raises(Loaded):
            lktrain.train(load_recipe("sentiment-minilm", [f"train.sharding={sharding}", *E2E]), tmp_path / sharding)
        recipe = load_multitask_recipe("multitask-smollm2", [f"train.sharding={sharding}", "combine.methods=[]"])
        task = types.SimpleNamespace(train=types.SimpleNamespace(labels=None), recipe=recipe)
        with pytest.raises(Loaded):
            multitask_data.load_base(recipe, [task])
    assert asked == [None, None, on_gpus.device, on_gpus.device]


@pytest.mark.parametrize("overrides, message", [
    (["train.sharding=fsdp", "quantize=nf4"], "train.dtype=bf16"),
    (["train.sharding=fsdp", "method=full"], "method=lora"),
    (["train.sharding=zero3"], "ddp or fsdp"),
])
def test_settings_a_sharded_run_cannot_honour_are_refused(overrides: list[str], message: str) -> None:
    from lorakit.errors import ConfigError
    from lorakit.recipes import load_recipe

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_recipe("sentiment-minilm", overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="offload is refused where there is no GPU")
def test_cpu_offload_is_refused_without_a_gpu_before_anything_loads(tmp_path: Path) -> None:
    """``train.fsdp_cpu_offload=true`` on a CPU run (its weights are in CPU memory already) or without fsdp: one
    line, exit code 2, before the model or data are read."""
    from lorakit.errors import ConfigError
    from lorakit.recipes import load_recipe

    with pytest.raises(ConfigError, match=r"train\.sharding=fsdp"):
        load_recipe("sentiment-minilm", ["train.fsdp_cpu_offload=true"])
    done = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "sentiment-minilm", "train.sharding=fsdp",
                           "train.fsdp_cpu_offload=true", "-o", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "fsdp_cpu_offload=false" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_gpu_benchmark_script_runs_its_dry_path_on_cpu(tmp_path: Path) -> None:
    """benchmarks/fsdp_gpu.py (the lead's one GPU run) end to end on a CPU: a tiny Llama config, a world of one
    over gloo, the model really sharded, finite losses, the plan's estimate and the JSON written."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({**TINY_LLAMA, "architectures": ["LlamaForCausalLM"]}))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fsdp_gpu.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parents[1] / "src")}
    done = subprocess.run([sys.executable, str(script), "--config", str(tmp_path / "cfg"), "--device", "cpu",
                           "--batch", "2", "--seq", "16", "--steps", "2", "--output", str(tmp_path / "out.json")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    (row,) = result["rows"]
    assert row["sharded"] and len(row["losses"]) == 2 and all(0 < x < 20 for x in row["losses"])
    assert result["plan_estimate_bytes"] > row["frozen_bytes"] > 0 and "measured peak" in done.stdout


# -- checkpoints and --resume of sharded runs (lorakit.sharded_checkpoints) ------------------------------------------
# `lorakit train` of the default recipe on a tiny random BERT folder (MiniLM's tokenizer): 6 steps, a checkpoint
# every 2, no dropout. Runs are killed for real (SIGKILL, nothing gets to clean up) and resumed with --resume.
RECIPE = ["train.max_train_examples=32", "eval.max_examples=8", "train.batch_size=4", "train.max_steps=6",
          "train.checkpoint_every=2", "train.progress=false", "train.model_dropout=0", "lora.dropout=0",
          "train.num_threads=1", "train.max_length=32", "train.sharding=fsdp"]
KILL_AT, KILL_IN_SAVE = 3, 4


def recipe_worker(out: Path, mode: str, overrides: list[str]) -> None:
    """One process of a recipe run. ``mode``: ``straight``; ``kill`` (every process SIGKILLs itself after step
    ``KILL_AT``: the last checkpoint is step 2's); ``kill-in-save`` (the main process SIGKILLs itself while the
    step-``KILL_IN_SAVE`` checkpoint is written, after every shard file and before the commit); ``resume``."""
    import signal

    import lorakit.sharded_checkpoints as sharded
    from lorakit.recipes import load_recipe
    from lorakit.train import train

    commit = sharded._commit

    def crash_in_commit(root: Path, staging: Path, name: str) -> None:
        if name.startswith(f"step-{KILL_IN_SAVE:08d}-"):
            os.kill(os.getpid(), signal.SIGKILL)
        commit(root, staging, name)

    def hook(state, loss: float) -> None:
        if mode == "kill" and state.global_step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "ctrl-c-one" and state.global_step == KILL_AT and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGINT)  # only one process sees it (as when signals race)

    if mode == "kill-in-save":
        sharded._commit = crash_in_commit
    train(load_recipe("sentiment-minilm", overrides), out, resume=mode == "resume", on_step=hook)


def _launch(out: Path, mode: str, processes: int, model: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    args = [__file__, "recipe", str(out), mode, *RECIPE, f"model={model}", *extra]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 \
        else []
    return subprocess.run([sys.executable, *launcher, *args], env=env, capture_output=True, text=True, timeout=300)


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]


def _latest_step(out: Path) -> int:
    from lorakit.sharded_checkpoints import read_sharded_checkpoint

    return read_sharded_checkpoint(out).manifest["loop"]["global_step"]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from lorakit.io import read_adapter

    return read_adapter(out / "adapter").tensors


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b) and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer, as a Hugging Face folder."""
    import shutil

    import transformers

    from lorakit.models import model_path

    source, folder = model_path("minilm"), tmp_path_factory.mktemp("tiny-bert")
    config = transformers.AutoConfig.from_pretrained(source)
    config.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2})
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    out = tmp_path_factory.mktemp("straight")
    _ok(_launch(out, "straight", 2, tiny_bert))
    return out


def test_killed_sharded_run_resumes_to_the_uninterrupted_adapter(tmp_path: Path, tiny_bert: Path,
                                                                  straight: Path) -> None:
    """2 processes killed after step 3 (checkpoint of step 2, one shard file per process) and resumed by 2: the
    uninterrupted adapter and per-step losses."""
    from lorakit.sharded_checkpoints import rank_file, read_sharded_checkpoint

    killed = _launch(tmp_path, "kill", 2, tiny_bert)
    assert killed.returncode != 0 and not (tmp_path / "adapter").exists()
    assert _latest_step(tmp_path) == 2
    folder = read_sharded_checkpoint(tmp_path).folder
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", rank_file(0, 2), rank_file(1, 2)]
    _ok(_launch(tmp_path, "resume", 2, tiny_bert))
    assert _max_diff(_adapter(straight), _adapter(tmp_path)) <= 1e-6
    assert _losses(tmp_path) == pytest.approx(_losses(straight), abs=1e-6) and len(_losses(tmp_path)) == 6


def test_kill_while_saving_keeps_the_previous_checkpoint_and_fewer_processes_resume(
        tmp_path: Path, tiny_bert: Path, straight: Path) -> None:
    """Killed after every shard of step 4 was written but before the commit: step 2's checkpoint is the one
    found; the half-committed folder is removed at the next start; 1 process resumes the 2-process checkpoint
    (the shards are joined) to the uninterrupted 2-process adapter."""
    killed = _launch(tmp_path, "kill-in-save", 2, tiny_bert)
    assert killed.returncode != 0
    staged = list((tmp_path / "sharded-checkpoint").glob(f".step-{KILL_IN_SAVE:08d}-*.tmp"))
    assert len(staged) == 1 and len(list(staged[0].glob("rank-*.safetensors"))) == 2
    assert _latest_step(tmp_path) == 2
    _ok(_launch(tmp_path, "resume", 1, tiny_bert))
    assert not staged[0].exists()
    assert _max_diff(_adapter(straight), _adapter(tmp_path)) <= 1e-6
    assert _latest_step(tmp_path) == 6


@pytest.mark.parametrize("sharding", ["fsdp", "ddp"])
def test_ctrl_c_seen_by_one_process_stops_all_at_the_same_step(tmp_path: Path, tiny_bert: Path, straight: Path,
                                                               sharding: str) -> None:
    """SIGINT to one of 2 processes after step 3: both stop after that step with a checkpoint of step 3 (a
    process that went on would wait forever in the next step's collectives, and a sharded checkpoint is a
    collective itself), and --resume ends on the uninterrupted adapter."""
    from lorakit.checkpoints import CHECKPOINT_FILE, read_checkpoint

    mode = f"train.sharding={sharding}"
    stopped = _launch(tmp_path, "ctrl-c-one", 2, tiny_bert, mode)
    assert stopped.returncode != 0 and "checkpoint saved at step 3" in stopped.stdout + stopped.stderr
    if sharding == "fsdp":
        assert _latest_step(tmp_path) == KILL_AT
    else:
        assert read_checkpoint(tmp_path / CHECKPOINT_FILE).loop["global_step"] == KILL_AT
    _ok(_launch(tmp_path, "resume", 2, tiny_bert, mode))
    assert _max_diff(_adapter(straight), _adapter(tmp_path)) <= 1e-6


def test_one_process_checkpoint_resumes_on_two(tmp_path: Path, tiny_bert: Path, straight: Path) -> None:
    """A 1-process run of the fsdp recipe writes the same format (one file of whole tensors); killed after step
    3 and resumed by 2 sharded processes (each reads only its rows), it ends on the uninterrupted adapter."""
    killed = _launch(tmp_path, "kill", 1, tiny_bert)
    assert killed.returncode != 0 and _latest_step(tmp_path) == 2
    _ok(_launch(tmp_path, "resume", 2, tiny_bert))
    assert _max_diff(_adapter(straight), _adapter(tmp_path)) <= 1e-6


def test_resume_across_sharding_modes_is_refused_with_what_to_do(tmp_path: Path, straight: Path) -> None:
    """A sharded checkpoint resumed with train.sharding=ddp (or a ddp one with fsdp): one line saying which."""
    from lorakit.checkpoints import CHECKPOINT_FILE, read_checkpoint
    from lorakit.errors import TrainingError
    from lorakit.sharded_checkpoints import read_sharded_checkpoint

    with pytest.raises(TrainingError, match=r"train\.sharding=fsdp"):
        read_checkpoint(straight / CHECKPOINT_FILE)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"")
    with pytest.raises(TrainingError, match=r"train\.sharding=ddp"):
        read_sharded_checkpoint(tmp_path)


def test_sharded_checkpoint_files_are_never_unpickled(tmp_path: Path, straight: Path) -> None:
    """A manifest replaced by a pickle whose loading would create a file (what DCP's ``.metadata`` is), and a
    truncated shard: refused with an error naming the file; nothing in them runs."""
    import pickle
    import shutil

    from lorakit.errors import TrainingError
    from lorakit.sharded_checkpoints import MANIFEST_FILE, rank_file, read_sharded_checkpoint

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    shutil.copytree(straight / "sharded-checkpoint", tmp_path / "sharded-checkpoint")
    folder = read_sharded_checkpoint(tmp_path).folder
    good = (folder / MANIFEST_FILE).read_bytes()
    (folder / MANIFEST_FILE).write_bytes(pickle.dumps(Payload()))
    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(TrainingError, match="manifest.json"):
        read_sharded_checkpoint(tmp_path)
    assert not marker.exists()
    (folder / MANIFEST_FILE).write_bytes(good)
    shard = folder / rank_file(1, 2)
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(TrainingError, match=rank_file(1, 2)):
        read_sharded_checkpoint(tmp_path)
    assert not marker.exists()


def test_checkpoint_holds_only_the_trained_state_split_between_processes(straight: Path) -> None:
    """Each rank file holds its rows of the adapter, the classifier copy and their AdamW moments (the frozen base
    is read from the model's files again): no frozen tensor, every trained one split into two row ranges that
    join to the whole."""
    from lorakit.files import read_safetensors_header
    from lorakit.sharded_checkpoints import rank_file, read_sharded_checkpoint

    checkpoint = read_sharded_checkpoint(straight)
    params = checkpoint.manifest["params"]
    assert params and all("lora_" in n or "modules_to_save" in n for n in params)
    keys = [set(read_safetensors_header(checkpoint.folder / rank_file(r, 2))[0]) for r in (0, 1)]
    trained = {f"param.{n}" for n in params} | {f"optim.{n}.{k}" for n in params for k in ("exp_avg", "exp_avg_sq")}
    assert trained <= keys[0] and trained <= keys[1]  # every tensor has rows on both (none has fewer than 2 rows)
    assert {k for k in keys[0] | keys[1] if not k.startswith("rng.")} == trained | {f"optim.{n}.step" for n in params}
    for key in trained:
        pieces = sorted((p.lo, p.shape[0]) for p in checkpoint.pieces[key])
        assert pieces[0][0] == 0 and pieces[0][1] == pieces[1][0] and sum(n for _, n in pieces) == \
            checkpoint.shapes[key][0]


def test_stale_folders_of_killed_runs_are_removed_and_the_live_ones_kept(tmp_path: Path, straight: Path) -> None:
    """At the next start: a staging folder and a complete folder that latest.json does not name (a kill between
    the rename and the pointer), both of a dead process, are removed; the current checkpoint and a running
    process's staging folder are kept."""
    import shutil

    from lorakit.checkpoints import clean_stale_temp_files
    from lorakit.sharded_checkpoints import read_sharded_checkpoint

    root = tmp_path / "sharded-checkpoint"
    shutil.copytree(straight / "sharded-checkpoint", root)
    current = read_sharded_checkpoint(tmp_path).folder
    dead, live = 2**22 + 12345, os.getpid()  # above Linux's pid_max: never a running process
    orphan = root / f"step-00000004-{dead}-{'a' * 16}"
    staged = root / f".step-00000006-{dead}-{'b' * 16}.tmp"
    running = root / f".step-00000006-{live}-{'c' * 16}.tmp"
    for folder in (orphan, staged, running):
        shutil.copytree(current, folder)
    removed = clean_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted([orphan, staged])
    assert current.is_dir() and running.is_dir() and not orphan.exists() and not staged.exists()
    assert read_sharded_checkpoint(tmp_path).folder == current


def test_resume_with_another_recipe_is_refused_in_one_line(tmp_path: Path, tiny_bert: Path, straight: Path) -> None:
    """--resume of the 2-process checkpoint with another rank (other adapter shapes): exit code 2 and one line
    naming the checkpoint, never a traceback or a half-restored run."""
    import shutil

    shutil.copytree(straight / "sharded-checkpoint", tmp_path / "sharded-checkpoint")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", "sentiment-minilm", *RECIPE,
                           f"model={tiny_bert}", "lora.r=4", "-o", str(tmp_path), "--resume"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("lorakit: error")]
    assert len(error) == 1 and "sharded-checkpoint" in error[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "adapter").exists()


if __name__ == "__main__":
    if sys.argv[1] == "recipe":
        recipe_worker(Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
    else:
        worker(Path(sys.argv[1]), sys.argv[2])
