"""transformers models holding lorakit adapters: what their adapter files record, and what their own
``save_pretrained`` / ``set_adapter`` / ``active_adapters`` do.

Files: PEFT's ``task_type`` (from the model's class, through `lorakit.tasks`) and the hub id of the base when it
is known, instead of a local cache path. PEFT's ``AutoPeftModelFor...`` classes pick the model class from
``task_type``, and ``base_model_name_or_path`` is what they download; a path that only exists on the machine that
trained the adapter helps nobody else.

Methods: transformers' ``save_pretrained`` writes an adapter folder only for models whose layers are peft's own
(``_hf_peft_config_loaded``; ``get_adapter_state_dict`` walks peft's ``BaseTunerLayer``), and peft is no dependency
of lorakit; on a lorakit model it would write every base weight under wrapper keys (``q_proj.base_layer.weight``)
that ``from_pretrained`` silently re-initialises. So while a transformers model holds lorakit adapters, the model
*object* (never its class: other models in the process are untouched) carries its own ``save_pretrained`` that
writes the adapters in PEFT's format, as ``PeftModel.save_pretrained`` does; HF ``Trainer`` and TRL save through it,
so their checkpoints and ``save_model`` hold the adapter only. ``set_adapter`` and ``active_adapters`` are
lorakit's; the rest of transformers' PEFT methods refuse, naming the lorakit call. `lorakit.adapters` attaches
them when a model gets its first adapter and removes them when it has none left (``unload``, ``delete_adapter``).
Resuming a Trainer run from such a checkpoint: `lorakit.hf_trainer`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import Tensor, nn

from .errors import AdapterStateError, ConfigError
from .tasks import TASKS

#: a Hugging Face hub cache folder: ``.../models--ORG--NAME/snapshots/REVISION``
_HUB_CACHE = re.compile(r"(?:^|/)models--([\w.-]+)--([\w.-]+)/snapshots/[0-9a-f]+/?$")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model, from its class name and the task table (a
    ``...ForSequenceClassification`` is ``SEQ_CLS``, a ``...ForCausalLM`` ``CAUSAL_LM``); None when no task
    matches (a bare encoder, a vision model: PEFT has no type for those)."""
    name = type(model).__name__
    for task in TASKS.values():
        suffix = task.auto_class.removeprefix("AutoModel")  # "ForCausalLM", ...
        if task.peft_task_type is not None and suffix and name.endswith(suffix):
            return task.peft_task_type
    return None


def _packaged_hub_id(path: Path) -> str | None:
    """The hub id of a model lorakit ships in a pip package, when ``path`` is that model's folder."""
    from .models import PACKAGED_MODELS, model_path

    text = str(path).lower()
    for spec in dict.fromkeys(PACKAGED_MODELS.values()):
        hub = next((alias for alias in spec.aliases if _HUB_ID.fullmatch(alias)), None)
        # the folder is only looked up when the path names the model (resolving SmolLM2's may convert it)
        if hub is not None and spec.name.replace("-", "") in text.replace("_", "").replace("-", ""):
            try:
                if model_path(spec.name).resolve() == path.resolve():
                    return hub
            except Exception:  # noqa: BLE001 - a missing package only means: not this one
                continue
    return None


def base_model_id(model: nn.Module) -> str | None:
    """The base model's hub id when it is known, else the name or folder it was loaded from.

    Known: a model loaded by hub id, from a hub cache folder (``models--ORG--NAME/snapshots/...``), or one of the
    models lorakit ships (its packaged folder maps to the hub id it was published under)."""
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not isinstance(source, str) or not source:
        return None
    match = _HUB_CACHE.search(source)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    path = Path(source)
    if not path.exists():
        return source  # a hub id (or a folder that is gone: nothing better is known)
    return _packaged_hub_id(path) or source


# -- transformers' own methods on a model holding lorakit adapters ---------------------------------------------
#: ``save_pretrained`` options lorakit writes as transformers does at their default value -> why another value is
#: refused (never ignored)
_SAVE_DEFAULTS: dict[str, tuple[Any, str]] = {
    "push_to_hub": (False, "the hub is not reached from here: save, then upload the folder "
                           "(huggingface_hub.upload_folder)"),
    "token": (None, "it is for pushing to the hub, which lorakit's save_pretrained does not do"),
    "variant": (None, "adapter files have no variants (PEFT writes adapter_model.safetensors)"),
    "safe_serialization": (True, "lorakit writes safetensors only: a pickle file can run code when loaded"),
    "save_peft_format": (True, "lorakit writes PEFT's keys (base_model.model....) only"),
    "save_original_format": (True, "adapter keys are always the loaded model's module names, as PEFT writes them"),
    "distributed_checkpoint": (False, "gather a sharded adapter with lorakit.sharding and save it with "
                                      "lorakit.save_adapter(model, folder, tensors=...)"),
}
_DEFAULT_SHARD = "50GB"  # transformers' default max_shard_size


def _is_transformers_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (without importing transformers: such a model means it is imported)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def save_pretrained(model: nn.Module, save_directory: str | Path, is_main_process: bool = True,
                    state_dict: dict[str, Tensor] | None = None, selected_adapters: Sequence[str] | None = None,
                    max_shard_size: int | str = _DEFAULT_SHARD, **options: Any) -> None:
    """``model.save_pretrained`` of a transformers model holding lorakit adapters: the adapters (default: all,
    or ``selected_adapters``) in PEFT's layout, as ``PeftModel.save_pretrained`` writes them (``default`` at the
    top, the others in sub-folders; ``adapter_config.json`` + ``adapter_model.safetensors``), atomically, through
    `lorakit.save_adapters`. No base weight and no ``config.json`` is written: ``from_pretrained`` of the folder
    with peft installed loads the base named in ``adapter_config.json`` plus the adapter; without peft it stops
    for want of a ``config.json``; it never loads a half-initialised model.

    ``is_main_process=False`` writes nothing (another process does). ``state_dict`` (HF Trainer passes one under
    FSDP/DeepSpeed: the model's state-dict keys, whole tensors) is honoured: the adapter's tensors are taken from
    it, for one adapter at a time. ``max_shard_size`` is honoured by refusing an adapter larger than it (adapters
    are one file, as in PEFT). Every other transformers option is accepted at its default value only; another
    value raises `ConfigError` saying why (never ignored), an unknown keyword `TypeError`.
    """
    from .adapters import adapter_names
    from .io import save_adapter, save_adapters

    for key, value in options.items():
        if key not in _SAVE_DEFAULTS:
            raise TypeError(f"save_pretrained() of a model holding lorakit adapters got an unexpected keyword "
                            f"{key!r} (it writes the adapters in PEFT's format; options: is_main_process, "
                            f"state_dict, selected_adapters, max_shard_size, {', '.join(_SAVE_DEFAULTS)})")
        default, why = _SAVE_DEFAULTS[key]
        if value != default:
            raise ConfigError(f"save_pretrained({key}={value!r}) is not supported on a model holding lorakit "
                              f"adapters: {why}")
    names = list(adapter_names(model) if selected_adapters is None else selected_adapters)
    if not names:
        raise AdapterStateError("selected_adapters is empty: name the adapters to save")
    if state_dict is not None and len(names) != 1:
        raise ConfigError(f"save_pretrained(state_dict=...) saves one adapter; this model has {names}: pass "
                          "selected_adapters=[name] (once per adapter)")
    tensors = _state_dict_adapter(model, names[0], state_dict) if state_dict is not None else None
    _check_shard_size(model, names, max_shard_size, tensors)
    if not is_main_process:
        return
    if tensors is not None:
        save_adapter(model, save_directory, names, tensors=tensors)
    else:
        save_adapters(model, save_directory, names)


def _state_dict_adapter(model: nn.Module, name: str, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Adapter ``name``'s tensors taken from ``state_dict`` (keyed like ``model.state_dict()``), under PEFT's keys.
    The model's own tensors tell which state-dict key holds which file key."""
    from .peft_format import adapter_tensors

    key_of = {id(tensor): key for key, tensor in model.state_dict(keep_vars=True).items()}
    wanted = {file_key: key_of.get(id(tensor)) for file_key, tensor in adapter_tensors(model, name).items()}
    missing = sorted(str(key) for key in wanted.values() if key is None or key not in state_dict)
    if missing:
        raise ConfigError(f"save_pretrained(state_dict=...) lacks {len(missing)} tensor(s) of adapter {name!r}, "
                          f"e.g. {missing[:3]}; pass the model's whole state dict (or none)")
    return {file_key: state_dict[key] for file_key, key in wanted.items()}


def _check_shard_size(model: nn.Module, names: list[str], max_shard_size: int | str,
                      tensors: dict[str, Tensor] | None) -> None:
    """Refuse adapters larger than ``max_shard_size``: adapter files are never split (PEFT does not split them)."""
    if max_shard_size == _DEFAULT_SHARD:
        return
    from transformers.utils.hub import convert_file_size_to_int

    from .peft_format import adapter_tensors

    limit = convert_file_size_to_int(max_shard_size)
    for name in names:
        found = tensors if tensors is not None else adapter_tensors(model, name)
        size = sum(t.numel() * t.element_size() for t in found.values())
        if size > limit:
            raise ConfigError(f"adapter {name!r} is {size:,} bytes, above max_shard_size={max_shard_size!r}: "
                              "adapter files are written whole, as PEFT writes them; raise max_shard_size")


def _set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """transformers' ``model.set_adapter(name or [names])``: `lorakit.set_adapter` (only active adapters train,
    as with peft's layers)."""
    from .adapters import set_adapter

    set_adapter(model, adapter_name)


def _active_adapters(model: nn.Module) -> list[str]:
    """transformers' ``model.active_adapters()``: `lorakit.active_adapters`."""
    from .adapters import active_adapters

    return active_adapters(model)


def _refusal(method: str, instead: str) -> Callable[..., None]:
    def refuse(model: nn.Module, *args: Any, **kwargs: Any) -> None:
        raise AdapterStateError(f"model.{method}() is transformers' PEFT integration, which needs peft's own layers; "
                                f"this model holds lorakit adapters: use {instead}")

    refuse.__name__ = method
    return refuse


#: the methods a transformers model holding lorakit adapters carries on its instance
MODEL_METHODS: dict[str, Callable[..., Any]] = {
    "save_pretrained": save_pretrained,
    "set_adapter": _set_adapter,
    "active_adapters": _active_adapters,
    "load_adapter": _refusal("load_adapter", "lorakit.load_adapter(model, folder)"),
    "add_adapter": _refusal("add_adapter", "lorakit.add_adapter(model, name, lorakit.LoraConfig(...))"),
    "delete_adapter": _refusal("delete_adapter", "lorakit.delete_adapter(model, name)"),
    "enable_adapters": _refusal("enable_adapters", "lorakit.set_adapter(model, name)"),
    "disable_adapters": _refusal("disable_adapters", "`with lorakit.disable_adapters(model): ...`"),
    "get_adapter_state_dict": _refusal("get_adapter_state_dict", "lorakit.adapter_state_dict(model, name)"),
}


class ModelMethod:
    """``MODEL_METHODS[name]`` bound to one model. Not a ``types.MethodType``: a bound method pickles as
    ``getattr(model, name)``, which during unpickling finds the class's method (the instance's own is not restored
    yet), so ``torch.save(model)`` / ``torch.load`` would bring transformers' ``save_pretrained`` back silently.
    This pickles (and deep-copies) as itself, bound to the copy."""

    def __init__(self, name: str, model: nn.Module) -> None:
        self.name, self.model = name, model
        self.__doc__ = MODEL_METHODS[name].__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return MODEL_METHODS[self.name](self.model, *args, **kwargs)

    def __reduce__(self) -> tuple:
        return ModelMethod, (self.name, self.model)

    def __repr__(self) -> str:
        return f"<lorakit {self.name} of {type(self.model).__name__} holding lorakit adapters>"


def attach_model_methods(model: nn.Module) -> None:
    """Give a transformers model its lorakit ``save_pretrained``, ``set_adapter``... (see the module docstring);
    other modules are left alone."""
    if _is_transformers_model(model):
        for name in MODEL_METHODS:
            model.__dict__[name] = ModelMethod(name, model)


def detach_model_methods(model: nn.Module) -> None:
    """Remove what `attach_model_methods` put on ``model``: its class's methods apply again."""
    for name in MODEL_METHODS:
        if isinstance(model.__dict__.get(name), ModelMethod):
            del model.__dict__[name]


__all__ = ["MODEL_METHODS", "ModelMethod", "attach_model_methods", "base_model_id", "detach_model_methods",
           "peft_task_type", "save_pretrained"]
