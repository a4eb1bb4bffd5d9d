"""Quantize while reading: a Hugging Face model with a quantized base (`lorakit.quant`) built tensor by tensor
from its safetensors file(s), so the full-precision model never sits in memory whole.

`load_while_reading` builds the model's skeleton with parameters on the meta device (accelerate's
``init_empty_weights``: buffers such as rotary frequencies are computed as usual), swaps each ``nn.Linear`` that
`lorakit.quant.quantize_model` would quantize for an empty `QuantizedLinear`, then reads the checkpoint one tensor
at a time (``model.safetensors``, or every shard of ``model.safetensors.index.json``): a Linear weight is
quantized as soon as it is read and its full-precision bytes are dropped; every other tensor is stored in the
model's dtype. Tensors are read with ``pread`` at the offsets the header gives, into memory the process owns, so
no file stays memory-mapped: a mapped file's pages stay in the resident set for as long as any tensor from it
lives (SmolLM2 nf4 loading peak: 559 MiB mapped and quantized afterwards, 236 MiB read and quantized tensor by
tensor; docs/scaling.md).

Without a scheme it reads a base stored in another dtype than the file's (``train.dtype: bf16`` from an fp32
checkpoint) the same way: no mapped file pages beside the bf16 copies (SmolLM2: 540 MB of fp32 pages).

The result equals ``quantize_model(AutoModel.from_pretrained(folder, dtype=...), scheme, skip)`` exactly
(tests/test_quant.py): the same rounding to the model's dtype before quantizing, the same tied weights, and a
new task head (weights not in the checkpoint) drawn by transformers' own initialisation from the same seed.
A checkpoint this reader cannot map onto the model (renamed legacy keys, weights missing outside the head, other
shapes, ``.bin`` files) returns None, and the caller loads it the old way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .files import ST_DTYPES, read_safetensors_header
from .quant import QuantizedLinear, Scheme, quantized_linear_names

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(folder: Path) -> list[Path] | None:
    """The safetensors file(s) of a model folder: ``model.safetensors`` or the shards named by
    ``model.safetensors.index.json``; None when the folder has neither (e.g. ``pytorch_model.bin``)."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / INDEX_FILE
    if not index.is_file():
        return None
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        return None
    files = [folder / name for name in sorted(set(weight_map.values()))]
    if any(Path(name).name != name or not (folder / name).is_file() for name in set(weight_map.values())):
        return None  # a shard outside the folder, or missing: not ours to read
    return files


def read_tensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    """``(key, tensor)`` of a safetensors file one at a time, each read with ``pread`` into its own CPU buffer
    (no memory map), in file order. The header is checked first (`lorakit.files.read_safetensors_header`)."""
    if sys.byteorder != "little":  # safetensors stores little-endian bytes
        raise OSError("reading safetensors byte ranges needs a little-endian machine")
    entries, _, total = read_safetensors_header(path)
    body_start = total - max((end for *_, end in entries.values()), default=0)
    fd = os.open(path, os.O_RDONLY)
    try:
        for key, (dtype, shape, start, end) in sorted(entries.items(), key=lambda item: item[1][2]):
            buffer = torch.empty(end - start, dtype=torch.uint8)
            view, done = memoryview(buffer.numpy()), 0
            while done < end - start:  # pread may return fewer bytes than asked
                got = os.preadv(fd, [view[done:]], body_start + start + done)
                if got <= 0:
                    raise OSError(f"{path}: file ended while reading tensor {key!r}")
                done += got
            yield key, buffer.view(ST_DTYPES[dtype]).reshape(shape)
            del buffer, view  # the caller's reference is the last one: freed before the next read
    finally:
        os.close(fd)


def _owners(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, bool]]]:
    """Every state-dict key -> the (module, attribute, is_parameter) places that hold it; tied weights have
    several places under their first name."""
    places: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    first: dict[int, str] = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        places.setdefault(id(tensor), []).append((model.get_submodule(owner), leaf, True))
        first.setdefault(id(tensor), name)
    for name, tensor in model.state_dict(keep_vars=True).items():  # persistent buffers
        if id(tensor) not in first:
            owner, _, leaf = name.rpartition(".")
            places[id(tensor)] = [(model.get_submodule(owner), leaf, False)]
            first[id(tensor)] = name
    return {name: places[key] for key, name in first.items()}


def _key_map(file_keys: list[str], model_keys: set[str], prefix: str) -> dict[str, str]:
    """Checkpoint key -> model key: equal, or with the base model's prefix added or removed (a ``BertModel``
    checkpoint read into ``BertForSequenceClassification`` and the other way round)."""
    mapping = {}
    for key in file_keys:
        for candidate in (key, f"{prefix}.{key}" if prefix else key,
                          key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key):
            if candidate in model_keys:
                mapping[key] = candidate
                break
    return mapping


def _skeleton(auto: Any, config: Any, dtype: torch.dtype, scheme: Scheme | None,
              skip: tuple[str, ...]) -> tuple[nn.Module, set[str]]:
    """The model with parameters on the meta device, its quantized Linears swapped for empty `QuantizedLinear`
    layers; returns it and the module names of those layers."""
    from accelerate import init_empty_weights

    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=dtype)
    model.tie_weights()
    names = quantized_linear_names(model, skip) if scheme else []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, QuantizedLinear.empty(linear, scheme))
    return model, set(names)


def load_while_reading(folder: Path, auto: Any, config: Any, scheme: Scheme | None, skip: tuple[str, ...] = (),
                       dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict[str, list]] | None:
    """A model of class ``auto`` (a transformers Auto class) with ``config``, read from ``folder`` in ``dtype``
    with its Linear layers quantized as they are read (``scheme`` int8 | nf4; None: none quantized, e.g. a
    bf16 base read from an fp32 file without mapping the file); and transformers' loading info (missing /
    unexpected / mismatched keys). New head weights are drawn from the global RNG (seed it around the call). None when the
    checkpoint cannot be mapped onto the model without transformers' key conversions (then load it the old way).
    """
    files = checkpoint_files(folder)
    if files is None:
        return None
    model, quantized = _skeleton(auto, config, dtype, scheme, skip)
    if dtype != torch.float32 and (getattr(model, "_keep_in_fp32_modules", None)
                                   or getattr(model, "_keep_in_fp32_modules_strict", None)):
        return None  # transformers keeps some modules fp32 in a low-precision load: its own loader decides
    owners = _owners(model)
    weight_keys = {f"{name}.weight": name for name in quantized}
    headers = {path: read_safetensors_header(path)[0] for path in files}
    file_keys = [key for entries in headers.values() for key in entries]
    mapping = _key_map(file_keys, set(owners) | set(weight_keys), getattr(model, "base_model_prefix", ""))
    shapes = {key: entries[key][1] for entries in headers.values() for key in entries}
    mismatched = [(k, shapes[k], _expected_shape(model, owners, weight_keys, v)) for k, v in mapping.items()
                  if list(shapes[k]) != list(_expected_shape(model, owners, weight_keys, v))]
    for key, *_ in mismatched:
        del mapping[key]
    missing = sorted((set(owners) | set(weight_keys)) - set(mapping.values()))
    if not _only_in_head(model, missing) or any(k in weight_keys.values() for k in missing):
        log.info("%s: checkpoint keys do not map onto %s one to one; loading it whole, then quantizing", folder,
                 type(model).__name__)
        return None
    for path in files:
        for key, tensor in read_tensors(path):
            target = mapping.get(key)
            if target in weight_keys:
                layer = model.get_submodule(weight_keys[target])
                layer.quantize_(tensor.to(layer.compute_dtype))  # rounded to the model's dtype first, as before
            elif target is not None:
                _assign(owners[target], tensor)
            del tensor  # this tensor's full-precision bytes go now, before the next is read
    _initialise_missing(model, missing)
    info = {"missing_keys": missing, "unexpected_keys": sorted(set(file_keys) - set(mapping)
                                                                       - {k for k, *_ in mismatched}),
                    "mismatched_keys": mismatched}
    _generation_config(model, folder)
    model.config.name_or_path = str(folder)
    return model, info


def _expected_shape(model: nn.Module, owners: dict, weight_keys: dict[str, str], key: str) -> tuple[int, ...]:
    if key in weight_keys:
        layer = model.get_submodule(weight_keys[key])
        return layer.out_features, layer.in_features
    module, leaf, _ = owners[key][0]
    return tuple(getattr(module, leaf).shape)


def _only_in_head(model: nn.Module, keys: list[str]) -> bool:
    """Whether every key lies in the task head: a top-level module other than the base model (as
    `lorakit.models` reports a new head)."""
    prefix = getattr(model, "base_model_prefix", "")
    return all(bool(prefix) and hasattr(model, prefix) and key.split(".", 1)[0] != prefix for key in keys)


def _assign(places: list[tuple[nn.Module, str, bool]], tensor: Tensor) -> None:
    """Put ``tensor`` (in the skeleton's dtype for floating tensors) in every place that holds this key, keeping
    tied weights one Parameter and each parameter's ``requires_grad``."""
    module, leaf, is_param = places[0]
    old = getattr(module, leaf)
    value = tensor.to(old.dtype) if tensor.is_floating_point() else tensor
    new = nn.Parameter(value, requires_grad=old.requires_grad) if is_param else value
    for owner, name, _ in places:
        setattr(owner, name, new)


def _initialise_missing(model: nn.Module, missing: list[str]) -> None:
    """Draw the head weights the checkpoint lacks with the model's own ``_init_weights`` (transformers'
    ``initialize_weights`` visits only modules not flagged as loaded, as `from_pretrained` does)."""
    missing_set = set(missing)
    for name, module in model.named_modules():
        loaded = True
        for leaf, param in list(module.named_parameters(recurse=False)):
            if (f"{name}.{leaf}" if name else leaf) in missing_set:  # only the missing tensors get memory
                setattr(module, leaf, nn.Parameter(torch.empty_like(param, device="cpu"),
                                                   requires_grad=param.requires_grad))
                loaded = False
        # building the skeleton flagged every module as initialised (on meta): only loaded ones keep the flag
        module._is_hf_initialized = loaded
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name not in missing_set:
            tensor._is_hf_initialized = True
    if missing:
        model.initialize_weights()
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"quantized loading left {', '.join(leftover[:4])} uninitialised")


def _generation_config(model: nn.Module, folder: Path) -> None:
    """The folder's ``generation_config.json``, as `from_pretrained` reads it (generative models only)."""
    if not (folder / "generation_config.json").is_file() or not getattr(model, "can_generate", lambda: False)():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        log.warning("%s: generation_config.json not read (%s)", folder, str(err).splitlines()[0])
