"""HF ``Trainer`` and TRL trainers on a model holding lorakit adapters: checkpoints hold the adapter, and resuming
continues training it.

Saving needs nothing here: the model's own ``save_pretrained`` writes the adapters in PEFT's format
(`lorakit.hf`), so ``Trainer`` checkpoints and ``save_model`` hold ``adapter_config.json`` +
``adapter_model.safetensors`` and no base weight. Loading does: transformers' ``Trainer`` reads an adapter
checkpoint back only into a peft ``PeftModel`` (an ``isinstance`` check); for any other model it looks for full
weights and stops (``Can't find a checkpoint index``), and ``load_best_model_at_end`` looks for
``pytorch_model.bin``. `AdapterCheckpoints` is a mixin for any ``Trainer`` class that copies the checkpoint's
adapter back into the model's adapter instead (`restore_adapters`)::

    from lorakit.hf_trainer import AdapterCheckpoints, LoraTrainer   # LoraTrainer = AdapterCheckpoints + Trainer
    class LoraSFTTrainer(AdapterCheckpoints, trl.SFTTrainer): ...

A subclass (not a patch of ``Trainer``): other trainers in the process keep transformers' behaviour.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from .adapters import adapter_names, lora_state
from .config import LoraConfig
from .errors import AdapterError, AdapterStateError, ConfigError, TrainingError
from .fingerprint import base_fingerprint, fingerprint_difference
from .layers import LoraLayer, ModulesToSave
from .peft_format import CONFIG_FILE, adapter_modules, adapter_tensors, read_adapter

#: ``adapter_config.json`` keys that describe where an adapter came from, not what it computes
_PROVENANCE_KEYS = ("task_type", "base_model_name_or_path")


def saved_adapter_names(folder: str | os.PathLike) -> list[str]:
    """The adapters a folder in PEFT's layout holds: ``default`` at the top, the others in sub-folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"checkpoint folder {folder} does not exist")
    top = ["default"] if (folder / CONFIG_FILE).is_file() else []
    return top + sorted(sub.name for sub in folder.iterdir() if sub.is_dir() and (sub / CONFIG_FILE).is_file())


def _config_difference(saved: LoraConfig, own: LoraConfig) -> list[str]:
    """The ``adapter_config.json`` keys on which two configs differ (where they came from aside)."""
    def plain(config: LoraConfig) -> dict[str, Any]:
        return json.loads(json.dumps({k: v for k, v in config.to_peft_dict().items() if k not in _PROVENANCE_KEYS}))

    a, b = plain(saved), plain(own)
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


def _checked_tensors(model: nn.Module, name: str, path: Path) -> list[tuple[Tensor, Tensor]]:
    """(model tensor, checkpoint tensor) pairs for adapter ``name`` from the adapter folder ``path``, after
    checking that the checkpoint was made for this adapter (config), this base (fingerprint) and these shapes."""
    files = read_adapter(path)
    own = lora_state(model).configs[name]
    differ = _config_difference(files.config, own)
    if differ:
        shown = ", ".join(f"{k}: {files.config.to_peft_dict().get(k)!r} saved, {own.to_peft_dict().get(k)!r} now"
                          for k in differ[:3])
        raise AdapterError(f"{path / CONFIG_FILE}: adapter {name!r} was saved with another config ({shown}); "
                           "inject the run's own LoraConfig before resuming")
    if files.fingerprint is not None:
        difference = fingerprint_difference(files.fingerprint, base_fingerprint(model, adapter_modules(model, name)))
        if difference is not None:
            raise AdapterError(f"{files.weights_file} was saved on another base model ({difference}); resume on the "
                               "base the run started from")
    live = adapter_tensors(model, name)
    missing, extra = sorted(set(live) - set(files.tensors)), sorted(set(files.tensors) - set(live))
    if missing or extra:
        raise AdapterError(f"{files.weights_file}: adapter {name!r} does not fit the model's (missing tensors "
                           f"{missing[:3]}, unexpected {extra[:3]})")
    pairs = []
    for key, tensor in live.items():
        saved = files.tensors[key]
        if saved.shape != tensor.shape:
            raise AdapterError(f"{files.weights_file}: {key} has shape {tuple(saved.shape)}, the model's "
                               f"{tuple(tensor.shape)}")
        if saved.dtype.is_floating_point and not bool(torch.isfinite(saved).all()):
            raise AdapterError(f"{files.weights_file}: {key} holds NaN or inf values")
        pairs.append((tensor, saved))
    return pairs


def restore_adapters(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Copy the adapters saved in ``folder`` (PEFT's layout, as the model's ``save_pretrained`` writes it) into
    the model's adapters of the same names, in place; returns their names.

    The model's parameters stay the same objects, with their ``requires_grad``, train/eval modes and the
    references an optimizer holds: a resumed adapter trains on (peft's issue #282 was a resumed adapter left
    frozen). The folder must hold exactly the model's adapters, saved with the same configs on the same base;
    every adapter is checked before the first value is copied, so on any `AdapterError` the model is unchanged.
    """
    names = adapter_names(model)
    if not names:
        raise AdapterStateError(f"{folder} holds a LoRA adapter but the model has none: inject the run's adapter "
                                "(lorakit.inject(model, LoraConfig(...))) before resuming")
    saved = saved_adapter_names(folder)
    if sorted(saved) != sorted(names):
        raise AdapterError(f"{folder} holds adapters {saved or 'none (no ' + CONFIG_FILE + ')'}, the model "
                           f"{names}: resume with the adapters (names and configs) the run was started with")
    pairs = [pair for name in names
             for pair in _checked_tensors(model, name, Path(folder) / ("" if name == "default" else name))]
    with torch.no_grad():
        for tensor, value in pairs:
            tensor.copy_(value)
    return names


class AdapterCheckpoints:
    """Mixin for a transformers ``Trainer`` class (``Trainer``, TRL's ``SFTTrainer``...): on a model holding lorakit
    adapters, ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` copy the checkpoint's adapter
    into the model's (`restore_adapters`); on any other model the trainer behaves exactly as its base class.
    Put it first: ``class LoraSFTTrainer(AdapterCheckpoints, SFTTrainer): ...``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._check_output_layer()

    def _check_output_layer(self) -> None:
        """Refuse LoRA or ``modules_to_save`` on the output layer when the trainer's loss reads its weight directly
        (TRL's fused LM head, a forward that takes ``fused_lm_head``): the adapter there would never run or train
        (TRL refuses the same for peft's layers; lorakit's LoRA layer would be bypassed without a word)."""
        if lora_state(self.model) is None or "fused_lm_head" not in inspect.signature(
                self.model.forward, follow_wrapped=False).parameters:
            return
        getter = getattr(self.model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        if isinstance(head, (LoraLayer, ModulesToSave)):
            raise ConfigError(f"{type(self).__name__} computes the loss from the output layer's weight directly (a "
                              "fused LM head), so LoRA or modules_to_save on it would never train: remove it "
                              "(lm_head) from target_modules/modules_to_save")

    def _lorakit_model(self) -> bool:
        if lora_state(self.model) is None:
            return False
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise TrainingError("Trainer checkpoints of lorakit adapters under FSDP/DeepSpeed are not supported: "
                                "use lorakit's own sharded training (lorakit train, train.sharding=fsdp)")
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self._lorakit_model():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        restore_adapters(self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if not self._lorakit_model():
            return super()._load_best_model()  # type: ignore[misc]
        restore_adapters(self.model, self.state.best_model_checkpoint)


class LoraTrainer(AdapterCheckpoints, Trainer):
    """transformers' ``Trainer`` that resumes (and loads the best checkpoint of) a model holding lorakit adapters."""


__all__ = ["AdapterCheckpoints", "LoraTrainer", "restore_adapters", "saved_adapter_names"]
