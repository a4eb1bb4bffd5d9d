"""The PEFT adapter folder format: file names, tensor keys, the model's adapter tensors under those keys, and
reading a folder with every problem an `AdapterError` (loading onto a model: `lorakit.io`).

A folder holds ``adapter_config.json`` (PEFT's keys, written by `LoraConfig.to_peft_dict`) and
``adapter_model.safetensors`` whose keys are the model's LoRA state-dict keys with the adapter name removed and
``base_model.model.`` in front::

    encoder.layer.0.attention.self.query.lora_A.default.weight  ->  base_model.model.encoder...query.lora_A.weight
    x.lora_magnitude_vector.default                             ->  base_model.model.x.lora_magnitude_vector
    classifier.modules_to_save.default.weight                   ->  base_model.model.classifier.weight

Several adapters follow PEFT's ``save_pretrained(selected_adapters=...)`` layout: ``default`` at the top, the
others in sub-folders named after them.

lorakit's own facts (base-model fingerprint, provenance, a checksum of the tensors) live in the safetensors
header's ``__metadata__["lorakit"]`` (a JSON string): PEFT ignores that header, whereas an extra key in
``adapter_config.json`` makes ``peft.LoraConfig.from_pretrained`` warn that the file comes from a newer PEFT.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import lora_modules, lora_state
from .config import LoraConfig
from .errors import AdapterError, AdapterStateError, ConfigError
from .files import loads_json, read_safetensors
from .fingerprint import digest
from .inject import is_base_param
from .layers import LORA_PARTS, LoraLayer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
#: PiSSA's initial A0/B0 (PEFT file keys), kept beside the adapter so it can be exported as plain LoRA.
PISSA_INIT_FILE = "lorakit_pissa_init.safetensors"
PREFIX = "base_model.model."
METADATA_KEY = "lorakit"
#: the parts a LoRA layer holds in a ``Module`` (tensor in ``.weight``) rather than directly as a parameter
_MODULE_PARTS = ("lora_A", "lora_B")
#: LoRA part name -> the ending of its file key (after the module name)
PART_SUFFIX = {part: f".{part}.weight" if part in _MODULE_PARTS else f".{part}" for part in LORA_PARTS} | {
    "lora_bias": ".lora_B.bias"}  # PEFT's lora_bias=True: B's bias
#: file-key ending -> LoRA part name (PEFT also writes DoRA's magnitude as ``.lora_magnitude_vector.weight``)
FILE_PARTS = {suffix: part for part, suffix in PART_SUFFIX.items()} | {
    ".lora_magnitude_vector.weight": "lora_magnitude_vector"}


# =========================================================================================================
# Model <-> file keys
# =========================================================================================================
def layer_parts(layer: LoraLayer, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s tensors in one LoRA layer, by part name (``lora_A``, ``lora_magnitude_vector``...)."""
    parts: dict[str, Tensor] = {}
    for part in LORA_PARTS:
        container = getattr(layer, part, None)
        if container is not None and name in container:
            parts[part] = container[name].weight if part in _MODULE_PARTS else container[name]
    if (bias := layer.lora_bias(name)) is not None:
        parts["lora_bias"] = bias
    return parts


def strip_wrappers(name: str) -> str:
    """A parameter name as in the model before lorakit wrapped anything."""
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """Adapter ``adapter_name``'s tensors under PEFT's file keys (CPU copies), as written to
    ``adapter_model.safetensors``: LoRA tensors, ``modules_to_save`` copies and, per ``bias``, trained biases."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in adapter_tensors(model, adapter_name).items()}


def adapter_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The model's own parameters and buffers (not copies) that make up adapter ``adapter_name``, under PEFT's
    file keys: what a checkpoint is copied back into in place (`lorakit.hf_trainer.restore_adapters`), and how a
    model's state-dict keys map to file keys (`lorakit.hf`)."""
    state = lora_state(model)
    if state is None or adapter_name not in state.configs:
        raise AdapterStateError(f"no adapter named {adapter_name!r} on this model "
                                f"(adapters: {list(state.configs) if state else []})")
    config = state.configs[adapter_name]
    out: dict[str, Tensor] = {}
    for module_name, module in lora_modules(model):
        if adapter_name not in module.adapter_names():
            continue
        if isinstance(module, LoraLayer):
            for part, tensor in layer_parts(module, adapter_name).items():
                out[PREFIX + module_name + PART_SUFFIX[part]] = tensor
            if config.bias == "lora_only" and module.bias is not None:
                out[f"{PREFIX}{module_name}.base_layer.bias"] = module.bias
        else:
            for key, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{module_name}.{key}"] = tensor
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias" and is_base_param(name) and ".original_module." not in name:
                out[PREFIX + name] = param
    return out


def adapter_modules(model: nn.Module, adapter_name: str) -> list[str]:
    """Names of the LoRA layers that hold adapter ``adapter_name``."""
    return [n for n, m in lora_modules(model) if isinstance(m, LoraLayer) and adapter_name in m.r]


# =========================================================================================================
# Reading files safely
# =========================================================================================================
@dataclass
class AdapterFiles:
    """An adapter folder read and checked for format (not yet against a model)."""

    directory: Path
    raw_config: dict[str, Any]
    config: LoraConfig
    tensors: dict[str, Tensor]  # PEFT file keys
    lorakit: dict[str, Any]  # our metadata: fingerprint, provenance... ({} for adapters other tools wrote)
    weights_file: Path

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        return self.lorakit.get("fingerprint")

    @property
    def provenance(self) -> dict[str, Any]:
        return self.lorakit.get("provenance") or {}


def _read_pickle(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - anything torch.load raises means the file is unusable
        raise AdapterError(f"cannot read {path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                           ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise AdapterError(f"{path} does not hold a dict of tensors")
    return state


#: largest rank and |alpha| an adapter file may declare (a rank above a layer's size is refused later, per layer)
MAX_RANK = 1 << 16
MAX_ALPHA = 1e6
#: longest string field (module patterns, names) and largest module-pattern list in ``adapter_config.json``
MAX_STRING = 4096
MAX_ENTRIES = 100_000


def _show(value: Any) -> str:
    """``repr`` of a value read from a file, cut short (a hostile file can hold megabytes in one field)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rank_ok(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_RANK


def _alpha_ok(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value) and 0 < value <= MAX_ALPHA


def _strings_ok(value: Any) -> bool:
    """A string, or a list of strings (PEFT's module selectors), each of sane length."""
    if isinstance(value, str):
        return len(value) <= MAX_STRING
    return isinstance(value, list) and len(value) <= MAX_ENTRIES and all(
        isinstance(v, str) and len(v) <= MAX_STRING for v in value)


def _pattern_ok(value: Any, check: Any) -> bool:
    """A dict of module patterns (regexes, as PEFT reads them) to values that pass ``check``."""
    if not isinstance(value, dict) or len(value) > MAX_ENTRIES:
        return False
    for key, item in value.items():
        if len(key) > MAX_STRING or not check(item):
            return False
        try:
            re.compile(rf"(.*\.)?({key})$")
        except (re.error, RecursionError, OverflowError):
            return False
    return True


#: ``adapter_config.json`` key -> (check of a non-null value, what it must be); strict JSON types: ``"false"``
#: is not a bool, ``"8"`` is not a rank
_CONFIG_CHECKS: dict[str, tuple[Any, str]] = {
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "r": (_rank_ok, f"an integer rank in 1..{MAX_RANK}"),
    "lora_alpha": (_alpha_ok, f"a finite number in (0, {MAX_ALPHA:g}]"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "target_modules": (_strings_ok, "a string (regex or 'all-linear') or a list of module names"),
    "exclude_modules": (_strings_ok, "a string (regex) or a list of module names"),
    "modules_to_save": (_strings_ok, "a list of module names"),
    "layers_pattern": (_strings_ok, "a string or a list of strings"),
    "layers_to_transform": (lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (
        isinstance(v, list) and len(v) <= MAX_ENTRIES
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)),
        "a layer index or a list of layer indices (integers >= 0)"),
    "rank_pattern": (lambda v: _pattern_ok(v, _rank_ok), f"a map of module regexes to ranks in 1..{MAX_RANK}"),
    "alpha_pattern": (lambda v: _pattern_ok(v, _alpha_ok),
                      f"a map of module regexes to finite numbers in (0, {MAX_ALPHA:g}]"),
    "bias": (lambda v: v in ("none", "lora_only", "all") if isinstance(v, str) else False,
             "'none', 'lora_only' or 'all'"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)) and (not isinstance(v, str) or len(v) <= 64),
                          "true/false or an init name"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "task_type": (lambda v: isinstance(v, str) and len(v) <= 64, "a PEFT task type such as 'CAUSAL_LM'"),
    "base_model_name_or_path": (lambda v: isinstance(v, str) and len(v) <= MAX_STRING, "a model id or path"),
    "revision": (lambda v: isinstance(v, str) and len(v) <= MAX_STRING, "a string"),
    "peft_version": (lambda v: isinstance(v, str) and len(v) <= 64, "a version string"),
}


def check_config_dict(raw: Any, where: str) -> dict[str, Any]:
    """``raw`` (a parsed ``adapter_config.json``) with every known key of the right JSON type and in range;
    `AdapterError` naming the key otherwise. Unknown keys are left to `LoraConfig.from_peft_dict`."""
    if not isinstance(raw, dict):
        raise AdapterError(f"{where} must hold a JSON object, got {type(raw).__name__}")
    for key, (check, wanted) in _CONFIG_CHECKS.items():
        value = raw.get(key)
        if value is not None and not check(value):
            raise AdapterError(f"{where}: {key} must be {wanted}, got {_show(value)}")
    return raw


def _config_from_dict(raw: Any, path: Path) -> LoraConfig:
    check_config_dict(raw, str(path))
    try:
        return LoraConfig.from_peft_dict(raw)
    except (ConfigError, TypeError, ValueError, OverflowError, re.error, RecursionError) as err:
        raise AdapterError(f"{path}: {err}") from None


def _fingerprint_ok(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    counts = [value.get(k) for k in ("modules", "bytes", "vocab_size")]
    return (isinstance(value.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", value["sha256"]) is not None
            and isinstance(value.get("algorithm"), str) and len(value["algorithm"]) <= 64
            and all(c is None or (isinstance(c, int) and not isinstance(c, bool) and c >= 0) for c in counts)
            and (value.get("dtype") is None or isinstance(value["dtype"], str) and len(value["dtype"]) <= 32))


#: lorakit's metadata key -> (check of a non-null value, what it must be)
_METADATA_CHECKS: dict[str, tuple[Any, str]] = {
    "adapter_name": (lambda v: isinstance(v, str), "a string"),
    "fingerprint": (_fingerprint_ok, "a fingerprint (algorithm, 64 hex digits sha256, counts)"),
    "provenance": (lambda v: isinstance(v, dict), "a JSON object"),
    "lorakit_version": (lambda v: isinstance(v, str) and len(v) <= 64, "a version string"),
    "tensors_sha256": (lambda v: isinstance(v, str) and len(v) <= 128, "a hex digest"),
    "format": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
}


def parse_metadata(metadata: dict[str, str], where: str) -> dict[str, Any]:
    """lorakit's facts from a safetensors ``__metadata__`` (``{}`` for files other tools wrote), each field
    type-checked; `AdapterError` naming the field otherwise."""
    if METADATA_KEY not in metadata:
        return {}
    ours = loads_json(metadata[METADATA_KEY], f"{where}: the lorakit metadata")
    if not isinstance(ours, dict):
        raise AdapterError(f"{where}: the lorakit metadata is not a JSON object; the file is corrupted")
    for key, (check, wanted) in _METADATA_CHECKS.items():
        value = ours.get(key)
        if value is not None and not check(value):
            raise AdapterError(f"{where}: lorakit metadata {key} must be {wanted}, got {_show(value)}; the file is "
                               "corrupted")
    return ours


def _config_json(directory: str | os.PathLike) -> tuple[Any, Path]:
    """``adapter_config.json`` of a folder, parsed (not yet checked), and its path."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{Path(directory)} has no {CONFIG_FILE}: not an adapter folder (PEFT/lorakit format)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AdapterError(f"cannot read {path}: {err}") from None
    return loads_json(data, str(path)), path


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """The `LoraConfig` of an adapter folder (``adapter_config.json`` only)."""
    return _config_from_dict(*_config_json(directory))


def read_adapter(directory: str | os.PathLike, allow_pickle: bool = False) -> AdapterFiles:
    """Read an adapter folder: config, tensors and lorakit metadata, every problem an `AdapterError`.

    Only ``adapter_model.safetensors`` is read unless ``allow_pickle=True`` lets a PEFT ``adapter_model.bin`` be
    loaded (with ``torch.load(weights_only=True)``). Tensors are checked against the checksum lorakit stores.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    raw, config_path = _config_json(folder)
    config = _config_from_dict(raw, config_path)
    metadata: dict[str, str] = {}
    if (folder / WEIGHTS_FILE).is_file():
        weights = folder / WEIGHTS_FILE
        tensors, metadata = read_safetensors(weights)
    elif (folder / PICKLE_FILE).is_file():
        weights = folder / PICKLE_FILE
        if not allow_pickle:
            raise AdapterError(f"{weights} is a pickle file, which can run code when loaded; lorakit reads "
                               "safetensors only. If you trust its source pass allow_pickle=True (--allow-pickle), "
                               "or convert it with PEFT: PeftModel.from_pretrained(...).save_pretrained(dir)")
        tensors = _read_pickle(weights)
    else:
        raise AdapterError(f"{folder} has no {WEIGHTS_FILE} (files: {sorted(p.name for p in folder.iterdir())})")
    if not tensors:
        raise AdapterError(f"{weights} holds no tensors")
    ours = parse_metadata(metadata, str(weights))
    expected = ours.get("tensors_sha256")
    if expected is not None and digest(sorted(tensors.items()))[0] != expected:
        raise AdapterError(f"{weights}: tensor data does not match its checksum; the file is corrupted "
                           "(save or download it again)")
    return AdapterFiles(folder, raw, config, tensors, ours, weights)


__all__ = ["CONFIG_FILE", "FILE_PARTS", "MAX_ALPHA", "MAX_ENTRIES", "MAX_RANK", "MAX_STRING", "METADATA_KEY",
           "PART_SUFFIX", "PICKLE_FILE", "PISSA_INIT_FILE", "PREFIX", "WEIGHTS_FILE", "AdapterFiles",
           "adapter_modules", "adapter_state_dict", "adapter_tensors", "check_config_dict", "layer_parts",
           "parse_metadata", "read_adapter", "read_adapter_config", "strip_wrappers"]
