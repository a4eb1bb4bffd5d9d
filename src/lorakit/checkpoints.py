"""Training checkpoints that resume exactly and run no code when read.

A checkpoint is one safetensors file, ``OUTPUT/checkpoint.safetensors``: its tensors are the trainable
parameters (``trainable.NAME``), the buffers of trained modules (``buffers.NAME``: e.g. the running statistics
of a BatchNorm trained as a ``modules_to_save`` copy), the optimizer's state tensors and the torch RNG states;
everything else (step, epoch, data position, scheduler state, the optimizer's hyper-parameters, Python and
NumPy RNG states, the recipe) is JSON in the file's ``__metadata__``. Reading it parses JSON and copies tensor
bytes: no pickle, so a crafted file cannot run anything. It is written atomically (a temporary file, then one
rename), so a killed run leaves the previous checkpoint intact.

The old format (``checkpoint.pt``, a pickle) is read only through ``torch.load(weights_only=True)``, which
refuses any object other than tensors and plain containers; a file it refuses is reported, never executed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .errors import AdapterError, TrainingError
from .files import read_safetensors, remove_stale_staging, safetensors_bytes, write_bytes

CHECKPOINT_FILE = "checkpoint.safetensors"
SHARDED_DIR = "sharded-checkpoint"  # a train.sharding=fsdp run's checkpoints (lorakit.sharded_checkpoints)
LEGACY_CHECKPOINT_FILE = "checkpoint.pt"  # the pickle format of lorakit <= 0.1 (read with weights_only=True)
FORMAT = 2
_METADATA_KEY = "lorakit_checkpoint"
#: what a checkpoint's JSON holds besides its tensors
REQUIRED = ("format", "recipe", "trainable", "buffers", "optimizer", "scheduler", "loop", "rng")


@dataclass
class Checkpoint:
    """A checkpoint as read back: tensors by name and the JSON-able rest."""

    trainable: dict[str, Tensor]  # parameter name -> value
    buffers: dict[str, Tensor]  # buffer name -> value (buffers of modules with trainable parameters)
    optimizer: dict[str, Any]  # ``optimizer.state_dict()``
    scheduler: dict[str, Any]  # ``scheduler.state_dict()``
    loop: dict[str, Any]  # where the loop is (`lorakit.train.LoopState` as a dict)
    rng: dict[str, Any]  # `rng_state`
    recipe: dict[str, Any]


# -- what is saved ---------------------------------------------------------------------------------------------
def trained_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Buffers of every module that has a trainable parameter of its own: the running statistics of a trained
    normalisation layer (full fine-tuning, or a ``modules_to_save`` copy). Frozen modules' buffers never change
    during training and are not saved."""
    out = {}
    for prefix, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and name not in module._non_persistent_buffers_set:
                    out[f"{prefix}.{name}" if prefix else name] = buffer
    return out


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from: torch (CPU and each CUDA device), Python's `random`, NumPy's global one."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned (``cuda`` only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# -- JSON + tensors encoding ---------------------------------------------------------------------------------------
def encode_state(value: Any, name: str, tensors: dict[str, Tensor]) -> Any:
    """``value`` as JSON, its tensors moved to ``tensors`` under ``name``-derived keys. Tuples, NumPy arrays
    and dicts with non-string keys (optimizer state is keyed by parameter index) are tagged to come back as they
    were. Also used by `lorakit.sharded_checkpoints`, so both checkpoint kinds encode the same way."""
    if isinstance(value, Tensor):
        tensors[name] = value.detach().cpu().clone().contiguous()
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [encode_state(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_state(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode_state(v, f"{name}.{k}", tensors) for k, v in value.items()}
        return {"__items__": [[encode_state(k, f"{name}.key{i}", tensors),
                               encode_state(v, f"{name}.{k}", tensors)] for i, (k, v) in enumerate(value.items())]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint cannot hold a {type(value).__name__} ({name})")


def decode_state(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    """The value `encode_state` encoded, its tensors taken from ``tensors`` (`KeyError` for a missing one)."""
    if isinstance(value, list):
        return [decode_state(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]  # KeyError: reported by the caller as a damaged file
    if "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=np.dtype(value["dtype"]))
    if "__tuple__" in value:
        return tuple(decode_state(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {decode_state(k, tensors): decode_state(v, tensors) for k, v in value["__items__"]}
    return {k: decode_state(v, tensors) for k, v in value.items()}


# -- writing and reading ---------------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    loop: Mapping[str, Any], recipe: Mapping[str, Any], rng: Mapping[str, Any]) -> Path:
    """Write a checkpoint of ``model``'s trainable parameters and trained buffers, ``optimizer``, ``scheduler``,
    the loop position ``loop`` (JSON-able), ``recipe`` and the RNG states ``rng`` (`rng_state` at the step
    boundary ``loop`` describes) to ``path``, atomically. Ctrl-C is held off for the write and the rename."""
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    payload = {
        "format": FORMAT,
        "recipe": dict(recipe),
        "trainable": encode_state({n: p for n, p in model.named_parameters() if p.requires_grad}, "trainable", tensors),
        "buffers": encode_state(trained_buffers(model), "buffers", tensors),
        "optimizer": encode_state(optimizer.state_dict(), "optimizer", tensors),
        "scheduler": encode_state(scheduler.state_dict(), "scheduler", tensors),
        "loop": encode_state(dict(loop), "loop", tensors),
        "rng": encode_state(dict(rng), "rng", tensors),
    }
    data = safetensors_bytes(tensors, {_METADATA_KEY: json.dumps(payload)})
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        return write_bytes(path, data)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def checkpoint_path(folder: str | os.PathLike) -> Path:
    """The checkpoint of an output folder: ``checkpoint.safetensors``, or an old ``checkpoint.pt`` when only
    that exists."""
    folder = Path(folder)
    current, legacy = folder / CHECKPOINT_FILE, folder / LEGACY_CHECKPOINT_FILE
    return legacy if legacy.is_file() and not current.is_file() else current


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint without running anything from it; `TrainingError` naming the file for an unreadable,
    damaged or incomplete one (fix: start without ``--resume``, or a new ``--output``)."""
    path = Path(path)
    if not path.is_file():
        if (path.parent / SHARDED_DIR).is_dir():
            raise TrainingError(f"--resume: {path.parent} holds the checkpoint of a train.sharding=fsdp run; "
                                "resume it with train.sharding=fsdp")
        raise TrainingError(f"--resume: no checkpoint at {path}; start without --resume")
    payload = _read_legacy(path) if path.suffix == ".pt" else _read_current(path)
    missing = [key for key in REQUIRED if key not in payload and not (key == "buffers" and payload.get("format") == 1)]
    if missing:
        raise TrainingError(f"--resume: checkpoint {path} lacks {missing}: it is damaged or not a lorakit "
                            "checkpoint; start without --resume or use a new --output")
    for key in ("trainable", "buffers"):
        values = payload.get(key, {})
        if not isinstance(values, dict) or not all(isinstance(v, Tensor) for v in values.values()):
            raise TrainingError(f"--resume: checkpoint {path}: {key!r} is not a mapping of tensors (damaged file)")
    for key in ("optimizer", "scheduler", "loop", "rng", "recipe"):
        if not isinstance(payload[key], dict):
            raise TrainingError(f"--resume: checkpoint {path}: {key!r} is not a mapping (damaged file)")
    return Checkpoint(payload["trainable"], payload.get("buffers", {}), payload["optimizer"], payload["scheduler"],
                      payload["loop"], payload["rng"], payload["recipe"])


def _read_current(path: Path) -> dict[str, Any]:
    from .files import loads_json

    try:
        tensors, metadata = read_safetensors(path)
        if _METADATA_KEY not in metadata:
            raise AdapterError(f"{path} holds no lorakit checkpoint metadata")
        payload = loads_json(metadata[_METADATA_KEY], f"{path}: checkpoint metadata")
        if not isinstance(payload, dict):
            raise AdapterError(f"{path}: checkpoint metadata is not a JSON object")
        return decode_state(payload, tensors)
    except AdapterError as err:
        raise TrainingError(f"--resume: checkpoint {path} is unreadable ({err}); start without --resume or use "
                            "a new --output") from None
    except (KeyError, TypeError, ValueError) as err:
        raise TrainingError(f"--resume: checkpoint {path} is damaged ({type(err).__name__}: {err}); start "
                            "without --resume or use a new --output") from None


def _read_legacy(path: Path) -> dict[str, Any]:
    """An old pickle checkpoint, through ``weights_only=True`` (tensors and plain containers only; the NumPy RNG
    state's array type is allowed by name). Anything else in the pickle is refused, not run."""
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed it
    reconstruct = getattr(core.multiarray, "_reconstruct", None)
    if reconstruct is not None:
        allowed.append(reconstruct)
    try:
        with torch.serialization.safe_globals(allowed):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError for a refused object, others for a damaged file
        raise TrainingError(f"--resume: checkpoint {path} (old pickle format) cannot be read safely "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); nothing "
                            "in it was run. Start without --resume or use a new --output") from None
    if not isinstance(payload, dict):
        raise TrainingError(f"--resume: checkpoint {path} is not a lorakit checkpoint; start without --resume")
    payload.setdefault("format", 1)
    return payload


def restore_checkpoint(checkpoint: Checkpoint, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any) -> None:
    """Copy ``checkpoint``'s tensors into ``model`` and load the optimizer, scheduler and RNG states;
    `TrainingError` when it was written for another model or recipe (fix: a new ``--output``)."""
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    buffers = trained_buffers(model)
    unexpected = set(checkpoint.buffers) - set(buffers)
    if set(checkpoint.trainable) != trainable or unexpected:
        raise TrainingError(f"--resume: checkpoint {path} was written for another recipe/model "
                            f"(recipe {checkpoint.recipe.get('name')!r}); use a new --output")
    with torch.no_grad():
        for name, tensor in checkpoint.trainable.items():
            _copy(params[name], tensor, name, path)
        for name, tensor in checkpoint.buffers.items():
            _copy(buffers[name], tensor, name, path)
    try:
        optimizer.load_state_dict(checkpoint.optimizer)
        scheduler.load_state_dict(checkpoint.scheduler)
        set_rng_state(checkpoint.rng)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        raise TrainingError(f"--resume: checkpoint {path}: optimizer, scheduler or RNG state does not fit "
                            f"({type(err).__name__}: {err}); use a new --output") from None


def _copy(target: Tensor, value: Tensor, name: str, path: Path) -> None:
    if target.shape != value.shape:
        raise TrainingError(f"--resume: checkpoint {path}: {name} has shape {tuple(value.shape)}, the model's is "
                            f"{tuple(target.shape)}; use a new --output")
    target.copy_(value)


# -- temporary files of killed runs ------------------------------------------------------------------------------
def _temp_files(folder: Path) -> Iterator[tuple[Path, int | None]]:
    """lorakit's own temporary names in ``folder`` with the PID that wrote them (None: unknown)."""
    for pattern in (".checkpoint.pt.*.tmp", f".{CHECKPOINT_FILE}.tmp-*", ".metrics.json.tmp*",
                    ".recipe.yaml.tmp*", ".train_log.jsonl.tmp*", ".training.png.tmp*", ".adapter.tmp-*", ".model.tmp"):
        for entry in folder.glob(pattern):
            parts = entry.name.replace(".tmp-", ".").split(".")
            pid = next((int(p.split("-")[0]) for p in parts if p.split("-")[0].isdigit()), None)
            yield entry, pid
    from .sharded_checkpoints import stale_entries  # late: that module builds on this one

    yield from stale_entries(folder)  # a sharded run's staging folders and superseded step folders


def clean_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that runs killed while writing left in ``folder`` (only lorakit's
    own names, only in ``folder``; a file of a process still running is kept); returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [*remove_stale_staging(folder / "adapter"), *remove_stale_staging(folder / "model")]
    for entry, pid in _temp_files(folder):
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.exists() or entry.is_symlink():
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


__all__ = ["CHECKPOINT_FILE", "Checkpoint", "LEGACY_CHECKPOINT_FILE", "SHARDED_DIR", "checkpoint_path",
           "clean_stale_temp_files", "decode_state", "encode_state", "read_checkpoint", "restore_checkpoint",
           "rng_state", "save_checkpoint", "set_rng_state", "trained_buffers"]
