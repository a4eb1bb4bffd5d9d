"""The ``lorakit`` command: help and version, every bad recipe key or value refused in one line with exit code 2
before anything loads, ``lorakit recipes``, ``generate``'s sampling options, a run on the user's own data named
after it, and the CLI/library boundary."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import yaml

import lorakit
import lorakit.data
import lorakit.models
import lorakit.train
from lorakit.cli import build_parser, main
from lorakit.recipes import recipe_names, recipe_path

SRC = Path(lorakit.__file__).parent


@pytest.fixture
def nothing_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a model, a dataset or training is reached."""

    def refuse(*args, **kwargs):
        raise AssertionError("loaded something before the input was checked")

    monkeypatch.setattr(lorakit.models, "load_model", refuse)
    monkeypatch.setattr(lorakit.data, "load_dataset", refuse)
    monkeypatch.setattr(lorakit.train, "train", refuse)


def test_no_arguments_prints_help_and_starts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
                                                     nothing_loads) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lorakit") and "train" in out and "recipes" in out
    assert list(tmp_path.iterdir()) == []  # no ./runs


def test_train_help_lists_every_override_key(capsys) -> None:
    import dataclasses

    from lorakit.recipes import TrainArgs

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(f"train.{f.name}" in out for f in dataclasses.fields(TrainArgs))
    assert "data.skip_bad_rows" in out and "lora.target_modules" in out and "data_options" not in out


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"lorakit {lorakit.__version__}"


def test_every_command_is_registered() -> None:
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"train", "eval", "predict", "generate", "targets", "recipes", "serve", "merge", "export", "info",
            "compare", "sweep", "recommend", "inspect", "multitask", "continual"} <= commands


BAD_TRAIN = {  # the cases, and one per kind of check
    "lora.rr=16": "unknown lora key(s) ['rr']; known: ['alpha',",
    "train.batch_size=0": "train.batch_size must be >= 1",
    "train.device=cdua": "unknown train.device 'cdua' (did you mean train.device=cuda?",
    "train.device=cuda": "train.device=cuda but",
    "train.lr=fast": "train.lr must be a number",
    "skip_bad_rows=true": "unknown top-level key(s) ['skip_bad_rows']; known: ['data', 'description', 'eval', "
                          "'image_size', 'lora', 'method', 'model', 'name', 'quantize', 'task', 'train'] "
                          "(fix: data.skip_bad_rows: it belongs to a section)",
    "lr=1e-3": "(fix: train.lr: it belongs to a section)",
    "data.encoding=klingon": "unknown data.encoding 'klingon'",
    "eval.max_new_tokens=-1": "eval.max_new_tokens must be >= 1",
    "data=/no/such/reviews.csv": "data=/no/such/reviews.csv: no such file or folder (fix:",
    "data.path=/no/such.csv": "data=/no/such.csv: no such file or folder",
    "model=/no/such/model.gguf": "model=/no/such/model.gguf: no such file or folder (fix:",
    "model=mobilenet-v2": "model=mobilenet-v2: the packaged mobilenet-v2 supports image-classification, base, not task",
}


@pytest.mark.parametrize("override", list(BAD_TRAIN))
def test_bad_override_exits_2_with_one_line_and_loads_nothing(override: str, capsys, nothing_loads,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "CUDA where there is none", on any machine
    assert main(["train", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert BAD_TRAIN[override] in err and ("fix" in err or "known:" in err)


def test_bad_input_elsewhere_exits_2(tmp_path: Path, capsys, nothing_loads) -> None:
    assert main(["train", "no-such-recipe"]) == 2
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert main(["eval", str(tmp_path)]) == 2  # not a run folder
    run = tmp_path / "lm-run"  # a causal-LM run: predict refuses before loading its model
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe_path("instruct-smollm2").read_text())
    assert main(["predict", str(run), "hello"]) == 2
    assert "predict classifies text; run" in capsys.readouterr().err
    assert main(["generate", "hi", "--temperature", "-1"]) == 2
    assert main(["generate", "hi", "--top-p", "0"]) == 2
    assert main(["generate", "hi", "--max-new-tokens", "0"]) == 2
    assert main(["targets", "minilm", "-t", "a", "b", "--regex"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(e.startswith("lorakit: error: ") for e in errors)


def test_multitask_and_evidence_recipes_are_checked_before_loading(tmp_path: Path, capsys, nothing_loads,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = ["-o", str(tmp_path / "out")]
    cases = {("multitask", "design=shared", "shared_lora.rr=4"): "unknown shared_lora key(s) ['rr']",
             ("multitask", "lora.rr=4"): "unknown lora key(s) ['rr']",
             ("continual", "train.device=cuda"): "train.device=cuda but",
             ("multitask", "tasks.0.data=/no/such.csv"): "data=/no/such.csv: no such file or folder"}
    for (command, *overrides), message in cases.items():
        assert main([command, "multitask-mobilenet", *overrides, *out]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    for command in ("compare", "sweep", "recommend"):  # checked before any run (or subprocess) starts
        assert main([command, "sentiment-minilm", "train.device=cuda", *out]) == 2
        assert "train.device=cuda but" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_recipes_list_show_copy_validate(tmp_path: Path, capsys, nothing_loads) -> None:
    assert main(["recipes"]) == 0 and main(["recipes", "list"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in listed] == recipe_names() * 2
    assert "Rotten Tomatoes" in next(line for line in listed if line.startswith("sentiment-minilm"))
    assert main(["recipes", "show", "sentiment-minilm"]) == 0
    assert capsys.readouterr().out == recipe_path("sentiment-minilm").read_text()

    mine = tmp_path / "mine.yaml"
    assert main(["recipes", "copy", "sentiment-minilm", str(mine)]) == 0
    assert mine.read_text() == recipe_path("sentiment-minilm").read_text()
    mine.write_text(mine.read_text().replace("lr: 2.0e-3", "lr: 1.0e-3"))
    assert main(["recipes", "copy", "sentiment-minilm", str(mine)]) == 2  # never overwritten
    assert "lr: 1.0e-3" in mine.read_text()
    capsys.readouterr()

    assert main(["recipes", "validate", str(mine)]) == 0
    assert capsys.readouterr().out.startswith("ok: sentiment-minilm")
    assert main(["recipes", "validate", str(mine), "train.batch_size=0"]) == 2
    mine.write_text(mine.read_text().replace("  r: 8", "  rr: 8"))
    assert main(["recipes", "validate", str(mine)]) == 2
    assert "unknown lora key(s) ['rr']" in capsys.readouterr().err
    assert main(["recipes", "validate", "multitask-mobilenet", "design=shared"]) == 0  # its own schema
    assert capsys.readouterr().out.startswith("ok: multitask-mobilenet — shared")
    assert main(["recipes", "validate", "multitask-mobilenet", "train.lr=0"]) == 2
    assert main(["train", "multitask-smollm2"]) == 2
    assert "is a multi-task recipe (fix: `lorakit multitask`" in capsys.readouterr().err


def test_library_modules_never_import_the_cli() -> None:
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "cli" and path.parent.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [f"{'.' * node.level}{node.module or ''}"] + [f"{'.' * node.level}{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n.split(".")[-1] == "cli" or n.startswith("lorakit.cli") or ".cli." in n for n in names):
                offenders.append(str(path.relative_to(SRC)))
    assert offenders == []


def test_every_command_module_is_registered() -> None:
    from lorakit.cli import COMMAND_MODULES

    modules = {p.stem for p in (SRC / "cli").glob("*.py")} - {"__init__", "__main__"}
    assert {m.__name__.rsplit(".", 1)[-1] for m in COMMAND_MODULES} == modules
    assert all(callable(m.register) for m in COMMAND_MODULES)


@pytest.mark.slow
def test_generate_samples_like_the_server(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """temperature 0 is greedy; a seed fixes a sampled text; top_k=1 and min_p=1 are greedy whatever the seed;
    the repetition penalty changes the greedy text."""
    real, cache = lorakit.models.load_model, {}
    # one SmolLM2 for all the calls (no adapters: every call sees the same model); the CLI path is the real one
    monkeypatch.setattr(lorakit.models, "load_model", lambda *a, **k: cache.get(a) or cache.setdefault(a, real(*a, **k)))
    base = ["generate", "Name a colour.", "--max-new-tokens", "6"]
    texts = {}
    for name, extra in {"greedy": [], "s1": ["--temperature", "1.5", "--seed", "1"],
                        "s1-again": ["--temperature", "1.5", "--seed", "1"],
                        "k1": ["--temperature", "1.5", "--top-k", "1", "--seed", "2"],
                        "minp1": ["--temperature", "1.5", "--min-p", "1", "--seed", "4"],
                        "penalized": ["--repetition-penalty", "10"]}.items():
        assert main(base + extra) == 0
        texts[name] = capsys.readouterr().out
    assert texts["s1"] == texts["s1-again"]
    assert texts["k1"] == texts["minp1"] == texts["greedy"]  # one candidate left: the argmax
    assert texts["penalized"] != texts["greedy"]  # the penalty reaches the decoder
    assert main(base + ["--min-p", "1.5"]) == main(base + ["--repetition-penalty", "0"]) == 2


@pytest.mark.slow
def test_run_on_own_data_is_named_after_it(tmp_path: Path, capsys, monkeypatch) -> None:
    rows = [("a wonderful, moving film", "good"), ("dull and far too long", "bad")] * 20
    data = tmp_path / "my reviews.csv"
    data.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in rows) + "oops,\n")
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # the data given as a relative path, as users type it
    assert main(["train", f"data={data.name}", "data.skip_bad_rows=true", "train.max_steps=1", "train.batch_size=8",
                 "train.max_length=16", "train.max_train_examples=16", "train.progress=false",
                 "--output", str(out)]) == 0
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["name"] == "sentiment-minilm-on-my-reviews"
    assert saved["data"] == {"path": str(data), "skip_bad_rows": True}
    assert "Rotten Tomatoes" not in saved["description"] and data.name in saved["description"]
    provenance = lorakit.read_adapter(out / "adapter").lorakit["provenance"]
    assert provenance["recipe"]["name"] == saved["name"] and provenance["recipe"]["description"] == saved[
        "description"]
    assert json.loads((out / "metrics.json").read_text())["recipe"] == saved["name"]
    capsys.readouterr()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # recipe.yaml keeps the absolute path: eval works from anywhere
    assert main(["eval", str(out), "--max-examples", "4"]) == 0  # the saved recipe reads back, options and all
    assert json.loads(capsys.readouterr().out)["examples"] == 4
