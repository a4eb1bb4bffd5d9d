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

import os
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
from .inject import _is_base_param
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
PART_SUFFIX = {part: f".{part}.weight" if part in _MODULE_PARTS else f".{part}" for part in LORA_PARTS}
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
    return parts


def strip_wrappers(name: str) -> str:
    """A parameter name as in the model before lorakit wrapped anything."""
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """Adapter ``adapter_name``'s tensors under PEFT's file keys (CPU copies), as written to
    ``adapter_model.safetensors``: LoRA tensors, ``modules_to_save`` copies and, per ``bias``, trained biases."""
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
            for key, tensor in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{module_name}.{key}"] = tensor
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias" and _is_base_param(name) and ".original_module." not in name:
                out[PREFIX + name] = param
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in out.items()}


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


_LIST_OF_STR = ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern")


def _config_from_dict(raw: Any, path: Path) -> LoraConfig:
    if not isinstance(raw, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    for key in _LIST_OF_STR:
        value = raw.get(key)
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise AdapterError(f"{path}: {key} must be a string or a list of strings, got {value!r}")
    for key, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        value = raw.get(key)
        if value is not None and not (isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) for k, v in value.items())):
            raise AdapterError(f"{path}: {key} must map module patterns to numbers, got {value!r}")
    for key in ("r", "lora_alpha", "lora_dropout"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise AdapterError(f"{path}: {key} must be a number, got {value!r}")
    if isinstance(raw.get("r"), float):
        raise AdapterError(f"{path}: r must be an integer, got {raw['r']!r}")
    try:
        return LoraConfig.from_peft_dict(raw)
    except (ConfigError, TypeError, ValueError) as err:
        raise AdapterError(f"{path}: {err}") from None


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
    ours: dict[str, Any] = {}
    if METADATA_KEY in metadata:
        ours = loads_json(metadata[METADATA_KEY], f"{weights}: the lorakit metadata")
        if not isinstance(ours, dict):
            raise AdapterError(f"{weights}: lorakit metadata is not a JSON object; the file is corrupted")
        expected = ours.get("tensors_sha256")
        if expected is not None and digest(sorted(tensors.items()))[0] != expected:
            raise AdapterError(f"{weights}: tensor data does not match its checksum; the file is corrupted "
                               "(save or download it again)")
        fingerprint = ours.get("fingerprint")
        if fingerprint is not None and not (isinstance(fingerprint, dict)
                                            and isinstance(fingerprint.get("sha256"), str)):
            raise AdapterError(f"{weights}: the stored base-model fingerprint is malformed")
    return AdapterFiles(folder, raw, config, tensors, ours, weights)


__all__ = ["CONFIG_FILE", "FILE_PARTS", "METADATA_KEY", "PART_SUFFIX", "PICKLE_FILE", "PISSA_INIT_FILE", "PREFIX",
           "WEIGHTS_FILE", "AdapterFiles", "adapter_modules", "adapter_state_dict", "layer_parts", "read_adapter",
           "read_adapter_config", "strip_wrappers"]
