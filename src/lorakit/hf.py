"""What an adapter file records about a transformers model: PEFT's ``task_type`` (from the model's class, through
`lorakit.tasks`) and the hub id of its base, when that is known, instead of a local cache path.

PEFT's ``AutoPeftModelFor...`` classes pick the model class from ``task_type``, and ``base_model_name_or_path``
is what they download; a path that only exists on the machine that trained the adapter helps nobody else.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

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


__all__ = ["base_model_id", "peft_task_type"]
