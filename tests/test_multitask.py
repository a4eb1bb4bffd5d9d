"""Multi-task LoRA: recipes, shared + routed mixed batches, mixed-batch training equal to training each adapter alone,
exported plain adapters, combinations, and continual learning without forgetting for one adapter per task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit import AdapterStateError, ConfigError, LoraConfig, inject
from lorakit.cli import main as cli_main
from lorakit.multitask import (add_task_adapters, export_task, load_base, load_multitask_recipe, load_tasks,
                               train_mixed, train_one_after_another)

from conftest import randomize_lora

# real model and data, small: 32x32 images, 4 rows per task and step, 16 test rows in batches of 8 (the size of a
# mixed batch: conv kernels are prepared once per shape)
VISION = ["image_size=32", "train.batch_size=4", "train.max_steps=1", "eval.max_examples=16", "eval.batch_size=8",
          "train.progress=false", "tasks.1.max_train_examples=400"]


def _vision(overrides: list[str] = ()) -> list[str]:
    return [*VISION, *overrides]


def test_recipes_load_and_bad_ones_are_refused() -> None:
    for name in ("multitask-mobilenet", "multitask-smollm2"):
        recipe = load_multitask_recipe(name)
        assert len(recipe.tasks) >= 2 and recipe.design == "per-task"
    recipe = load_multitask_recipe("multitask-mobilenet", ["design=shared", "train.lr=1e-3"])
    assert recipe.design == "shared" and recipe.train.lr == 1e-3
    assert recipe.shared_config().modules_to_save is None  # the shared part has no head of its own
    bad = {
        "tasks=[{name: a, data: mnist-5k}, {name: a, data: fashion-mnist}]": "task names must be unique",
        "tasks=[{name: shared, data: mnist-5k}]": "task names must be unique",
        "design=mixture": "design must be one of",
        "continual.strategies=[full, ewc]": "continual.strategies must be a list",
        "combine.methods=[ties]": "combine.methods must be a list",
        "lora.bias=all": "lora.bias must be 'none'",
        "data=mnist-5k": "lists its datasets under tasks",
        "tasks=[{name: a, data: mnist-5k, lr: 1}]": "unknown tasks\\[0\\] key",
        "tasks.5.name=x": "no entry 5",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_multitask_recipe("multitask-mobilenet", [override])
    with pytest.raises(ConfigError, match="takes no modules_to_save"):
        load_multitask_recipe("multitask-mobilenet", ["design=shared", "shared_lora.modules_to_save=[classifier]"])


def test_route_with_shared_adapter_equals_both_active_per_row_with_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    inject(model, LoraConfig(r=2, target_modules=["0", "2"]), adapter_name="shared")
    lorakit.add_adapter(model, "a", LoraConfig(r=2, target_modules=["0", "2"]))
    lorakit.add_adapter(model, "b", LoraConfig(r=3, target_modules=["0"], use_dora=True))
    randomize_lora(model, std=0.3)
    lorakit.set_adapter(model, ["shared", "a", "b"])
    x = torch.randn(4, 8)
    names = ["a", "b", None, "a"]
    with lorakit.route(model, names, shared=["shared"]):
        mixed = model(x)
    mixed.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for i, name in enumerate(names):
        lorakit.set_adapter(model, ["shared"] if name is None else ["shared", name])
        alone = model(x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-6, rtol=0)
        alone.pow(2).sum().backward()
    lorakit.set_adapter(model, ["shared", "a", "b"])
    for name, grad in grads.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(AdapterStateError, match="both shared and per-row"):
        with lorakit.route(model, ["a"] * 4, shared=["a"]):
            pass


def _tiny_llama(seed: int = 0) -> tuple[nn.Module, object]:
    """A 2-layer Llama with SmolLM2's tokenizer and vocabulary, float64 (see the test below)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from lorakit.models import PACKAGED_MODELS

    folder = PACKAGED_MODELS["smollm2"].folder()
    config = AutoConfig.from_pretrained(folder)
    config.update({"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 8})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).double().eval(), AutoTokenizer.from_pretrained(folder)


def test_mixed_batch_training_equals_training_each_adapter_alone() -> None:
    """Causal LM, rows of different lengths padded together, one task with a longer max_length, grad_accum 2.
    float64: in float32 the two runs round differently (other matmul shapes) and AdamW's division by sqrt(v)
    magnifies rounding where a gradient is near zero, so equality to 1e-5 is a float64 statement; MobileNet in
    float32 is checked through the CLI below."""
    recipe = load_multitask_recipe("multitask-smollm2", [
        "train.batch_size=1", "train.grad_accum=2", "train.max_length=32", "train.lr=1e-2", "train.progress=false",
        "tasks=[{name: instruct, data: faq-en}, {name: translate, data: faq-en-sv},"
        " {name: code, data: humaneval, max_length: 48}]"])
    tasks = load_tasks(recipe)
    model, tokenizer = _tiny_llama()
    names = add_task_adapters(model, recipe)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    steps = 2
    history = train_mixed(model, tasks, steps, tokenizer)
    assert [sorted(h["loss"]) for h in history] == [sorted(names)] * steps
    mixed = {n: p.detach().clone() for n, p in model.named_parameters() if n in initial}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in initial:
                p.copy_(initial[n])
    train_one_after_another(model, tasks, steps, tokenizer)
    params = dict(model.named_parameters())
    assert max(float((params[n].detach() - v).abs().max()) for n, v in mixed.items()) <= 1e-5
    for name in names:  # every adapter trained: its tensors moved by about lr
        moved = max(float((params[n].detach() - initial[n]).abs().max()) for n in initial if f".{name}." in n)
        assert moved > 1e-3, name


def test_exported_task_adapter_equals_shared_plus_task(tiny, tiny_ids) -> None:
    inject(tiny, LoraConfig(r=2, target_modules=["q", "v", "conv"]), adapter_name="shared")
    lorakit.add_adapter(tiny, "task", LoraConfig(r=3, alpha=6, target_modules=["q", "embed"],
                                                 modules_to_save=["head"]))
    randomize_lora(tiny, std=0.2)
    with torch.no_grad():
        tiny.head.modules_to_save["task"].weight.add_(0.5)  # a trained head of the task's own
    lorakit.set_adapter(tiny, ["shared", "task"])
    expected = tiny(tiny_ids)
    export_task(tiny, "task", "plain", shared="shared")
    assert lorakit.get_config(tiny, "plain").modules_to_save == ["head"]
    lorakit.set_adapter(tiny, "plain")
    torch.testing.assert_close(tiny(tiny_ids), expected, atol=1e-6, rtol=0)
    assert tiny.layers[0]["q"].r["plain"] == 5 and tiny.conv.r["plain"] == 2


def test_multitask_cli_per_task_with_benchmark_and_combinations(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # --benchmark trains the same steps in mixed batches and one adapter after another: real MobileNet, float32
    assert cli_main(["multitask", "multitask-mobilenet", *_vision(["combine.weights=[1.0]", "train.grad_accum=2",
                                                                   "train.lr=1e-2"]),
                     "--benchmark", "2", "--benchmark-repeats", "1", "-o", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["benchmark"]["max_abs_diff"] <= 1e-5 < metrics["benchmark"]["max_abs_change"]
    assert {r["method"] for r in metrics["combinations"]} == {"linear", "cat", "svd"}
    assert {r["rank"] for r in metrics["combinations"] if r["method"] == "cat"} == {16}
    for task in ("digits", "clothes"):
        assert set(metrics["combinations"][0]["eval"][task]) >= {"accuracy", "loss"}
        config = json.loads((out / "adapters" / task / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["classifier"]
    assert (out / "report.md").read_text().count(".png") >= 2 and (out / "multitask-eval.png").is_file()


def test_shared_design_exports_each_task_as_one_plain_lora(tmp_path: Path) -> None:
    out = tmp_path / "shared"
    assert cli_main(["multitask", "multitask-mobilenet", *_vision(["design=shared", "lora.r=4", "train.lr=1e-2"]),
                     "-o", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    recipe = load_multitask_recipe(str(out / "recipe.yaml"))
    tasks = load_tasks(recipe)
    for task in tasks:
        exported = json.loads((out / "adapters" / task.name / "adapter_config.json").read_text())
        assert exported["r"] == 12 and exported["modules_to_save"] == ["classifier"]  # 8 shared + 4 task
        assert metrics["export_eval"][task.name]["loss"] == pytest.approx(metrics["eval"][task.name]["loss"],
                                                                          abs=1e-5)
        # a fresh base: shared + task parts active together == the exported plain LoRA alone
        parts = load_base(recipe, tasks).model
        lorakit.load_adapter(parts, out / "parts" / "shared", adapter_name="shared")
        lorakit.load_adapter(parts, out / "parts" / task.name, adapter_name="task")
        lorakit.set_adapter(parts, ["shared", "task"])
        plain = load_base(recipe, tasks).model
        lorakit.load_adapter(plain, out / "adapters" / task.name)
        images = torch.rand(3, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(plain.eval()(images), parts.eval()(images), atol=1e-5, rtol=0)


def test_continual_one_adapter_per_task_forgets_nothing(tmp_path: Path) -> None:
    out = tmp_path / "continual"
    assert cli_main(["continual", "multitask-mobilenet", *_vision(["train.lr=1e-2", "continual.full_lr=1e-2",
                                                                   "continual.strategies=[full, per-task]"]),
                     "-o", str(out)]) == 0
    results = json.loads((out / "metrics.json").read_text())
    assert list(results["strategies"]) == ["full", "per-task"]
    per_task = results["strategies"]["per-task"]["matrix"]
    n = len(per_task) - 1
    for j in range(n):  # task j's metrics after every later stage equal those right after its own stage
        for i in range(j + 1, n + 1):
            assert per_task[i][j] == per_task[j + 1][j]
    assert results["strategies"]["per-task"]["summary"]["forgetting"] == [0.0] * n
    matrix = results["strategies"]["full"]["matrix"]  # shared weights: training task 2 changes task 1's numbers
    assert matrix[n][0]["loss"] != matrix[1][0]["loss"]
    report = (out / "report.md").read_text()
    assert "one adapter per task" in report and (out / "forgetting-per-task.png").is_file()


def test_multitask_honours_bf16_and_group_by_length_and_refuses_single_run_settings() -> None:
    """Settings `lorakit train` honours mean the same here (through its step and data order) or are refused."""
    common = ["train.batch_size=2", "train.max_length=32", "train.lr=1e-2", "train.progress=false",
              "lora.dropout=0.0", "tasks=[{name: instruct, data: faq-en}, {name: translate, data: faq-en-sv}]"]
    losses = {}
    for precision in ("fp32", "bf16"):
        recipe = load_multitask_recipe("multitask-smollm2", [*common, f"train.precision={precision}"])
        tasks = load_tasks(recipe)
        model, tokenizer = _tiny_llama()
        model.float()
        add_task_adapters(model, recipe)
        losses[precision] = [v for h in train_mixed(model, tasks, 2, tokenizer) for v in h["loss"].values()]
    assert losses["fp32"] != losses["bf16"]  # the forward really ran under bf16 autocast
    assert max(abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"])) < 0.1

    grouped = load_multitask_recipe("multitask-smollm2", [*common, "train.group_by_length=true"])
    tasks = load_tasks(grouped)
    _, tokenizer = _tiny_llama()
    order = tasks[0].order(tokenizer)
    assert order.lengths is not None
    first = torch.cat([order.micro_batches(step)[0] for step in range(10)])  # one chunk: longest rows first
    assert order.lengths[first].tolist() == sorted(order.lengths[first].tolist(), reverse=True)
    plain = load_tasks(load_multitask_recipe("multitask-smollm2", common))[0].order(tokenizer)
    assert plain.lengths is None

    refused = {"train.checkpoint_every=5": "belong to a single",
               "train.early_stopping_patience=1": "belong to a single",
               "train.train_norm_stats=true": "not supported by multi-task"}
    for override, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            load_multitask_recipe("multitask-smollm2", [override])


def test_adapters_train_in_fp32_on_a_bf16_stored_base(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                      tmp_path: Path) -> None:
    """``train.dtype=bf16`` stores the frozen base in bf16; the task adapters (and AdamW's state) stay fp32, as in
    `lorakit train`. Continual full fine-tuning would train the bf16 weights themselves: refused before loading."""
    import lorakit.multitask.data as data

    recipe = load_multitask_recipe("multitask-smollm2", [
        "train.dtype=bf16", "tasks=[{name: instruct, data: faq-en}, {name: translate, data: faq-en-sv}]"])
    model, _ = _tiny_llama()
    model.to(torch.bfloat16)
    add_task_adapters(model, recipe)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(trained) == 2 * 2 * 7 * 2 and {p.dtype for p in trained} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was read before the refusal")

    monkeypatch.setattr(data, "load_tasks", no_loading)
    assert cli_main(["continual", "multitask-smollm2", "train.dtype=bf16", "-o", str(tmp_path / "out")]) == 2
    assert "continual.strategies=[lora, per-task]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
