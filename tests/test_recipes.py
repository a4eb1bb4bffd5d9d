"""Recipes: the shipped files, YAML + overrides, every key and value checked before anything loads, the data
section, run naming on the user's data, the one model loader, and the recipes inside a built wheel."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml

import lorakit.data
import lorakit.models
from lorakit.errors import ConfigError
from lorakit.recipes import (RECIPES_DIR, DataOptions, check_runtime, load_recipe, load_recipe_data,
                             load_recipe_model, read_recipe_yaml, recipe_from_dict, recipe_names, recipe_path)

SINGLE = [n for n in recipe_names() if "tasks" not in yaml.safe_load(recipe_path(n).read_text())]


def test_shipped_recipes_are_package_data() -> None:
    import lorakit

    assert RECIPES_DIR == Path(lorakit.__file__).parent / "recipe_files"
    assert {"sentiment-minilm", "instruct-smollm2", "vision-mobilenet-mnist", "multitask-smollm2"} <= set(
        recipe_names())
    for name in SINGLE:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.description and recipe.data_options == DataOptions()


def test_found_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the checkout's layout plays no part
    assert load_recipe("sentiment-minilm").model == "minilm"
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text(recipe_path("sentiment-minilm").read_text())
    assert load_recipe("mine").name == "sentiment-minilm"  # ./recipes/NAME.yaml, then
    with pytest.raises(ConfigError, match=r"no recipe 'nope'.*sentiment-minilm.*lorakit recipes"):
        load_recipe("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))


BAD = {  # override -> what the one-line error says
    "lora.rr=16": r"unknown lora key\(s\) \['rr'\]; known: \['alpha', .*'r', .*\(did you mean r\?\)",
    "train.lrr=1": r"unknown train key\(s\) \['lrr'\].*did you mean lr",
    "eval.batchsize=4": r"unknown eval key\(s\) \['batchsize'\].*did you mean batch_size",
    "data.skip_rows=true": r"unknown data key\(s\) \['skip_rows'\].*skip_bad_rows",
    "colour=red": r"unknown top-level key\(s\) \['colour'\]",
    "train.batch_size=0": r"train.batch_size must be >= 1 .*fix: e.g. train.batch_size=",
    "train.batch_size=-4": r"train.batch_size must be >= 1",
    "train.batch_size=2.5": r"train.batch_size must be an integer, got 2.5",
    "train.grad_accum=0": r"train.grad_accum must be >= 1",
    "train.epochs=0": r"train.epochs must be > 0",
    "train.lr=0": r"train.lr must be > 0",
    "train.lr=fast": r"train.lr must be a number, got 'fast'",
    "train.max_steps=0": r"train.max_steps must be >= 1",
    "train.max_length=0": r"train.max_length must be >= 1",
    "train.warmup_ratio=1": r"train.warmup_ratio must be in \[0, 1\)",
    "train.model_dropout=1.5": r"train.model_dropout must be in \[0, 1\)",
    "train.progress=maybe": r"train.progress must be true or false",
    "train.device=cdua": r"unknown train.device 'cdua' \(did you mean train.device=cuda\? fix: auto, cpu, cuda",
    "train.device=gpu": r"unknown train.device 'gpu'",
    "eval.batch_size=0": r"eval.batch_size must be >= 1",
    "eval.max_new_tokens=0": r"eval.max_new_tokens must be >= 1",
    "image_size=0": r"image_size must be >= 1",
    "lora.r=0": r"lora: r must be a positive integer rank",
    "lora.dropout=2": r"lora: dropout must be in \[0, 1\)",
    "lora=3": r"lora must be a mapping",
    "train=[1]": r"train must be a mapping",
    "data.validation_fraction=1.5": r"data.validation_fraction must be in \[0, 1\)",
    "data.test_fraction=0.95": r"data.validation_fraction \+ data.test_fraction must leave rows to train on",
    "data.encoding=klingon": r"unknown data.encoding 'klingon'",
    "data.skip_bad_rows=often": r"data.skip_bad_rows must be true or false",
    "data.skip_bad_rows=true": r"rotten-tomatoes is a packaged dataset with fixed splits; data.skip_bad_rows .*"
                               r"fix: drop it, or data=YOUR_FILE",
    "method=half": r"method must be 'lora' or 'full'",
    "image_size=64": r"image_size applies to image-classification, not sequence-classification",
    "eval.generate_examples=4": r"eval.generate_examples scores generated answers of a causal LM",
    "task=ner": r"task must be one of",
}


@pytest.mark.parametrize("override", list(BAD))
def test_bad_override_is_one_line_with_the_fix(override: str) -> None:
    with pytest.raises(ConfigError, match=BAD[override]) as caught:
        load_recipe("sentiment-minilm", [override] if override.startswith("data.skip_bad_rows=t") else
                    ["data=reviews.csv", "name=sentiment-minilm", override])
    message = str(caught.value)
    assert "\n" not in message and message.startswith("recipe 'sentiment-minilm': ")


def test_settings_a_task_would_ignore_are_refused() -> None:
    with pytest.raises(ConfigError, match="train.group_by_length groups text rows .*fix: train.group_by_length=false"):
        load_recipe("vision-mobilenet-mnist", ["train.group_by_length=true"])
    assert load_recipe("vision-mobilenet-mnist", ["image_size=32"]).image_size == 32
    assert load_recipe("instruct-smollm2", ["eval.generate_examples=2"]).eval.generate_examples == 2


def test_overrides_parse_yaml_values() -> None:
    recipe = load_recipe("sentiment-minilm", ["train.lr=3e-4", "lora.r=4", "lora.target_modules=[query]",
                                              "method=full", "train.batch_size=8.0", "train.max_steps=null"])
    assert recipe.train.lr == 3e-4 and recipe.lora["r"] == 4 and recipe.method == "full"
    assert recipe.lora["target_modules"] == ["query"] and recipe.train.batch_size == 8
    assert isinstance(recipe.train.batch_size, int) and recipe.train.max_steps is None
    for bad in ("train.lr", "=3"):
        with pytest.raises(ConfigError, match="not key=value"):
            load_recipe("sentiment-minilm", [bad])


def test_cuda_where_there_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = load_recipe("sentiment-minilm", ["train.device=cuda"])  # a valid recipe...
    with pytest.raises(ConfigError, match="train.device=cuda but .*fix: train.device=cpu"):
        check_runtime(recipe)  # ...this machine cannot run
    check_runtime(load_recipe("sentiment-minilm", ["train.device=cpu"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"train.device=cuda:3 but there are 1 CUDA device\(s\)"):
        check_runtime(load_recipe("sentiment-minilm", ["train.device=cuda:3"]))
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun the process's device is its local rank's
    with pytest.raises(ConfigError, match="train.device=cuda:0 under torchrun.*fix: train.device=cuda"):
        check_runtime(load_recipe("sentiment-minilm", ["train.device=cuda:0"]))
    check_runtime(load_recipe("sentiment-minilm", ["train.device=cuda"]))


def test_data_section_path_and_options() -> None:
    both = load_recipe("sentiment-minilm", ["data.skip_bad_rows=true", "data=/tmp/reviews.csv",
                                            "data.test_fraction=0.2", "data.encoding=latin-1",
                                            "data.validation_file=/tmp/dev.csv"])
    assert both.data == "/tmp/reviews.csv"  # `data: NAME` became a section; data=PATH after an option keeps it
    assert both.data_options == DataOptions(skip_bad_rows=True, encoding="latin-1", test_fraction=0.2,
                                            validation_file="/tmp/dev.csv")
    saved = both.to_dict()
    assert saved["data"] == {"path": "/tmp/reviews.csv", "skip_bad_rows": True, "encoding": "latin-1",
                             "test_fraction": 0.2, "validation_file": "/tmp/dev.csv"}
    assert recipe_from_dict(yaml.safe_load(yaml.safe_dump(saved))) == both  # recipe.yaml reads back the same
    assert load_recipe("sentiment-minilm").to_dict()["data"] == "rotten-tomatoes"  # defaults: a plain path
    with pytest.raises(ConfigError, match="data needs a path"):
        recipe_from_dict({**saved, "data": {"skip_bad_rows": True}})


def test_run_on_user_data_is_named_after_it(tmp_path: Path) -> None:
    shipped = load_recipe("sentiment-minilm")
    assert "Rotten Tomatoes" in shipped.description
    mine = load_recipe("sentiment-minilm", [f"data={tmp_path}/my reviews.csv"])
    assert mine.name == "sentiment-minilm-on-my-reviews"
    assert "Rotten Tomatoes" not in mine.description
    assert f"on {tmp_path}/my reviews.csv" in mine.description and "recipe sentiment-minilm" in mine.description
    named = load_recipe("sentiment-minilm", ["data.path=/x/a.csv", "name=mine", "description=my words"])
    assert (named.name, named.description) == ("mine", "my words")
    again = load_recipe("sentiment-minilm", ["data=rotten-tomatoes"])  # the recipe's own data: unchanged
    assert (again.name, again.description) == (shipped.name, shipped.description)
    copy = tmp_path / "copy.yaml"  # `lorakit recipes copy`, then only the data edited in the file
    copy.write_text(recipe_path("sentiment-minilm").read_text().replace("data: rotten-tomatoes", "data: mine.csv"))
    edited = load_recipe(str(copy))
    assert edited.name == "sentiment-minilm-on-mine" and "Rotten Tomatoes" not in edited.description
    copy.write_text(copy.read_text().replace("name: sentiment-minilm", "name: my-reviews"))
    renamed = load_recipe(str(copy))
    assert renamed.name == "my-reviews" and "Rotten Tomatoes" not in renamed.description  # own name kept
    copy.write_text(copy.read_text().replace(f"description: {shipped.description}", "description: mine"))
    assert (load_recipe(str(copy)).name, load_recipe(str(copy)).description) == ("my-reviews", "mine")


def test_data_options_reach_the_loader_or_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def loader(name_or_path, seed=0, skip_bad_rows=False, *, test_fraction=0.1):
        seen.update(name=name_or_path, seed=seed, skip_bad_rows=skip_bad_rows, test_fraction=test_fraction)
        return "splits"

    monkeypatch.setattr(lorakit.data, "load_dataset", loader)
    monkeypatch.chdir(Path(__file__).parent)  # a file that exists
    recipe = load_recipe("sentiment-minilm", ["data=conftest.py", "data.skip_bad_rows=true",
                                              "data.test_fraction=0.2", "train.seed=3"])
    assert load_recipe_data(recipe) == "splits"
    assert seen == {"name": "conftest.py", "seed": 3, "skip_bad_rows": True, "test_fraction": 0.2}
    refused = load_recipe("sentiment-minilm", ["data=conftest.py", "data.encoding=latin-1"])  # this one takes none
    with pytest.raises(ConfigError, match="data.encoding is not supported .*fix: drop data.encoding"):
        check_runtime(refused)
    with pytest.raises(ConfigError, match="data.encoding is not supported"):
        load_recipe_data(refused)


def test_the_real_loader_takes_every_data_option() -> None:
    """The names agreed with `lorakit.data.load_dataset`."""
    accepted = inspect.signature(lorakit.data.load_dataset).parameters
    assert set(DataOptions.__dataclass_fields__) <= set(accepted)


def test_load_recipe_model_sizes_the_head_from_the_data(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(lorakit.models, "load_model", lambda *a, **k: calls.append((a, k)) or _Loaded())
    recipe = load_recipe("sentiment-minilm", ["train.seed=5"])
    load_recipe_model(recipe, labels=["a", "b", "c"])
    assert calls[-1] == (("minilm",), {"task": "sequence-classification", "num_labels": 3, "seed": 5,
                                       "dtype": torch.float32, "quantize": None, "keep_full": ("classifier",)})
    load_recipe_model(recipe)  # labels read from the recipe's data: fresh/rotten
    assert calls[-1][1]["num_labels"] == 2
    load_recipe_model(load_recipe("instruct-smollm2"))  # causal LM: no head
    assert calls[-1][1]["num_labels"] is None


class _Loaded:
    model = torch.nn.Linear(1, 1)
    tokenizer = None


def test_read_recipe_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        read_recipe_yaml(bad)
    assert "\n" not in str(caught.value)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="a recipe is a YAML mapping"):
        read_recipe_yaml(bad)


# -- packaging: the recipes travel inside the wheel -----------------------------------------------------------
@pytest.mark.slow
def test_wheel_ships_the_recipes_and_trains_outside_the_checkout(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree"
    shutil.copytree(root / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, tree / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(tree)],
                   check=True, capture_output=True, cwd=tmp_path, timeout=300)
    wheel = next((tmp_path / "dist").glob("lorakit-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        scripts = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "lorakit = lorakit.cli:main" in scripts
    assert {f"lorakit/recipe_files/{n}.yaml" for n in recipe_names()} <= names
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: torch")]
    assert requires and "==" not in requires[0] and "<3" in requires[0]  # a range, never an exact pin

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**__import__("os").environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    check = ("import lorakit, lorakit.recipes as r; from pathlib import Path; "
             f"assert Path(lorakit.__file__).is_relative_to({str(site)!r}), lorakit.__file__; "
             "print(sorted(r.recipe_names())); r.load_recipe('sentiment-minilm')")
    done = subprocess.run([sys.executable, "-c", check], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(sorted(recipe_names()))
    run = [sys.executable, "-m", "lorakit.cli", "train", "train.max_train_examples=16", "train.batch_size=8",
           "train.max_steps=1", "train.max_length=16", "eval.max_examples=8", "train.progress=false",
           "--output", "run"]
    done = subprocess.run(run, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held-out accuracy" in done.stdout and (elsewhere / "run" / "adapter" / "adapter_config.json").is_file()
    assert yaml.safe_load((elsewhere / "run" / "recipe.yaml").read_text())["name"] == "sentiment-minilm"


def test_model_checked_before_loading(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    for model, message in ((tmp_path, "the folder has no config.json"),
                           (tmp_path / "weights.bin", "a model is a folder or a .gguf file"),
                           ("./no-such-folder", "no such file or folder"),
                           ("smollm2", None), ("SmolLM2-135M-Instruct", None), ("org/some-model", None)):
        recipe = load_recipe("sentiment-minilm", [f"model={model}"])
        if message is None:
            check_runtime(recipe)  # packaged (any alias, any case) or a hub id: the loader takes it from here
        else:
            with pytest.raises(ConfigError, match=message):
                check_runtime(recipe)
