"""Training: recipes and overrides, smoke runs of every recipe on small slices of the real data, exact
resume after an interruption, NaN handling, LoRA+ and full fine-tuning, and 2-process torchrun agreement."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import lorakit.train as lktrain
from lorakit import ConfigError
from lorakit.checkpoints import CHECKPOINT_FILE, read_checkpoint
from lorakit.cli import main as cli_main
from lorakit.recipes import RECIPES_DIR, load_recipe
from lorakit.train import TrainingError, train

# a tiny but real slice: MiniLM on Rotten Tomatoes, a few steps
TINY = ["train.max_train_examples=64", "train.batch_size=8", "train.max_length=32", "eval.max_examples=16",
        "train.progress=false"]


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")
                                         if "tasks" not in yaml.safe_load(p.read_text())))  # multi-task: own tests
def test_every_recipe_runs_on_a_small_slice(name: str, tmp_path: Path) -> None:
    recipe = load_recipe(name, ["train.max_steps=2", "train.batch_size=2", "train.max_length=48",
                                "train.max_train_examples=8", "eval.max_examples=4", "eval.max_new_tokens=4",
                                *(["eval.generate_examples=2"] if "smollm2" in name else []),  # causal LMs only
                                "train.progress=false"])
    metrics = train(recipe, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("task", "model", "method", "trainable_params", "total_params", "trainable_fraction", "base_eval",
                "eval", "train_time_s", "peak_memory_mb", "examples_seen", "adapter_bytes"):
        assert key in saved, key
    assert saved["steps"] == 2 and saved["examples_seen"] == 4
    assert 0 < saved["trainable_fraction"] < 0.1
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert metrics["eval"]["loss"] == pytest.approx(saved["eval"]["loss"])
    if recipe.task == "causal-lm":
        assert "chrf" in saved["eval"] and "perplexity" in saved["eval"]
    # a fresh base with the saved adapter gives the end-of-training metrics (nothing trained is left unsaved)
    from lorakit.evaluate import evaluate
    from lorakit.recipes import load_run

    run_recipe, loaded = load_run(tmp_path)
    again = evaluate(loaded.model, run_recipe.task, lktrain.load_run_data(run_recipe).test, loaded.tokenizer,
                     batch_size=run_recipe.eval.batch_size, max_length=run_recipe.train.max_length,
                     image_size=run_recipe.image_size)
    assert again["loss"] == pytest.approx(metrics["eval"]["loss"], abs=1e-5)


def _final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(folder / CHECKPOINT_FILE).trainable


def _straight_and_resumed(recipe, tmp_path: Path) -> None:
    """The recipe trained straight through into ``straight``, and into ``broken`` interrupted after step 3 and
    resumed from its last checkpoint."""
    train(recipe, tmp_path / "straight")

    def interrupt(state, loss) -> None:
        if state.global_step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(recipe, tmp_path / "broken", on_step=interrupt)
    assert read_checkpoint(tmp_path / "broken" / CHECKPOINT_FILE).loop["global_step"] == 3
    train(recipe, tmp_path / "broken", resume=True)


def test_interrupted_run_resumes_to_the_same_adapter(tmp_path: Path) -> None:
    recipe = load_recipe("sentiment-minilm", TINY + ["train.max_steps=6", "train.checkpoint_every=2",
                                                     "lora.dropout=0.2"])
    _straight_and_resumed(recipe, tmp_path)
    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "broken")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_nan_loss_stops_with_last_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    recipe = load_recipe("sentiment-minilm", TINY + ["train.max_steps=5", "train.checkpoint_every=2"])
    real = lktrain.loss_sum
    calls = {"n": 0}

    def poisoned(task, logits, labels):
        calls["n"] += 1
        total, count = real(task, logits, labels)
        return (total * float("nan") if calls["n"] == 3 else total), count

    monkeypatch.setattr(lktrain, "loss_sum", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at step 3.*last good checkpoint"):
        train(recipe, tmp_path)
    saved = read_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert saved.loop["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in saved.trainable.values())


def test_lora_plus_gives_b_a_larger_learning_rate() -> None:
    recipe = load_recipe("sentiment-minilm", ["train.lora_plus_ratio=16"])
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    from lorakit import LoraConfig, inject

    inject(model, LoraConfig(r=2, target_modules=["0"]))
    optimizer = lktrain.build_optimizer(model, recipe.train)
    lrs = sorted(group["lr"] for group in optimizer.param_groups)
    assert lrs == [recipe.train.lr, 16 * recipe.train.lr]


def test_full_fine_tuning_uses_the_same_loop(tmp_path: Path) -> None:
    metrics = train(load_recipe("sentiment-minilm", TINY + ["train.max_steps=2", "method=full"]), tmp_path)
    assert metrics["trainable_fraction"] == 1.0
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_bf16_autocast_trains_the_adapter_in_fp32(tmp_path: Path) -> None:
    """train.precision=bf16: the forward runs under bf16 autocast (CPU here, CUDA on a GPU); adapter weights,
    optimizer state and loss stay fp32, the adapter moves and the loss follows the fp32 run closely."""
    runs = {p: train(load_recipe("sentiment-minilm", TINY + ["train.max_steps=3", "lora.dropout=0.0",
                                                             "train.model_dropout=0.0", f"train.precision={p}"]),
                     tmp_path / p) for p in ("fp32", "bf16")}
    fp32, bf16 = ([h["loss"] for h in runs[p]["history"] if "loss" in h] for p in ("fp32", "bf16"))
    assert len(bf16) == 3 and all(math.isfinite(v) for v in bf16)
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05 and fp32 != bf16  # close, yet really bf16
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    with pytest.raises(ConfigError, match="train.precision must be fp32 or bf16"):
        load_recipe("sentiment-minilm", ["train.precision=fp16"])


def test_cli_train_then_eval_and_predict(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli_main(["train", *TINY, "train.max_steps=2", "--output", str(out)]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert cli_main(["eval", str(out), "--max-examples", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 8
    assert cli_main(["predict", str(out), "a wonderful film", "dull and lifeless"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("fresh", "rotten") for line in lines)
    assert cli_main(["train", "no-such-recipe"]) == 2


def test_two_processes_follow_the_single_process_loss_trajectory(tmp_path: Path) -> None:
    overrides = TINY + ["train.max_steps=4", "lora.dropout=0.0", "train.model_dropout=0.0"]
    single = train(load_recipe("sentiment-minilm", overrides), tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "lorakit.cli", "train", *overrides, "train.num_threads=1", "--output", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    multi = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert multi["world_size"] == 2
    losses_one = [h["loss"] for h in single["history"] if "loss" in h]
    losses_two = [h["loss"] for h in multi["history"] if "loss" in h]
    assert len(losses_one) == len(losses_two) == 4
    assert max(abs(a - b) for a, b in zip(losses_one, losses_two)) <= 1e-4


# -- issue 14: frozen means frozen, max_steps beyond an epoch, targets checked before the baseline -------------------
VISION_CI = ["train.max_steps=3", "train.batch_size=8", "image_size=32", "train.max_train_examples=64",
             "eval.max_examples=32", "eval.batch_size=16", "train.progress=false", "train.lr=1e-2"]


def _eval_cli(run: Path, capsys, examples: int) -> dict:
    capsys.readouterr()
    assert cli_main(["eval", str(run), "--max-examples", str(examples)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("norm_stats", [False, True])
def test_vision_run_evaluates_the_same_after_loading(tmp_path: Path, capsys, norm_stats: bool) -> None:
    """MobileNetV2 has 52 BatchNorm layers. Frozen (default): training leaves their running statistics exactly
    as the base had them; `lorakit eval` of the run folder gives the end-of-training metrics. With
    train.train_norm_stats=true they train as modules_to_save copies, are saved with the adapter and restored."""
    recipe = load_recipe("vision-mobilenet-mnist", VISION_CI + [f"train.train_norm_stats={str(norm_stats).lower()}"])
    from lorakit.recipes import load_recipe_model

    pristine = {k: v.clone() for k, v in load_recipe_model(recipe).model.state_dict().items() if "running" in k}
    seen: dict[str, torch.Tensor] = {}

    def spy(state, loss) -> None:  # the base's statistics after training steps (train mode was on)
        model = state_model["model"]
        seen.update({k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k
                     and "modules_to_save" not in k})

    state_model: dict = {}
    real_prepare = lktrain._prepare_model

    def prepare(recipe_, model, config, tokenizer):
        state_model["model"] = model
        return real_prepare(recipe_, model, config, tokenizer)

    import unittest.mock as mock

    with mock.patch.object(lktrain, "_prepare_model", prepare):
        metrics = train(recipe, tmp_path / "run", on_step=spy)
    base_keys = {k.replace(".original_module", "").replace(".base_layer", ""): v for k, v in seen.items()}
    moved = [k for k, v in base_keys.items() if not torch.equal(v, pristine[k])]
    assert not moved, f"frozen BatchNorm statistics changed: {moved[:3]}"
    evaluated = _eval_cli(tmp_path / "run", capsys, 32)
    for key in ("loss", "accuracy"):
        assert evaluated[key] == pytest.approx(metrics["eval"][key], abs=1e-6), key
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    norm_keys = [k for k in saved if k.endswith("running_mean")]
    if norm_stats:
        assert len(norm_keys) == 52
        config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
        assert len(config["modules_to_save"]) == 53  # the classifier and every BatchNorm
        trained = [k for k in norm_keys if not torch.equal(saved[k], pristine[_base_key(k)])]
        assert trained, "train_norm_stats=true: the saved statistics must be the trained ones"
        ckpt = read_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)
        assert sum(k.endswith("running_mean") for k in ckpt.buffers) == 52
    else:
        assert norm_keys == []


def _base_key(adapter_key: str) -> str:
    """``base_model.model.features.0.1.running_mean`` -> the base's ``features.0.1.running_mean``."""
    return adapter_key.removeprefix("base_model.model.")


def test_max_steps_beyond_one_epoch_cycles_the_data(tmp_path: Path) -> None:
    """30 rows in batches of 2: 15 steps per epoch; max_steps=40 runs 40 steps (2 validations at epoch ends),
    and stale temporary files of a killed run in the output folder are removed at the start."""
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".checkpoint.pt.999999999.tmp"
    stale.write_bytes(b"half a checkpoint")
    recipe = load_recipe("sentiment-minilm", ["train.max_train_examples=30", "train.batch_size=2",
                                              "train.max_length=16", "train.max_steps=40", "eval.max_examples=8",
                                              "train.progress=false", "lora.r=2"])
    metrics = train(recipe, out)
    assert metrics["steps"] == 40 and metrics["examples_seen"] == 80
    assert [h["step"] for h in metrics["history"] if "validation" in h] == [15, 30]
    assert not stale.exists()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert set(steps[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "elapsed_s"}
    assert steps[16]["epoch"] == 1 and all(r["grad_norm"] > 0 for r in steps)
    assert [r["step"] for r in log if "validation" in r] == [15, 30]
    png = (out / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_target_matching_nothing_fails_before_the_baseline_evaluation(tmp_path: Path, monkeypatch) -> None:
    def no_evaluation(*args, **kwargs):
        raise AssertionError("the baseline evaluation ran before the targets were checked")

    monkeypatch.setattr(lktrain, "evaluate", no_evaluation)
    from lorakit.errors import TargetError

    with pytest.raises(TargetError, match="nope"):
        train(load_recipe("sentiment-minilm", TINY + ["lora.target_modules=[nope]"]), tmp_path)


def test_resumed_log_keeps_the_steps_before_the_checkpoint(tmp_path: Path) -> None:
    recipe = load_recipe("sentiment-minilm", TINY + ["train.max_steps=4", "train.checkpoint_every=2"])

    def interrupt(state, loss) -> None:
        if state.global_step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(recipe, tmp_path, on_step=interrupt)
    train(recipe, tmp_path, resume=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_tensorboard_event_files_when_installed(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    train(load_recipe("sentiment-minilm", TINY + ["train.max_steps=2"]), tmp_path)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


# -- the public step and loop (what multitask, recommend's LR range test and FSDP build on) ------------------------
def test_train_step_micro_batches_groups_learning_rates_and_stopping() -> None:
    from torch import nn

    from lorakit.train import MicroBatch, NonFiniteLoss, StepSettings, run_training, train_step

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    settings = StepSettings("image-classification", max_grad_norm=None)

    def step(micro: list) -> tuple[nn.Module, object]:
        copy = nn.Linear(4, 3)
        copy.load_state_dict(model.state_dict())
        return copy, train_step(copy, micro, torch.optim.SGD(copy.parameters(), lr=0.1), None, settings)

    def mb(rows: slice, groups=None) -> MicroBatch:
        return MicroBatch({"pixel_values": x[rows], "labels": y[rows]}, groups=groups)

    whole, one = step([mb(slice(0, 8))])
    split, two = step([mb(slice(0, 3)), mb(slice(3, 8))])  # grad accumulation: the same step exactly
    expected = torch.nn.functional.cross_entropy(model(x), y).item()
    assert one.loss == pytest.approx(expected, abs=1e-6) and two.loss == pytest.approx(expected, abs=1e-6)
    assert one.terms == two.terms == 8 and one.grad_norm == pytest.approx(two.grad_norm, rel=1e-5)
    torch.testing.assert_close(whole.weight, split.weight, atol=1e-7, rtol=0)
    _, grouped = step([mb(slice(0, 8), groups=(("a", 2), ("b", 6)))])  # each group averaged over its own rows
    assert grouped.losses["a"] == pytest.approx(torch.nn.functional.cross_entropy(model(x[:2]), y[:2]).item(), abs=1e-6)
    assert grouped.loss == pytest.approx((grouped.losses["a"] + grouped.losses["b"]) / 2)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1.0)
    results = run_training(model, optimizer, None, lambda s: [mb(slice(0, 8))], 10, settings,
                           lr_at=lambda s: 1e-3 * 2 ** s, on_step=lambda s, r: s == 3)  # an LR range test's shape
    assert [r.lr for r in results] == [1e-3, 2e-3, 4e-3]
    poisoned = [MicroBatch({"pixel_values": x * float("nan"), "labels": y})]
    before = model.weight.detach().clone()
    seen = []
    run_training(model, optimizer, None, lambda s: poisoned, 2, settings, stop_on_nonfinite=False,
                 on_step=lambda s, r: seen.append(r.finite) or True)
    assert seen == [False] and torch.equal(model.weight, before)  # a non-finite step changes nothing
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 1"):
        run_training(model, optimizer, None, lambda s: poisoned, 2, settings)


def test_trained_norm_statistics_resume_exactly(tmp_path: Path) -> None:
    """train.train_norm_stats=true: the BatchNorm copies' running statistics are checkpointed and restored, so an
    interrupted run ends with the same adapter, statistics included, as an uninterrupted one."""
    recipe = load_recipe("vision-mobilenet-mnist", VISION_CI + ["train.train_norm_stats=true", "train.max_steps=4",
                                                                "train.checkpoint_every=2"])
    _straight_and_resumed(recipe, tmp_path)
    a, b = (read_checkpoint(tmp_path / run / CHECKPOINT_FILE) for run in ("straight", "broken"))
    assert sum(k.endswith("running_var") for k in a.buffers) == 52 and a.buffers.keys() == b.buffers.keys()
    for tensors_a, tensors_b in ((a.trainable, b.trainable), (a.buffers, b.buffers)):
        assert max((tensors_a[k].double() - tensors_b[k].double()).abs().max().item() for k in tensors_a) == 0.0
