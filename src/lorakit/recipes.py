"""Recipes: what to train, read from YAML into dataclasses, with ``key=value`` overrides.

A recipe names a task (`lorakit.tasks`), a model, a dataset and the settings of the adapter (``lora``), of
training (`TrainArgs`) and of evaluation (`EvalArgs`). The recipes lorakit ships live in the package
(``lorakit/recipe_files/NAME.yaml``, found through `importlib.resources`, so an installed wheel has them);
a user's recipe is any YAML file. ``key=value`` overrides use dotted paths (``train.lr=1e-3``, ``lora.r=16``,
``method=full``) with values parsed as YAML.

Everything is checked here, before a model or a dataset is read: unknown keys in every section (the known
ones listed), types, positive sizes, devices, CUDA where there is none. `load_recipe_model` is the one place
that loads a recipe's model (with the number of labels of its dataset); `load_run` rebuilds a trained run.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .config import LoraConfig
from .errors import ConfigError
from .tasks import TASKS, peft_task_type

#: the recipes shipped with lorakit (package data)
RECIPES_DIR = Path(str(importlib.resources.files("lorakit") / "recipe_files"))
DEFAULT_RECIPE = "sentiment-minilm"


@dataclass
class TrainArgs:
    """How to train. ``epochs`` may be fractional; ``max_steps`` (optimizer steps), when set, wins over it (the
    data is cycled as often as needed, `lorakit.batching.run_steps`)."""

    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16  # global rows per micro-batch, split over processes
    grad_accum: int = 1
    lr: float = 5e-4
    lora_plus_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): lr of B = ratio x lr; 1 = off
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    seed: int = 0
    max_length: int = 128
    group_by_length: bool = False  # batch rows of similar length together (less padding, same epoch content)
    max_train_examples: int | None = None
    early_stopping_patience: int | None = None
    checkpoint_every: int = 0  # optimizer steps; 0: only at the end (and on Ctrl-C)
    gradient_checkpointing: bool = False
    model_dropout: float | None = None  # set every dropout of the base model to this (None: keep the model's)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int | None = None
    progress: bool = True
    precision: str = "fp32"  # fp32 | bf16: bf16 autocast of the training forward (weights, optimizer, loss fp32)
    dtype: str = "fp32"  # fp32 | bf16 | fp16: storage of the frozen base (adapters, heads, AdamW state stay fp32)
    sharding: str = "ddp"  # ddp | fsdp under torchrun: FSDP2 shards the base and adapters per block (H7)
    fsdp_blocks: list | None = None  # module class names sharded as units (default: the model's _no_split_modules)
    fsdp_cpu_offload: bool = False  # fsdp on a GPU: shards live in CPU memory, copied to the GPU per block
    # LoRA: train the base's normalisation layers with running statistics (BatchNorm...) as modules_to_save
    # copies, saved with the adapter; default: they stay frozen and run with their running statistics
    train_norm_stats: bool = False


@dataclass
class EvalArgs:
    """How to evaluate held-out rows."""

    batch_size: int = 32
    max_examples: int | None = None  # cap on validation/test rows (speed)
    generate_examples: int = 0  # causal LM: greedy answers scored with chrF / exact match
    max_new_tokens: int = 64


@dataclass
class DataOptions:
    """How to read the user's dataset: the keyword arguments of `lorakit.data.load_dataset` besides the path and
    the seed (packaged datasets have fixed splits and take none). In YAML they sit beside the path:
    ``data: {path: my.csv, skip_bad_rows: true}`` (``data: my.csv`` alone keeps the defaults); on the command
    line ``data=my.csv data.skip_bad_rows=true data.test_file=held_out.csv``."""

    skip_bad_rows: bool = False  # drop malformed rows (counted, logged) instead of stopping at the first
    encoding: str = "utf-8"  # text encoding of CSV/JSONL files
    validation_fraction: float = 0.1  # held-out shares of a dataset that comes as one file (train: the rest)
    test_fraction: float = 0.1
    validation_file: str | None = None  # the user's own held-out files (``data`` is then the training file)
    test_file: str | None = None

    def loader_kwargs(self) -> dict[str, Any]:
        """The options that differ from the defaults, as `lorakit.data.load_dataset` keyword arguments."""
        default = DataOptions()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


@dataclass
class Recipe:
    """One training run: task, model, data and the settings of each part."""

    name: str
    task: str  # a key of `lorakit.tasks.TASKS`
    model: str
    data: str  # a packaged dataset's name or the user's file/folder; how it is read: ``data_options``
    method: str = "lora"  # lora | full
    lora: dict[str, Any] = field(default_factory=dict)  # `LoraConfig` keyword arguments
    train: TrainArgs = field(default_factory=TrainArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    image_size: int | None = None
    quantize: str | None = None  # int8 | nf4: frozen quantized base under the adapters (QLoRA-style)
    description: str = ""
    data_options: DataOptions = field(default_factory=DataOptions)  # YAML: beside the path under ``data``

    def lora_config(self, base_model_name: str | None = None) -> LoraConfig:
        """The adapter's `LoraConfig`, with PEFT's ``task_type`` of the recipe's task."""
        return LoraConfig(**{**self.lora, "task_type": peft_task_type(self.task),
                             "base_model_name_or_path": base_model_name})

    def with_absolute_paths(self) -> "Recipe":
        """This recipe with the user's own relative file paths (model folder or ``.gguf``, data file and held-out
        files) made absolute, as a run folder's ``recipe.yaml`` keeps them: ``lorakit eval RUN`` then reads the
        same files from any directory. Packaged names and hub ids are left as they are (a packaged name wins
        over a same-named local folder when loading, so it must not become a path here)."""
        from .data import DATASETS
        from .models import PACKAGED_MODELS

        def absolute(value: str | None, packaged: Any) -> str | None:
            if value is None or value.lower() in packaged or not Path(value).expanduser().exists():
                return value
            return str(Path(value).expanduser().resolve())

        options = dataclasses.replace(
            self.data_options, validation_file=absolute(self.data_options.validation_file, ()),
            test_file=absolute(self.data_options.test_file, ()))
        return dataclasses.replace(
            self, model=absolute(self.model, {k.lower() for k in PACKAGED_MODELS}),
            data=absolute(self.data, {k.lower() for k in DATASETS}), data_options=options)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as its YAML mapping (`recipe_from_dict` reads it back): ``data`` is the path alone, or a
        mapping with the path and the options that differ from the defaults."""
        out = dataclasses.asdict(self)
        options = out.pop("data_options")
        changed = self.data_options.loader_kwargs()
        if changed:
            out["data"] = {"path": self.data, **{k: options[k] for k in changed}}
        return out


# -- finding and reading recipes ---------------------------------------------------------------------------
def recipe_names() -> list[str]:
    """Names of the recipes shipped with lorakit."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    """The YAML file of a recipe: a ``.yaml``/``.yml`` path, a shipped recipe's name, or ``./recipes/NAME.yaml``."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if path.is_file():
            return path
        raise ConfigError(f"recipe file {path} does not exist (fix: a YAML file, or one of {recipe_names()})")
    for folder in (RECIPES_DIR, Path.cwd() / "recipes"):
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no recipe {name_or_path!r} (fix: a YAML file or one of {recipe_names()}; "
                      "`lorakit recipes` lists them)")


def load_recipe(name_or_path: str = DEFAULT_RECIPE, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe and apply ``key=value`` overrides (values parsed as YAML: ``3``, ``1e-3``, ``[q, v]``).

    A recipe whose dataset was replaced — by an override (``data=my.csv``), or in a copy of a shipped recipe
    (`lorakit recipes copy`) — is renamed after it unless its name and description were changed too: the run
    folder, the saved recipe and the adapter's provenance then say what it was trained on, not the shipped
    recipe's dataset."""
    path = recipe_path(name_or_path)
    data = read_recipe_yaml(path, overrides)
    reference = read_recipe_yaml(path) if path.parent == RECIPES_DIR else _copied_from(path, data)
    if _data_path(data.get("data")) != _data_path(reference.get("data")):
        data = rename_for_data(data, str(reference.get("name", path.stem)),
                               name_given=data.get("name") != reference.get("name"),
                               description_given=data.get("description") != reference.get("description"))
    return recipe_from_dict(data, source=recipe_source(path))


def _copied_from(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """What a user's recipe file's name and description were written for: the shipped recipe it is a copy of
    when it kept that recipe's name or description, else the file itself."""
    for shipped in sorted(RECIPES_DIR.glob("*.yaml")):
        original = read_recipe_yaml(shipped)
        if any(original.get(key) and original.get(key) == data.get(key) for key in ("name", "description")):
            return original
    return read_recipe_yaml(path)


def recipe_source(path: Path) -> str:
    """How errors name a recipe file: ``recipe 'NAME'`` for a shipped one, else its path."""
    return f"recipe {path.stem!r}" if path.parent == RECIPES_DIR else str(path)


def _data_path(data: Any) -> Any:
    return data.get("path") if isinstance(data, dict) else data


def rename_for_data(data: dict[str, Any], base: str, name_given: bool = False, description_given: bool = False
                    ) -> dict[str, Any]:
    """A recipe mapping whose dataset was replaced, named after the new dataset: ``BASE-on-STEM`` and a
    description naming the dataset and the recipe ``base`` it started from."""
    path = _data_path(data.get("data"))
    if not isinstance(path, str) or not path:
        return data
    stem = re.sub(r"[^\w.-]+", "-", Path(path).stem).strip("-.") or "data"
    out = dict(data)
    if not name_given:
        out["name"] = f"{base}-on-{stem}"
    if not description_given:
        method = out.get("method", "lora")
        out["description"] = (f"{out.get('task', '?')} on {path} ({method}, model {out.get('model', '?')}), "
                              f"settings from recipe {base}")
    return out


def read_recipe_yaml(path: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A recipe file's YAML with ``key=value`` overrides applied: dotted keys walk sections, a number indexes a
    list (``tasks.1.max_train_examples=400``), values are parsed as YAML (``3``, ``1e-3``, ``[q, v]``)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the recipe ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping (name: ..., task: ..., ...), got {type(data).__name__}")
    return apply_overrides(data, overrides)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a recipe mapping in place (and return it). ``data`` is a path or a
    section: ``data=my.csv`` replaces the path and keeps the options, ``data.skip_bad_rows=true`` adds one."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-3)")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML (fix: quote it)") from None
        *parents, leaf = key.split(".")
        if parents[:1] == ["data"] and isinstance(data.get("data"), str):
            data["data"] = {"path": data["data"]}
        if key == "data" and isinstance(data.get("data"), dict) and not isinstance(parsed, dict):
            parents, leaf = ["data"], "path"
        node: Any = data
        for part in parents:
            node = node[_list_index(node, part, item)] if isinstance(node, list) else node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        if isinstance(node, list):
            node[_list_index(node, leaf, item)] = parsed
        else:
            node[leaf] = parsed
    return data


def _list_index(node: list, part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {item!r}: the list has no entry {part}")
    return int(part)


# -- building and checking -----------------------------------------------------------------------------------
def build_section(cls: type, values: Any, where: str, source: str) -> Any:
    """Dataclass ``cls`` from a recipe section: unknown keys refused with the known ones listed, values checked
    against and coerced to the fields' types (`coerce`)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{source}: unknown {where} key(s) {sorted(map(str, unknown))}; "
                          f"known: {sorted(fields)}{_did_you_mean(unknown, fields)}")
    return cls(**{k: coerce(f"{where}.{k}", fields[k], v, source) for k, v in values.items()})


#: the sections whose keys a user may give at the top level by mistake (``skip_bad_rows=true``, ``lr=1e-3``)
_SECTIONS: dict[str, Any] = {"data": DataOptions, "train": TrainArgs, "eval": EvalArgs, "lora": LoraConfig}


def _in_a_section(unknown: Any) -> str:
    """`` (fix: data.skip_bad_rows)`` when an unknown top-level key belongs to a section."""
    found = [f"{section}.{key}" for key in sorted(map(str, unknown)) for section, cls in _SECTIONS.items()
             if key in {f.name for f in dataclasses.fields(cls)} - {"task_type", "base_model_name_or_path"}]
    return f" (fix: {', '.join(found)}: it belongs to a section)" if found else ""


def _did_you_mean(unknown: Any, known: Any) -> str:
    guesses = [g for key in sorted(map(str, unknown)) for g in difflib.get_close_matches(key, list(known), 1)]
    return f" (did you mean {', '.join(guesses)}?)" if guesses else ""


def coerce(key: str, spec: dataclasses.Field, value: Any, source: str) -> Any:
    """``value`` checked against the field's annotation (``int``, ``float | None``, ``bool``, ``str``, ``list``):
    numbers written as strings are converted (YAML reads ``1e-3`` as a string; 1.1 wants ``1.0e-3``), anything
    else of the wrong type is refused. Annotations of other kinds pass the value through."""
    kind = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", "")
    options = [part.strip() for part in kind.split("|")]
    base = options[0].split("[")[0]
    if value is None:
        if "None" in options or base not in ("int", "float", "bool", "str", "list"):
            return value
        raise ConfigError(f"{source}: {key} needs a value (a {base}), got null (fix: {key}=VALUE)")
    if base in ("int", "float"):
        return _number(key, base, value, source)
    if base == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r} (fix: {key}=true)")
    if base == "str":
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{source}: {key} must be a single value, got {value!r}")
        return value if isinstance(value, str) else str(value)
    if base == "list" and not isinstance(value, list):
        raise ConfigError(f"{source}: {key} must be a list, e.g. [a, b], got {value!r}")
    return value


def _number(key: str, kind: str, value: Any, source: str) -> int | float:
    """An int or float field's value; integral floats are accepted for ints (``batch_size=3.0``)."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise ConfigError(f"{source}: {key} must be a{'n integer' if kind == 'int' else ' number'}, got {value!r} "
                          f"(fix: e.g. {key}={'8' if kind == 'int' else '1.0e-3'})")
    if kind == "float":
        return float(number)
    if isinstance(number, float) and not number.is_integer():
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r} (fix: e.g. {key}={int(number)})")
    return int(number)


#: recipe value -> (lowest allowed, whether the lowest is allowed, what it means), checked when not None
_RANGES: dict[str, tuple[float, bool, str]] = {
    "train.epochs": (0, False, "passes over the data"), "train.max_steps": (1, True, "optimizer steps"),
    "train.batch_size": (1, True, "rows per micro-batch"), "train.grad_accum": (1, True, "micro-batches per step"),
    "train.lr": (0, False, "learning rate"), "train.lora_plus_ratio": (0, False, "LoRA+ ratio"),
    "train.weight_decay": (0, True, "AdamW decay"), "train.warmup_ratio": (0, True, "warmup share of the steps"),
    "train.max_grad_norm": (0, False, "clip norm (null: no clipping)"), "train.seed": (0, True, "seed"),
    "train.max_length": (1, True, "tokens per row"), "train.max_train_examples": (1, True, "training rows"),
    "train.early_stopping_patience": (0, True, "epochs without gain"),
    "train.checkpoint_every": (0, True, "steps between checkpoints (0: at the end)"),
    "train.model_dropout": (0, True, "dropout probability"), "train.num_threads": (1, True, "CPU threads"),
    "eval.batch_size": (1, True, "rows per batch"), "eval.max_examples": (1, True, "held-out rows"),
    "eval.generate_examples": (0, True, "answers generated"), "eval.max_new_tokens": (1, True, "tokens per answer"),
    "image_size": (1, True, "pixels"),
}
#: values below 1 (probabilities, shares)
_BELOW_ONE = ("train.warmup_ratio", "train.model_dropout")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _value(recipe: Recipe, key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


def check_values(recipe: Recipe, source: str) -> None:
    """Sizes positive, shares and probabilities in range, the device one lorakit can use (`ConfigError`)."""
    for key, (low, inclusive, meaning) in _RANGES.items():
        value = _value(recipe, key)
        if value is None:
            continue
        if value < low or (value == low and not inclusive) or (key in _BELOW_ONE and value >= 1):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            if key in _BELOW_ONE:
                bound = f"in [{low:g}, 1)"
            raise ConfigError(f"{source}: {key} must be {bound} ({meaning}), got {value!r} "
                              f"(fix: e.g. {key}={_example(key)})")
    device = recipe.train.device
    if not DEVICE.fullmatch(device):
        guess = difflib.get_close_matches(device, ["auto", "cpu", "cuda"], 1)
        hint = f"did you mean train.device={guess[0]}? " if guess else ""
        raise ConfigError(f"{source}: unknown train.device {device!r} ({hint}fix: auto, cpu, cuda or cuda:N)")
    _check_data(recipe, source)


def _check_task_settings(recipe: Recipe, source: str) -> None:
    """Settings only some tasks use are refused where the task would ignore them."""
    if recipe.image_size is not None and recipe.task != "image-classification":
        raise ConfigError(f"{source}: image_size applies to image-classification, not {recipe.task} "
                          "(fix: drop image_size)")
    if recipe.train.group_by_length and recipe.task == "image-classification":
        raise ConfigError(f"{source}: train.group_by_length groups text rows by token count; images have none "
                          "(fix: train.group_by_length=false)")
    if recipe.eval.generate_examples and recipe.task != "causal-lm":
        raise ConfigError(f"{source}: eval.generate_examples scores generated answers of a causal LM, not "
                          f"{recipe.task} (fix: eval.generate_examples=0)")


def _check_data(recipe: Recipe, source: str) -> None:
    """Data options: shares that leave rows to train on, a known encoding, none for a packaged dataset."""
    from .data import DATASETS

    options = recipe.data_options
    for key in ("validation_fraction", "test_fraction"):
        share = getattr(options, key)
        if not 0 <= share < 1:
            raise ConfigError(f"{source}: data.{key} must be in [0, 1), got {share!r} (fix: e.g. data.{key}=0.1)")
    if options.validation_fraction + options.test_fraction >= 1:
        raise ConfigError(f"{source}: data.validation_fraction + data.test_fraction must leave rows to train on, "
                          f"got {options.validation_fraction} + {options.test_fraction} (fix: e.g. 0.1 and 0.1)")
    _check_encoding(options.encoding, source)
    if recipe.data in DATASETS and options.loader_kwargs():
        raise ConfigError(f"{source}: {recipe.data} is a packaged dataset with fixed splits; data."
                          f"{next(iter(options.loader_kwargs()))} applies to your own files only (fix: drop it, "
                          "or data=YOUR_FILE)")


def _example(key: str) -> str:
    """A valid value for ``key`` to show in an error: its default when that is allowed, else the lowest allowed."""
    low, inclusive, _ = _RANGES[key]
    section, _, name = key.rpartition(".")
    cls = {"train": TrainArgs, "eval": EvalArgs}.get(section)
    default = next((f.default for f in dataclasses.fields(cls) if f.name == name), None) if cls else None
    if isinstance(default, (int, float)) and (default > low or (inclusive and default == low)):
        return f"{default:g}"
    return "224" if key == "image_size" else f"{low:g}" if inclusive else "1"


def _check_encoding(encoding: str, source: str) -> None:
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ConfigError(f"{source}: unknown data.encoding {encoding!r} (fix: e.g. utf-8, utf-8-sig, latin-1, "
                          "cp1252)") from None


def check_lora(lora: Any, source: str, where: str = "lora") -> None:
    """A recipe's ``lora`` section (or ``where``: e.g. a multi-task recipe's ``shared_lora``): `LoraConfig`'s
    keys (minus what the recipe sets itself), before `LoraConfig` checks the values."""
    if not isinstance(lora, dict):
        raise ConfigError(f"{source}: {where} must be a mapping (r: 8, target_modules: [...]), got {lora!r}")
    known = {f.name for f in dataclasses.fields(LoraConfig)} - {"task_type", "base_model_name_or_path"}
    unknown = set(lora) - known
    if unknown:
        raise ConfigError(f"{source}: unknown {where} key(s) {sorted(map(str, unknown))}; known: {sorted(known)}"
                          f"{_did_you_mean(unknown, known)}")


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """A checked `Recipe` from its mapping (a recipe file after overrides); nothing is loaded."""
    data = dict(data)
    if "tasks" in data:
        raise ConfigError(f"{source} is a multi-task recipe (fix: `lorakit multitask` or `lorakit continual` "
                          "trains it)")
    known = [f.name for f in dataclasses.fields(Recipe) if f.name != "data_options"]  # options sit under data
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(map(str, unknown))}; known: {sorted(known)}"
                          f"{_in_a_section(unknown) or _did_you_mean(unknown, known)}")
    train_args = build_section(TrainArgs, data.pop("train", None) or {}, "train", source)
    eval_args = build_section(EvalArgs, data.pop("eval", None) or {}, "eval", source)
    missing = [k for k in ("name", "task", "model", "data") if data.get(k) in (None, "", {})]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {missing}")
    if isinstance(data["data"], dict):
        options = dict(data["data"])
        data["data"] = options.pop("path", None)
        if not data["data"]:
            raise ConfigError(f"{source}: data needs a path (fix: data.path=FILE or data=FILE)")
        data["data_options"] = build_section(DataOptions, options, "data", source)
    recipe = build_section(Recipe, {**data, "train": train_args, "eval": eval_args}, "top-level", source)
    if recipe.task not in TASKS:
        raise ConfigError(f"{source}: task must be one of {list(TASKS)}, got {recipe.task!r}")
    if recipe.method not in ("lora", "full"):
        raise ConfigError(f"{source}: method must be 'lora' or 'full', got {recipe.method!r}")
    if recipe.quantize not in (None, "int8", "nf4"):
        raise ConfigError(f"{source}: quantize must be int8 or nf4, got {recipe.quantize!r}")
    if recipe.method == "full" and recipe.quantize:
        raise ConfigError(f"{source}: a quantized base is frozen; quantize needs method=lora")
    if recipe.train.precision not in ("fp32", "bf16"):
        raise ConfigError(f"{source}: train.precision must be fp32 or bf16, got {recipe.train.precision!r}")
    if recipe.train.schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"{source}: train.schedule must be cosine, linear or constant")
    _check_scale(recipe, source)
    check_values(recipe, source)
    _check_task_settings(recipe, source)
    check_lora(recipe.lora, source)
    if recipe.method == "lora":
        try:
            recipe.lora_config()  # its own checks: rank, alpha, dropout, targets syntax...
        except ConfigError as err:
            raise ConfigError(f"{source}: lora: {err}") from None
        except TypeError as err:
            raise ConfigError(f"{source}: lora: a value has the wrong type ({err})") from None
    return recipe


def check_runtime(recipe: Recipe) -> None:
    """What this machine must offer the recipe, checked before anything loads: the CUDA device it names, the
    user's data files and model path, and data options the installed dataset loader takes (`ConfigError` with
    the fix)."""
    import torch

    device = recipe.train.device
    if device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"train.device={device} under torchrun: each process takes cuda:LOCAL_RANK "
                          "(fix: train.device=cuda, and CUDA_VISIBLE_DEVICES to choose the devices)")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ConfigError(f"train.device={device} but {why} (fix: train.device=cpu, or auto to use a GPU "
                              "when there is one)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={device} but there are {torch.cuda.device_count()} CUDA device(s) "
                              f"(fix: cuda:0 ... cuda:{torch.cuda.device_count() - 1})")
    _check_loader_options(recipe.data_options)
    _check_data_files(recipe)
    _check_model(recipe)


def _check_model(recipe: Recipe) -> None:
    """The model: a packaged one that supports the task, an existing folder or ``.gguf`` file, or a hub id (the
    loader reports what a hub id lacks)."""
    from .models import PACKAGED_MODELS

    name = recipe.model
    packaged = {key.lower(): spec for key, spec in PACKAGED_MODELS.items()}.get(name.lower())
    if packaged is not None:
        if recipe.task not in packaged.tasks:
            raise ConfigError(f"model={name}: the packaged {packaged.name} supports {', '.join(packaged.tasks)}, "
                              f"not task {recipe.task} (fix: another model, or a recipe of one of those tasks)")
        return
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"model={name}: the folder has no config.json (fix: a Hugging Face model folder)")
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise ConfigError(f"model={name}: a model is a folder or a .gguf file (fix: the folder that holds it)")
    if not path.exists() and (name.startswith(("/", ".", "~")) or path.suffix.lower() == ".gguf"):
        raise ConfigError(f"model={name}: no such file or folder (fix: a path that exists, a packaged model "
                          f"({', '.join(sorted({s.name for s in PACKAGED_MODELS.values()}))}) or a hub id)")


def _check_data_files(recipe: Recipe) -> None:
    """The user's data files exist (a packaged dataset's name needs nothing)."""
    from .data import DATASETS

    options = recipe.data_options
    for key, value in (("data", recipe.data), ("data.validation_file", options.validation_file),
                       ("data.test_file", options.test_file)):
        if value is None or (key == "data" and value in DATASETS) or Path(value).expanduser().exists():
            continue
        raise ConfigError(f"{key}={value}: no such file or folder (fix: a .jsonl/.json/.csv file or a folder"
                          f"{', or a packaged dataset: ' + ', '.join(DATASETS) if key == 'data' else ''})")


def _check_loader_options(options: DataOptions) -> None:
    """Refuse data options the dataset loader does not take (never ignore one)."""
    import inspect

    from .data import load_dataset

    accepted = inspect.signature(load_dataset).parameters
    missing = [k for k in options.loader_kwargs() if k not in accepted]
    if missing:
        raise ConfigError(f"data.{missing[0]} is not supported by this lorakit's dataset loader "
                          f"(fix: drop data.{missing[0]})")


# -- loading what a recipe names -------------------------------------------------------------------------------
def load_recipe_data(recipe: Recipe) -> Any:
    """The recipe's dataset, split (`lorakit.data.Splits`), read with its ``data`` options and ``train.seed``."""
    from .data import load_dataset

    _check_loader_options(recipe.data_options)
    return load_dataset(recipe.data, seed=recipe.train.seed, **recipe.data_options.loader_kwargs())


def _check_scale(recipe: Recipe, source: str) -> None:
    """``train.dtype`` and ``train.sharding``: values, and the combinations no path can honour (issue 16)."""
    args = recipe.train
    if args.dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"{source}: train.dtype must be fp32, bf16 or fp16, got {args.dtype!r}")
    if args.dtype != "fp32" and recipe.method == "full":
        raise ConfigError(f"{source}: train.dtype={args.dtype} stores a frozen base; full fine-tuning trains every "
                          "weight (fix: train.dtype=fp32, with train.precision=bf16 for bf16 compute)")
    if args.sharding not in ("ddp", "fsdp"):
        raise ConfigError(f"{source}: train.sharding must be ddp or fsdp, got {args.sharding!r}")
    if args.fsdp_cpu_offload:
        _check_offload(args, source)
    if args.sharding != "fsdp":
        return
    if recipe.quantize:
        raise ConfigError(f"{source}: a quantized base cannot be sharded with FSDP (its weights are packed integer "
                          "buffers) (fix: train.sharding=fsdp with train.dtype=bf16, or quantize with "
                          "train.sharding=ddp)")
    if recipe.method != "lora":
        raise ConfigError(f"{source}: train.sharding=fsdp trains LoRA adapters; full fine-tuning is not sharded "
                          "(fix: method=lora, or train.sharding=ddp)")


def _check_offload(args: TrainArgs, source: str) -> None:
    """``train.fsdp_cpu_offload``: FSDP2's CPU offload of the shards, only where there is a GPU to offload from."""
    import torch

    if args.sharding != "fsdp":
        raise ConfigError(f"{source}: train.fsdp_cpu_offload offloads the shards of a sharded run (fix: "
                          "train.sharding=fsdp, or train.fsdp_cpu_offload=false)")
    if args.device == "cpu" or not torch.cuda.is_available():
        raise ConfigError(f"{source}: train.fsdp_cpu_offload moves a GPU run's weights to CPU memory; this run's "
                          "weights are in CPU memory already (fix: train.fsdp_cpu_offload=false, or run on a GPU)")


def load_recipe_model(recipe: Recipe, labels: Sequence[str] | None = None, device: Any = None) -> Any:
    """The recipe's base model (a `lorakit.models.LoadedModel`), ready for adapters: a classification head with
    one output per class of the recipe's dataset, seeded by ``train.seed``; moved to ``device``; quantized when
    the recipe says so (``quantize``; ``lora.modules_to_save`` stay full precision).

    Args:
        recipe: the recipe.
        labels: class names of the training split when the caller has already read the dataset; ``None`` reads
            them (classification tasks only).
        device: a torch device for the model (``None``: where it loads, the CPU).
    """
    from .models import load_model

    num_labels = None
    if TASKS[recipe.task].classification:
        if labels is None:
            labels = load_recipe_data(recipe).train.labels
        num_labels = len(labels) if labels else None
    from .precision import torch_dtype

    # a bf16 base is never whole in fp32, nor a quantized one whole in full precision (quantized as it is read)
    loaded = load_model(recipe.model, task=recipe.task, num_labels=num_labels, seed=recipe.train.seed,
                        dtype=torch_dtype(recipe.train.dtype), quantize=recipe.quantize,
                        keep_full=tuple(recipe.lora.get("modules_to_save") or ()))
    if device is not None:
        loaded.model.to(device)
    return loaded


def read_run_recipe(run: str | Path) -> Recipe:
    """The recipe a training output folder was trained with (its ``recipe.yaml``), checked; nothing loaded."""
    folder = Path(run)
    if not (folder / "recipe.yaml").is_file():
        raise ConfigError(f"{folder} is not a training output folder (no recipe.yaml); run `lorakit train` first")
    return recipe_from_dict(read_recipe_yaml(folder / "recipe.yaml"), source=str(folder / "recipe.yaml"))


def load_run(run: str | Path, labels: Sequence[str] | None = None) -> tuple[Recipe, Any]:
    """Rebuild a trained model from a training output folder: (recipe, LoadedModel with weights applied, eval
    mode). ``labels``: the class names of the run's training split when the caller has read its dataset
    (else `load_recipe_model` reads them)."""
    folder = Path(run)
    recipe = read_run_recipe(folder)
    loaded = load_recipe_model(recipe, labels=labels)
    if recipe.method == "lora":
        from .io import load_adapter

        load_adapter(loaded.model, folder / "adapter")
    else:
        from safetensors.torch import load_file

        state = {}
        for f in sorted((folder / "model").glob("*.safetensors")):
            state.update(load_file(f))
        loaded.model.load_state_dict(state, strict=False)
    loaded.model.eval()
    return recipe, loaded
