"""Adapter folders in PEFT's format: save, load safely, fingerprint the base model (export, merge and
inspection of folders: `lorakit.export`).

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

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .adapters import ModelFlags, delete_adapter, lora_modules, lora_state, set_adapter
from .config import LoraConfig
from .errors import AdapterError, AdapterStateError, ConfigError, LorakitError
from .inject import _is_base_param, _is_internal, _suffix_match, add_adapter, targeting_report
from .layers import LoraLayer, ModulesToSave, wrapper_for

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
#: PiSSA's initial A0/B0 (PEFT file keys), kept beside the adapter so it can be exported as plain LoRA.
PISSA_INIT_FILE = "lorakit_pissa_init.safetensors"
PREFIX = "base_model.model."
METADATA_KEY = "lorakit"
FINGERPRINT_ALGORITHM = "sha256-16MiB-chunks-v1"
#: ranks vLLM's LoRA kernels accept (``--max-lora-rank`` choices)
#: PEFT's ``task_type`` -> `lorakit.models.load_model` task
TASK_FROM_PEFT = {"SEQ_CLS": "sequence-classification", "CAUSAL_LM": "causal-lm"}

_CHUNK = 16 << 20
# file-key ending -> part name in a LoRA layer (the part holds the tensor directly, or in ``.weight``)
_PARTS = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_embedding_A": "lora_embedding_A",
          ".lora_embedding_B": "lora_embedding_B", ".lora_magnitude_vector.weight": "lora_magnitude_vector",
          ".lora_magnitude_vector": "lora_magnitude_vector"}
_PART_SUFFIX = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight", "lora_embedding_A": ".lora_embedding_A",
                "lora_embedding_B": ".lora_embedding_B", "lora_magnitude_vector": ".lora_magnitude_vector"}
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# =========================================================================================================
# Fingerprint of the base model
# =========================================================================================================
def _tensor_bytes(tensor: Tensor) -> memoryview:
    """The raw bytes of a tensor (no copy for a contiguous CPU tensor)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _digest(items: Sequence[tuple[str, Tensor]]) -> tuple[str, int]:
    """sha256 over ``(name, shape, dtype, sha256 of the bytes)`` per tensor, in order; also the byte count.

    Bytes are hashed in 16 MiB chunks on a thread pool (hashlib releases the GIL), so the result does not
    depend on the thread count and large models hash at several GB/s.
    """
    views = [_tensor_bytes(t) for _, t in items]
    chunks = [(i, view[start:start + _CHUNK]) for i, view in enumerate(views)
              for start in range(0, max(len(view), 1), _CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda job: hashlib.sha256(job[1]).digest(), chunks))
    per_item: list[list[bytes]] = [[] for _ in items]
    for (i, _), d in zip(chunks, digests):
        per_item[i].append(d)
    total = hashlib.sha256()
    for (name, tensor), parts in zip(items, per_item):
        total.update(f"{name}\0{tuple(tensor.shape)}\0{str(tensor.dtype)}\0".encode())
        total.update(hashlib.sha256(b"".join(parts)).digest())
    return total.hexdigest(), sum(len(v) for v in views)


def _vocab_size(tokenizer: Any) -> int | None:
    return None if tokenizer is None else len(tokenizer)


def base_fingerprint(model: nn.Module, targets: LoraConfig | Iterable[str], tokenizer: Any = None) -> dict[str, Any]:
    """Fingerprint of the base weights an adapter is applied to.

    Hashes the name, shape, dtype and every byte of the ``weight`` of each targeted module (the base layer's, never
    a LoRA tensor), plus the tokenizer's vocabulary size when given. ``targets`` is a `LoraConfig` (the modules
    it selects) or module names. A base loaded in another dtype counts as another base.

    Compute it *before* `inject` for ``init="pissa"``: PiSSA replaces the base weights by a residual.
    Raises `AdapterStateError` when an adapter is merged into a targeted weight (unmerge first).
    """
    if isinstance(targets, LoraConfig):
        names = [row.name for row in targeting_report(model, targets).targeted]
    else:
        names = list(targets)
    modules = dict(model.named_modules())
    items = []
    for name in sorted(set(names)):
        module = modules.get(name)
        if module is None:
            raise AdapterError(f"cannot fingerprint module {name!r}: the model has no such module")
        if isinstance(module, LoraLayer):
            if module.merged_adapters:
                raise AdapterStateError(f"adapters {module.merged_adapters} are merged into {name}; its weight is not "
                                        "the base weight any more: unmerge(model) first")
            module = module.base_layer
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            raise AdapterError(f"cannot fingerprint module {name!r}: it has no weight tensor")
        if weight.device.type == "meta":
            raise AdapterError(f"cannot fingerprint module {name!r}: its weight is on the meta device (not loaded)")
        items.append((name, weight))
    digest, nbytes = _digest(items)
    return {"algorithm": FINGERPRINT_ALGORITHM, "sha256": digest, "modules": len(items), "bytes": nbytes,
            "vocab_size": _vocab_size(tokenizer)}


def _fingerprint_difference(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Why two fingerprints differ, in words, or None when they agree."""
    if stored.get("algorithm") != current["algorithm"]:
        return f"fingerprint algorithm {stored.get('algorithm')!r} is not lorakit's {current['algorithm']!r}"
    reasons = []
    if stored.get("vocab_size") is not None and current["vocab_size"] is not None \
            and stored["vocab_size"] != current["vocab_size"]:
        reasons.append(f"tokenizer vocabulary {current['vocab_size']} != {stored['vocab_size']}")
    if stored.get("sha256") != current["sha256"]:
        what = "different weights"
        if stored.get("modules") != current["modules"] or stored.get("bytes") != current["bytes"]:
            what = (f"{current['modules']} targeted modules / {current['bytes']} bytes here, "
                    f"{stored.get('modules')} / {stored.get('bytes')} when saved")
        reasons.append(f"weights hash {current['sha256'][:12]} != {str(stored.get('sha256'))[:12]} ({what})")
    return "; ".join(reasons) or None


# =========================================================================================================
# Model <-> file keys
# =========================================================================================================
def _layer_parts(layer: LoraLayer, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s tensors in one LoRA layer, by part name (``lora_A``, ``lora_magnitude_vector``...)."""
    parts: dict[str, Tensor] = {}
    for part in ("lora_A", "lora_B"):
        container = getattr(layer, part, None)
        if container is not None and name in container:
            parts[part] = container[name].weight
    for part in ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
        container = getattr(layer, part, None)
        if container is not None and name in container:
            parts[part] = container[name]
    return parts


def _strip_wrappers(name: str) -> str:
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
            for part, tensor in _layer_parts(module, adapter_name).items():
                out[PREFIX + module_name + _PART_SUFFIX[part]] = tensor
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


def _adapter_modules(model: nn.Module, adapter_name: str) -> list[str]:
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


def _parse_header(data: bytes, path: Path, total: int | None = None
                  ) -> tuple[dict[str, tuple[str, list[int], int, int]], dict[str, str]]:
    """Validate a safetensors header; return ``{key: (dtype, shape, start, end)}`` and ``__metadata__``.

    ``data`` starts at the file's first byte and holds at least the header; ``total`` is the file's length
    (default ``len(data)``), so the header can be checked without reading the tensors.
    """
    total = len(data) if total is None else total

    def bad(why: str) -> AdapterError:
        return AdapterError(f"{path} is not a valid safetensors file ({why}); the file is truncated or corrupted: "
                            "save or download it again")

    if total < 8 or len(data) < 8:
        raise bad(f"only {total} bytes")
    size = int.from_bytes(data[:8], "little")
    if size < 2 or size > min(total, len(data)) - 8:
        raise bad(f"header length {size} does not fit a {total}-byte file")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    body = total - 8 - size
    entries: dict[str, tuple[str, list[int], int, int]] = {}
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {key!r} is malformed")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise bad(f"tensor {key!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {key!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise bad(f"tensor {key!r} has data_offsets {offsets!r}")
        start, end = offsets
        nbytes = math.prod(shape) * torch.empty((), dtype=_ST_DTYPES[dtype]).element_size()
        if not 0 <= start <= end <= body or end - start != nbytes:
            raise bad(f"tensor {key!r} ({dtype} {shape}) does not fit bytes {start}..{end} of a {body}-byte body")
        entries[key] = (dtype, shape, start, end)
    position = 0
    for _, _, start, end in sorted(entries.values(), key=lambda e: (e[2], e[3])):
        if start != position:
            raise bad("tensor data overlaps or leaves gaps")
        position = end
    if position != body:
        raise bad(f"{body - position} bytes after the last tensor")
    return entries, metadata


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors.torch import load

    try:
        data = path.read_bytes()
    except OSError as err:
        raise AdapterError(f"cannot read {path}: {err}") from None
    _, metadata = _parse_header(data, path)
    try:
        tensors = load(data)
    except BaseException as err:  # the Rust parser raises its own error types (a panic is a BaseException)
        if isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise AdapterError(f"{path} is not a valid safetensors file ({type(err).__name__}: {err})") from None
    return tensors, metadata


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
        return json.loads(path.read_text(encoding="utf-8")), path
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{path} is not valid JSON ({err})") from None


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
        tensors, metadata = _read_safetensors(weights)
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
        try:
            ours = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as err:
            raise AdapterError(f"{weights}: lorakit metadata is not JSON ({err}); the file is corrupted") from None
        if not isinstance(ours, dict):
            raise AdapterError(f"{weights}: lorakit metadata is not a JSON object; the file is corrupted")
        expected = ours.get("tensors_sha256")
        if expected is not None and _digest(sorted(tensors.items()))[0] != expected:
            raise AdapterError(f"{weights}: tensor data does not match its checksum; the file is corrupted "
                               "(save or download it again)")
        fingerprint = ours.get("fingerprint")
        if fingerprint is not None and not (isinstance(fingerprint, dict)
                                            and isinstance(fingerprint.get("sha256"), str)):
            raise AdapterError(f"{weights}: the stored base-model fingerprint is malformed")
    return AdapterFiles(folder, raw, config, tensors, ours, weights)


# =========================================================================================================
# Loading onto a model
# =========================================================================================================
@dataclass
class _Plan:
    """What a file puts where, checked against the model before anything changes."""

    lora: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module -> {part: tensor}
    saves: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # modules_to_save module -> {key: tensor}
    biases: dict[str, Tensor] = field(default_factory=dict)  # unwrapped parameter name -> tensor


def _save_modules(model: nn.Module, entries: Sequence[str] | None) -> list[str]:
    """Modules ``modules_to_save`` entries name in this model (entries matching nothing are ignored, as PEFT)."""
    if not entries:
        return []
    hits = sorted({n for n, _ in model.named_modules() if n and not _is_internal(n)
                   and any(_suffix_match(e, n) for e in entries)})
    return [n for n in hits if not any(n != o and n.startswith(o + ".") for o in hits)]


def _plan(model: nn.Module, files: AdapterFiles) -> _Plan:
    config, where = files.config, files.weights_file
    modules = dict(model.named_modules())
    save_names = set(_save_modules(model, config.modules_to_save))
    params = dict(model.named_parameters())
    base_params = {_strip_wrappers(n): n for n in params if _is_base_param(n)}
    plan = _Plan()
    for key, tensor in files.tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"{where}: unexpected tensor {key!r} (PEFT keys start with {PREFIX!r})")
        path = key[len(PREFIX):]
        suffix = next((suffix for suffix in _PARTS if path.endswith(suffix)), None)
        if suffix is not None:
            module_name, part = path[: -len(suffix)], _PARTS[suffix]
            slot = plan.lora.setdefault(module_name, {})
            if part in slot:
                raise AdapterError(f"{where}: two tensors for {module_name}.{part}")
            slot[part] = tensor
            continue
        pieces = path.split(".")
        owner = next((".".join(pieces[:i]) for i in range(len(pieces) - 1, 0, -1)
                      if ".".join(pieces[:i]) in save_names), None)
        if owner is not None:
            plan.saves.setdefault(owner, {})[path[len(owner) + 1:]] = tensor
        elif config.bias != "none" and pieces[-1] == "bias" and _strip_wrappers(path) in base_params:
            plan.biases[_strip_wrappers(path)] = tensor
        else:
            hint = f" (bias={config.bias!r} in {CONFIG_FILE})" if pieces[-1] == "bias" else ""
            raise AdapterError(f"{where}: unexpected tensor {key!r}: it is no LoRA tensor, no modules_to_save "
                               f"entry and no bias of this model{hint}")
    if not plan.lora:
        raise AdapterError(f"{where} has no LoRA tensors (lora_A/lora_B/lora_embedding_A/B)")
    for name, parts in plan.lora.items():
        _check_lora_module(model, modules, config, name, parts, where)
    for name, tensors in plan.saves.items():
        module = modules[name]
        original = module.original_module if isinstance(module, ModulesToSave) else module
        _check_tensors(f"modules_to_save {name!r}", original.state_dict(), tensors, where)
    for name, tensor in plan.biases.items():
        param = params[base_params[name]]
        _check_tensors(f"bias {name!r}", {"bias": param}, {"bias": tensor}, where)
    missing_saves = sorted(save_names - set(plan.saves))
    if missing_saves:
        raise AdapterError(f"{where}: missing tensors for modules_to_save {missing_saves} (listed in {CONFIG_FILE})")
    _check_config_targets(model, config, set(plan.lora), where)
    return plan


def _check_tensors(what: str, expected: Mapping[str, Tensor], found: Mapping[str, Tensor], where: Path) -> None:
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise AdapterError(f"{where}: {what}: " + "; ".join(
            ([f"missing tensors {missing}"] if missing else []) + ([f"unexpected tensors {extra}"] if extra else [])))
    for key, want in expected.items():
        got = found[key]
        if tuple(got.shape) != tuple(want.shape):
            raise AdapterError(f"{where}: {what}: {key} has shape {tuple(got.shape)}, the model needs "
                               f"{tuple(want.shape)}")
        # floating tensors are cast to the model's precision on load; anything else must match exactly
        if want.dtype.is_floating_point != got.dtype.is_floating_point or (
                not want.dtype.is_floating_point and got.dtype != want.dtype):
            raise AdapterError(f"{where}: {what}: {key} has dtype {got.dtype}, the model needs {want.dtype}")
        if got.dtype.is_floating_point and not bool(torch.isfinite(got).all()):
            raise AdapterError(f"{where}: {what}: {key} contains NaN or inf values")


def _check_lora_module(model: nn.Module, modules: dict[str, nn.Module], config: LoraConfig, name: str,
                       parts: dict[str, Tensor], where: Path) -> None:
    module = modules.get(name)
    if module is None:
        raise AdapterError(f"{where}: tensors for module {name!r}, which this model does not have: is this adapter "
                           "for another model (or another task head, e.g. bert.encoder vs encoder)?")
    if isinstance(module, ModulesToSave):
        raise AdapterError(f"{where}: LoRA tensors for {name!r}, which another adapter trains in full "
                           "(modules_to_save)")
    base = module.base_layer if isinstance(module, LoraLayer) else module
    wrapper = type(module) if isinstance(module, LoraLayer) else wrapper_for(base)
    if wrapper is None:
        raise AdapterError(f"{where}: module {name!r} is a {type(base).__name__}, which lorakit cannot adapt")
    if (reason := wrapper.skip_reason(base)) is not None:
        raise AdapterError(f"{where}: module {name!r} cannot take LoRA: {reason}")
    first = parts.get("lora_A", parts.get("lora_embedding_A"))
    if first is None or first.dim() == 0:
        raise AdapterError(f"{where}: module {name!r} has {sorted(parts)} but no lora_A/lora_embedding_A tensor")
    r = int(first.shape[0])
    if r != config.rank_for(name):
        raise AdapterError(f"{where}: module {name!r} has rank {r} in the weights but {config.rank_for(name)} in "
                           f"{CONFIG_FILE} (r / rank_pattern)")
    if r < 1 or r > wrapper.max_rank(base):
        raise AdapterError(f"{where}: module {name!r} has rank {r}; its {type(base).__name__} allows 1.."
                           f"{wrapper.max_rank(base)}")
    if config.use_dora and not wrapper.supports_dora:
        raise AdapterError(f"{where}: DoRA on {name!r} ({type(base).__name__}) is not supported")
    probe = wrapper(base)  # a throwaway wrapper: the shapes the real one will have (the model is not touched)
    probe.add("probe", r, config.alpha_for(name), 0.0, "default", config.use_rslora, config.use_dora)
    _check_tensors(f"module {name!r}", _layer_parts(probe, "probe"), parts, where)


def _check_config_targets(model: nn.Module, config: LoraConfig, found: set[str], where: Path) -> None:
    """The modules the config selects on this model must be exactly those the weights hold."""
    entries = [e for e in dict.fromkeys(config.modules_to_save or []) if _save_modules(model, [e])]
    targets = config.target_modules
    if isinstance(targets, list):  # PEFT accepts keys that match nothing as long as one key matches
        names = [n for n, _ in model.named_modules() if n and not _is_internal(n)]
        targets = [t for t in targets if any(_suffix_match(t, n) for n in names)] or targets
    try:
        report = targeting_report(model, config.replace(modules_to_save=entries or None, target_modules=targets))
    except LorakitError as err:
        raise AdapterError(f"{where.parent / CONFIG_FILE} does not fit this model: {err}") from None
    selected = {row.name for row in report.targeted}
    missing, extra = sorted(selected - found), sorted(found - selected)
    if missing:
        raise AdapterError(f"{where}: missing tensors: {CONFIG_FILE} targets {len(missing)} module(s) the weights "
                           f"do not cover, e.g. {missing[:3]}")
    if extra:
        raise AdapterError(f"{where}: tensors for {len(extra)} module(s) {CONFIG_FILE} does not target, "
                           f"e.g. {extra[:3]}")


def _default_name(files: AdapterFiles) -> str:
    stored = files.lorakit.get("adapter_name")
    if isinstance(stored, str) and stored and "." not in stored:
        return stored
    if (files.directory.parent / CONFIG_FILE).is_file():  # a sub-folder of PEFT's multi-adapter layout
        return files.directory.name
    return "default"


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None,
                 trainable: bool = False, force: bool = False, allow_pickle: bool = False, *,
                 tokenizer: Any = None) -> str:
    """Load a PEFT/lorakit adapter folder onto ``model``; returns the adapter's name.

    Args:
        adapter_name: name on the model; default: the name it was saved under (``default``, or the sub-folder
            name of PEFT's multi-adapter layout).
        trainable: leave its parameters requiring grad (to continue training); else they are frozen.
        force: load even when the base-model fingerprint differs (a warning instead of an error).
        allow_pickle: accept a pickle ``adapter_model.bin`` (read with ``torch.load(weights_only=True)``).
        tokenizer: compared with the vocabulary size in the fingerprint, when both are known.

    The adapter becomes active when no adapter was active before (else it is added inactive, as PEFT's
    ``load_adapter``). Every problem with the files or their fit to the model raises `AdapterError` before the
    model is touched; the model is left exactly as it was on any failure. An adapter saved with
    ``init="pissa"`` applies to the original base: as PEFT, loading recomputes the residual base weights.
    """
    files = read_adapter(directory, allow_pickle=allow_pickle)
    name = adapter_name or _default_name(files)
    state = lora_state(model)
    if not isinstance(name, str) or "." in name:
        raise AdapterStateError(f"adapter name must be a non-empty string without dots, got {name!r}")
    if state is not None and name in state.configs:
        raise AdapterStateError(f"an adapter named {name!r} is already loaded; pass another adapter_name")
    if state is not None and any(m.merged for _, m in lora_modules(model) if isinstance(m, LoraLayer)):
        raise AdapterStateError("adapters are merged into the weights; unmerge(model) before loading another")
    flags = ModelFlags.of(model)
    try:
        _check_and_apply(model, files, name, trainable, force, tokenizer, flags)
    except BaseException:
        flags.restore()  # a failed load leaves train/eval modes and requires_grad exactly as they were
        raise
    flags.restore_modes()  # modules that were there keep their mode; new ones follow the layer they wrap
    return name


def _check_and_apply(model: nn.Module, files: AdapterFiles, name: str, trainable: bool, force: bool,
                     tokenizer: Any, flags: ModelFlags) -> None:
    plan = _plan(model, files)
    flags.restore_modes()  # the shape probes wrap the model's own layers; the new wrappers must see their mode
    pissa = files.config.init == "pissa"
    if pissa and any(isinstance(m, LoraLayer) for n, m in model.named_modules() if n in plan.lora):
        raise AdapterError("this PiSSA adapter rewrites the base weights of layers other adapters use; load it "
                           "onto a clean base, or export it as plain LoRA first (lorakit export --target peft)")
    stored = files.fingerprint
    if stored is not None:
        current = base_fingerprint(model, sorted(plan.lora), tokenizer)
        difference = _fingerprint_difference(stored, current)
        if difference is not None:
            message = (f"adapter {files.directory} was saved for another base model ({difference}); base model "
                       f"recorded: {files.config.base_model_name_or_path!r}")
            if not force:
                raise AdapterError(message + ". Load the base it was trained on, or pass force=True (--force) to "
                                   "apply it anyway")
            warnings.warn(message + "; loading anyway (force=True)", stacklevel=3)
    _apply(model, files, plan, name, trainable)


def _apply(model: nn.Module, files: AdapterFiles, plan: _Plan, name: str, trainable: bool) -> None:
    config = files.config
    had_active = bool(lora_state(model) and lora_state(model).active)
    modules = dict(model.named_modules())
    backups: dict[str, Tensor] = {}
    if config.init == "pissa":  # the residual replaces the base weights: keep them for a rollback
        for n in plan.lora:
            backups[n + ".weight"] = modules[n].weight.detach().clone()
    added = False
    try:
        injected = config.replace(target_modules=sorted(plan.lora), exclude_modules=None, layers_to_transform=None,
                                  layers_pattern=None, modules_to_save=sorted(plan.saves) or None,
                                  init="pissa" if config.init == "pissa" else "default")
        add_adapter(model, name, injected)
        added = True
        lora_state(model).configs[name] = config  # the file's own config (PEFT targets), for re-saving
        modules = dict(model.named_modules())
        params = {_strip_wrappers(n): p for n, p in model.named_parameters() if _is_base_param(n)}
        with torch.no_grad():
            for module_name, parts in plan.lora.items():
                slots = _layer_parts(modules[module_name], name)
                for part, tensor in parts.items():
                    slots[part].copy_(tensor)
            for module_name, tensors in plan.saves.items():
                target = modules[module_name].modules_to_save[name].state_dict()
                for key, tensor in tensors.items():
                    target[key].copy_(tensor)
            for param_name, tensor in plan.biases.items():
                backups["bias:" + param_name] = params[param_name].detach().clone()
                params[param_name].copy_(tensor)
        if not had_active:
            set_adapter(model, name)
        for module_name, module in lora_modules(model):
            if name in module.adapter_names():
                for param in module.adapter_parameters(name):
                    param.requires_grad_(trainable)
                if not trainable and config.bias == "lora_only" and isinstance(module, LoraLayer) \
                        and module.bias is not None:
                    module.bias.requires_grad_(False)
        if not trainable and config.bias == "all":
            for param_name, param in model.named_parameters():
                if param_name.rsplit(".", 1)[-1] == "bias":
                    param.requires_grad_(False)
    except Exception as err:
        _rollback(model, name if added else None, backups)
        if isinstance(err, LorakitError):
            raise
        raise AdapterError(f"loading {files.directory} failed ({type(err).__name__}: {err}); the model is unchanged"
                           ) from err


def _rollback(model: nn.Module, name: str | None, backups: dict[str, Tensor]) -> None:
    with torch.no_grad():
        params = {_strip_wrappers(n): p for n, p in model.named_parameters() if _is_base_param(n)}
        for key, value in backups.items():
            if key.startswith("bias:"):
                params[key[5:]].copy_(value)
        if name is not None:
            delete_adapter(model, name)
        modules = dict(model.named_modules())
        for key, value in backups.items():
            if not key.startswith("bias:"):
                modules[key[: -len(".weight")]].weight.copy_(value)


def load_adapters(model: nn.Module, directory: str | os.PathLike, trainable: bool = False, force: bool = False,
                  allow_pickle: bool = False, *, tokenizer: Any = None) -> list[str]:
    """Load every adapter of PEFT's multi-adapter layout: the top-level one (if any) and each sub-folder holding
    an ``adapter_config.json`` (named after it). All or nothing: on a failure the ones loaded are removed."""
    folder = Path(directory)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    sources = ([(None, folder)] if (folder / CONFIG_FILE).is_file() else []) + [
        (sub.name, sub) for sub in sorted(folder.iterdir()) if sub.is_dir() and (sub / CONFIG_FILE).is_file()]
    if not sources:
        raise AdapterError(f"{folder} holds no adapter ({CONFIG_FILE} at the top or in sub-folders)")
    names: list[str] = []
    flags = ModelFlags.of(model)
    try:
        for sub_name, path in sources:
            names.append(load_adapter(model, path, sub_name, trainable, force, allow_pickle, tokenizer=tokenizer))
    except BaseException:
        for loaded in reversed(names):
            delete_adapter(model, loaded)
        flags.restore()  # deleting re-derives requires_grad from the active adapters: put back what was there
        raise
    return names


# =========================================================================================================
# Writing (atomically)
# =========================================================================================================
def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(dest: str | os.PathLike, replace: Iterable[str] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside ``dest``; on success it becomes ``dest`` by rename.

    If ``dest`` exists, its entries not named in ``replace`` are carried over (hard links where possible) and
    the old folder is swapped out (``replace=None``: nothing is carried over). On any error the staging folder
    is removed and ``dest`` is left as it was: a crash never leaves a half-written folder at ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not dest.is_dir():
        raise AdapterError(f"{dest} exists and is not a folder")
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if dest.exists():
            if replace is not None:
                owned = set(replace)
                for entry in dest.iterdir():
                    if entry.name not in owned and not (staging / entry.name).exists():
                        _link_or_copy(entry, staging / entry.name)
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rmdir(old)
            os.rename(dest, old)
            os.rename(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _link_or_copy(source: Path, target: Path) -> None:
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, copy_function=link, symlinks=True)
    elif source.is_symlink():
        os.symlink(os.readlink(source), target)
    else:
        link(str(source), str(target))


def _safetensors_bytes(tensors: Mapping[str, Tensor], ours: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    ours = dict(ours, tensors_sha256=_digest(sorted(tensors.items()))[0])
    return save(dict(tensors), metadata={"format": "pt", METADATA_KEY: json.dumps(ours, sort_keys=True, default=str)})


def _write_adapter(folder: Path, config: dict[str, Any], tensors: Mapping[str, Tensor], ours: dict[str, Any],
                   pissa_init: Mapping[str, Tensor] | None = None, pissa_ours: dict[str, Any] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _write_file(folder / WEIGHTS_FILE, _safetensors_bytes(tensors, ours))
    if pissa_init is not None:
        _write_file(folder / PISSA_INIT_FILE, _safetensors_bytes(pissa_init, pissa_ours or {}))
    _write_file(folder / CONFIG_FILE, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def _lorakit_version() -> str:
    import lorakit

    return getattr(lorakit, "__version__", "unknown")


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | Sequence[str] = "default",
                 provenance: dict[str, Any] | None = None, *, tokenizer: Any = None,
                 fingerprint: dict[str, Any] | None = None,
                 pissa_initial: Mapping[str, Tensor] | str | os.PathLike | None = None) -> Path:
    """Write adapter(s) in PEFT's format, atomically; returns the folder.

    Args:
        adapter_name: one name (written at ``directory`` itself) or a list (PEFT's layout: ``default`` at the
            top, the others in sub-folders named after them).
        provenance: what made the adapter (recipe, dataset name and hash, steps...); stored as JSON beside the
            lorakit version and the base-model fingerprint, in the safetensors header PEFT ignores.
        tokenizer: its vocabulary size goes into the fingerprint.
        fingerprint: the base fingerprint to record instead of computing it now: pass
            ``base_fingerprint(model, config, tokenizer)`` taken before `inject` for ``init="pissa"`` adapters
            (whose base weights are a residual by now; without it no fingerprint is recorded).
        pissa_initial: the PiSSA adapter's initial A0/B0 — `adapter_state_dict` taken right after `inject`, or a
            folder saved then — kept beside it so `export_adapter` can turn it into plain LoRA of rank 2r.
    """
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    state = lora_state(model)
    for name in names:
        if state is None or name not in state.configs:
            raise AdapterStateError(f"no adapter named {name!r} on this model "
                                    f"(adapters: {list(state.configs) if state else []})")
    if len(names) != 1 and (pissa_initial is not None or fingerprint is not None):
        raise AdapterStateError("pissa_initial/fingerprint apply to one adapter; save PiSSA adapters one at a time")
    if provenance is not None and not isinstance(provenance, dict):
        raise ConfigError(f"provenance must be a dict, got {type(provenance).__name__}")
    payloads = []  # everything is computed before the first byte is written
    for name in names:
        config = state.configs[name]
        peft_config = config.to_peft_dict()
        if peft_config.get("base_model_name_or_path") is None:
            peft_config["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) \
                or getattr(model, "name_or_path", None) or None
        tensors = adapter_state_dict(model, name)
        if fingerprint is not None:
            recorded = dict(fingerprint)
        elif config.init == "pissa":
            warnings.warn(f"adapter {name!r} is a PiSSA adapter: its base weights are a residual now, so no base "
                          "fingerprint is recorded; pass fingerprint=base_fingerprint(model, config) taken before "
                          "inject()", stacklevel=2)
            recorded = None
        else:
            recorded = base_fingerprint(model, _adapter_modules(model, name), tokenizer)
        ours = {"format": 1, "lorakit_version": _lorakit_version(), "adapter_name": name, "fingerprint": recorded,
                "provenance": json.loads(json.dumps(provenance or {}, default=str))}
        initial = _pissa_initial_tensors(pissa_initial, tensors) if pissa_initial is not None else None
        if initial is not None and config.init != "pissa":
            raise ConfigError(f"pissa_initial given for adapter {name!r}, whose init is {config.init!r}, not 'pissa'")
        payloads.append((name, peft_config, tensors, ours, initial))
    single = isinstance(adapter_name, str)
    top = single or "default" in names
    replace = ({CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE, PISSA_INIT_FILE} if top else set()) | (
        set() if single else {n for n in names if n != "default"})
    with atomic_directory(directory, replace=replace) as staging:
        for name, peft_config, tensors, ours, initial in payloads:
            folder = staging if single or name == "default" else staging / name
            _write_adapter(folder, peft_config, tensors, ours, initial,
                           {"format": 1, "fingerprint": ours["fingerprint"], "role": "pissa-initial"})
    return Path(directory)


def save_adapters(model: nn.Module, directory: str | os.PathLike, adapter_names: Sequence[str] | None = None,
                  provenance: dict[str, Any] | None = None, *, tokenizer: Any = None) -> Path:
    """Every adapter (or ``adapter_names``) in PEFT's multi-adapter layout; see `save_adapter`."""
    state = lora_state(model)
    names = list(adapter_names) if adapter_names is not None else (list(state.configs) if state else [])
    if not names:
        raise AdapterStateError("this model has no adapters to save")
    return save_adapter(model, directory, names, provenance, tokenizer=tokenizer)


def _pissa_initial_tensors(initial: Mapping[str, Tensor] | str | os.PathLike,
                           tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    source = read_adapter(initial).tensors if isinstance(initial, (str, os.PathLike)) else dict(initial)
    wanted = {k: v for k, v in tensors.items() if k.endswith((".lora_A.weight", ".lora_B.weight"))}
    picked = {k: source[k] for k in wanted if k in source}
    missing = sorted(set(wanted) - set(picked))
    if missing:
        raise AdapterError(f"pissa_initial lacks the initial tensors {missing[:3]}")
    for key, tensor in picked.items():
        if tensor.shape != wanted[key].shape:
            raise AdapterError(f"pissa_initial {key} has shape {tuple(tensor.shape)}, the adapter "
                               f"{tuple(wanted[key].shape)}")
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in picked.items()}


__all__ = ["AdapterFiles", "adapter_state_dict", "atomic_directory", "base_fingerprint", "load_adapter", "load_adapters",
           "read_adapter", "read_adapter_config", "save_adapter", "save_adapters"]
