"""Many adapters on one model: switch, disable, delete, combine, route per batch row, merge and unload.

The model keeps its adapters' configs and the active list in ``model._lorakit`` (a `LoraState`); each LoRA
layer keeps its own tensors. Merging is explicit and reversible (``merged_adapters`` per layer), never a side
effect of ``.eval()``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch
from torch import nn

from .config import LoraConfig
from .errors import AdapterStateError, ConfigError
from .hf import attach_model_methods, detach_model_methods
from .layers import LoraLayer, ModulesToSave
from .routing import Routing

_STATE_ATTR = "_lorakit"


@dataclass
class LoraState:
    """Model-level bookkeeping: the config of every adapter and which ones are active."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def lora_state(model: nn.Module, create: bool = False) -> LoraState | None:
    state = model.__dict__.get(_STATE_ATTR)
    if state is None and create:
        state = LoraState()
        model.__dict__[_STATE_ATTR] = state
        attach_model_methods(model)  # a transformers model's save_pretrained writes the adapters (lorakit.hf)
    return state


def _drop_state(model: nn.Module) -> None:
    """The model holds no adapter any more: forget its state; transformers' own methods apply again."""
    del model.__dict__[_STATE_ATTR]
    detach_model_methods(model)


@dataclass
class ModelFlags:
    """The train/eval mode of every module and ``requires_grad`` of every parameter of a model, taken before a
    change so it can be put back: loading an adapter never changes the mode of a module that was there, and a
    failed load leaves both flags exactly as they were."""

    modes: list[tuple[nn.Module, bool]]
    grads: list[tuple[nn.Parameter, bool]]

    @classmethod
    def of(cls, model: nn.Module) -> "ModelFlags":
        return cls([(m, m.training) for m in model.modules()], [(p, p.requires_grad) for p in model.parameters()])

    def restore_modes(self) -> None:
        """Put back the train/eval mode of every module recorded (modules added since keep theirs)."""
        for module, training in self.modes:
            module.training = training

    def restore(self) -> None:
        """Put back the train/eval modes and every recorded parameter's ``requires_grad``."""
        self.restore_modes()
        for param, requires_grad in self.grads:
            param.requires_grad_(requires_grad)


#: longest adapter name; names are folder names in PEFT's multi-adapter layout and keys in state dicts
MAX_ADAPTER_NAME = 128


def check_adapter_name(name: object, source: str = "adapter name") -> str:
    """``name`` if it can name an adapter: a non-empty string of at most `MAX_ADAPTER_NAME` characters without
    dots (state-dict keys are dotted paths), path separators or control characters (it names a sub-folder when
    saved: ``/tmp/x`` or ``..`` must never make a write leave its folder); `AdapterStateError` otherwise."""
    if not isinstance(name, str) or not name or len(name) > MAX_ADAPTER_NAME or any(
            c in "./\\" or not c.isprintable() for c in name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise AdapterStateError(f"{source} must be a non-empty string of at most {MAX_ADAPTER_NAME} characters "
                                f"without dots, slashes or control characters, got {shown}")
    return name


def _require_state(model: nn.Module) -> LoraState:
    state = lora_state(model)
    if state is None or not state.configs:
        raise AdapterStateError("this model has no LoRA adapters; add one with lorakit.inject(model, LoraConfig(...))")
    return state


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLayer | ModulesToSave]]:
    """Every LoRA layer and modules_to_save wrapper in the model, with its name, in ``named_modules`` order.

    The walk does not descend into a LoRA layer (its base layer is a leaf and its adapters hold no LoRA
    layers): with many adapters those sub-modules outnumber the model's own many times over, and `route`
    walks the model on every mixed batch."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        prefix, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield prefix, module
            if isinstance(module, LoraLayer):
                # nested wrappers: parameter targets (first one innermost), MultiheadAttention's out_proj
                stack.extend((f"{prefix}.{path}", inner) for path, inner in reversed(module.nested_layers()))
                continue
        children = [(f"{prefix}.{name}" if prefix else name, child)
                    for name, child in module._modules.items() if child is not None]
        stack.extend(reversed(children))


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in lora_modules(model):
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    state = lora_state(model)
    return list(state.configs) if state else []


def active_adapters(model: nn.Module) -> list[str]:
    state = lora_state(model)
    return list(state.active) if state else []


def get_config(model: nn.Module, adapter_name: str) -> LoraConfig:
    _check_known(_require_state(model), [adapter_name])
    return _require_state(model).configs[adapter_name]


def _check_known(state: LoraState, names: Sequence[str]) -> None:
    for name in names:
        if name not in state.configs:
            raise AdapterStateError(f"no adapter named {name!r} on this model (adapters: {list(state.configs)})")


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> None:
    """Activate one adapter, or several (their updates are summed). Only active adapters train."""
    state = _require_state(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    if not names:
        raise AdapterStateError("set_adapter needs at least one adapter name; use disable_adapters() for the base")
    _check_known(state, names)
    state.active = names
    for _, module in lora_modules(model):
        module.active_adapters = [n for n in names if n in module.adapter_names()]
    update_trainable(model)


def update_trainable(model: nn.Module) -> None:
    """Freeze everything, then unfreeze the active adapters, their modules_to_save copies and biases per config."""
    state = _require_state(model)
    for param in model.parameters():
        param.requires_grad_(False)
    bias_all = any(state.configs[n].bias == "all" for n in state.active)
    if bias_all:
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.requires_grad_(True)
    for _, module in lora_modules(model):
        for name in module.active_adapters:
            for param in module.adapter_parameters(name):
                param.requires_grad_(True)
            if (isinstance(module, LoraLayer) and state.configs[name].bias == "lora_only"
                    and module.bias is not None):
                module.bias.requires_grad_(True)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes the base output. Merged adapters are unmerged for the block and
    merged back after it."""
    _require_state(model)
    merged = {name: list(layer.merged_adapters) for name, layer in lora_layers(model)}
    unmerge(model)
    modules = list(lora_modules(model))
    for _, module in modules:
        module.disabled = True
    try:
        yield
    finally:
        for _, module in modules:
            module.disabled = False
        with torch.no_grad():
            for name, layer in lora_layers(model):
                for adapter in merged.get(name, []):
                    layer.commit_merge(adapter, layer.merged_weight(adapter))


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter everywhere; layers left with no adapter go back to their plain base layer."""
    state = _require_state(model)
    _check_known(state, [adapter_name])
    if any(adapter_name in layer.merged_adapters for _, layer in lora_layers(model)):
        raise AdapterStateError(f"adapter {adapter_name!r} is merged into the weights; unmerge(model) first")
    for name, module in reversed(list(lora_modules(model))):  # nested wrappers: the inner one first
        if adapter_name not in module.adapter_names():
            continue
        module.remove(adapter_name)
        if not module.adapter_names():
            replace_module(model, name, module.base_layer if isinstance(module, LoraLayer) else module.original_module)
    del state.configs[adapter_name]
    state.active = [n for n in state.active if n != adapter_name]
    if state.configs:
        update_trainable(model)
    else:
        _drop_state(model)


@contextmanager
def route(model: nn.Module, adapter_names: Sequence[str | None], shared: Sequence[str] = (),
          modules: Sequence[LoraLayer | ModulesToSave] | None = None) -> Iterator[None]:
    """Mixed batch: row ``i`` of every forward inside the block uses adapter ``adapter_names[i]`` (None: the
    base model). One pass over the model, rows batched per layer; gradients flow to every named adapter.

    ``shared`` adapters are added on every row as well (a shared part plus a per-row task part, as in MTLoRA);
    row ``i`` then computes what ``set_adapter(model, [*shared, adapter_names[i]])`` computes, except that
    ``modules_to_save`` copies follow the row's own adapter only.

    ``modules``: the model's ``lora_modules`` listed by the caller, who keeps the list while the adapters do not
    change (the server routes every decoding step; walking the module tree each time cost ~0.2 s per step with
    16 all-linear adapters on SmolLM2). Default: walk the model.

    Without autograd each linear layer reuses its stacked adapters while they are unchanged (in-place updates,
    ``.data =``, replaced parameters or modules and new scalings are seen); a weight written around autograd's
    version counter (``param.data.copy_(...)``, raw pointers as in bitsandbytes' optimizers) is read after the next
    ``model.train()`` / ``model.eval()``."""
    state = _require_state(model)
    distinct = list(dict.fromkeys(n for n in adapter_names if n is not None))
    shared = list(dict.fromkeys(shared))
    _check_known(state, distinct + shared)
    if set(shared) & set(distinct):
        raise AdapterStateError(f"adapter(s) {sorted(set(shared) & set(distinct))} are both shared and per-row; "
                                "each row would get them twice")
    modules = [module for _, module in lora_modules(model)] if modules is None else list(modules)
    if any(isinstance(m, LoraLayer) and m.merged for m in modules):
        raise AdapterStateError("mixed batches need unmerged adapters; unmerge(model) first")
    device = next(model.parameters()).device
    routing = Routing.for_rows(adapter_names, device, shared)
    for module in modules:
        module.routing = routing
    try:
        yield
    finally:
        for module in modules:
            module.routing = None


def merge(model: nn.Module, adapters: Sequence[str] | None = None, safe: bool = True) -> list[str]:
    """Fold adapters (default: the active ones) into the base weights; returns the names merged.

    With ``safe=True`` the merged weights are checked for NaN/inf first and the merge is refused (weights
    untouched) if any appear. Merging an adapter twice is an error; `unmerge` undoes it exactly (up to
    floating-point rounding).
    """
    state = _require_state(model)
    names = list(state.active if adapters is None else adapters)
    _check_known(state, names)
    return _merge(model, names, safe)


def _merge(model: nn.Module, names: list[str], safe: bool) -> list[str]:
    layers = list(lora_layers(model))
    for layer_name, layer in layers:
        for name in names:
            if name in layer.merged_adapters:
                raise AdapterStateError(f"adapter {name!r} is already merged (in {layer_name}); unmerge(model) "
                                        "first, or merge only adapters that are not merged yet")
    backups: list[tuple[LoraLayer, dict[str, torch.Tensor], int]] = []
    with torch.no_grad():
        try:
            for layer_name, layer in layers:
                todo = [n for n in names if n in layer.r]
                if not todo:
                    continue
                if safe:
                    backups.append((layer, layer.base_snapshot(), len(layer.merged_adapters)))
                for name in todo:
                    new_weight = layer.merged_weight(name)
                    if safe and not torch.isfinite(new_weight).all():
                        raise AdapterStateError(f"merging adapter {name!r} into {layer_name} gives NaN/inf weights; "
                                                "nothing was merged. Check the adapter (or merge with safe=False)")
                    layer.commit_merge(name, new_weight)
        except AdapterStateError:
            for layer, snapshot, n_merged in reversed(backups):
                layer.restore_base(snapshot)
                del layer.merged_adapters[n_merged:]
            raise
    return names


def unmerge(model: nn.Module) -> list[str]:
    """Undo every merge (in reverse order); returns the adapter names that were merged."""
    undone: dict[str, None] = {}
    for _, layer in lora_layers(model):
        undone.update(dict.fromkeys(layer.merged_adapters))
        layer.unmerge()
    return list(undone)


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every lorakit module and return the plain model (same object; ``save_pretrained`` works).

    ``merge=True`` first merges the active adapters and keeps the active adapter's copy of each
    ``modules_to_save`` module; ``merge=False`` unmerges and returns the base model's own modules.
    """
    state = _require_state(model)
    if merge:
        todo = [n for n in state.active if not all(n in layer.merged_adapters or n not in layer.r
                                                     for _, layer in lora_layers(model))]
        _merge(model, todo, safe=True)
    else:
        unmerge(model)
    for name, module in reversed(list(lora_modules(model))):  # nested wrappers: the inner one first
        if isinstance(module, LoraLayer):
            replace_module(model, name, module.base_layer)
        else:
            replace_module(model, name, module.active_module() if merge else module.original_module)
    _drop_state(model)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def add_weighted_adapter(model: nn.Module, sources: Sequence[str], weights: Sequence[float], name: str,
                         method: Literal["linear", "cat", "svd"] = "linear", svd_rank: int | None = None) -> None:
    """Combine existing adapters into a new one, ``name`` (inactive until `set_adapter`).

    - ``linear``: ``A = sum sqrt(|w_i| s_i) A_i``, ``B = sum sign(w_i) sqrt(|w_i| s_i) B_i`` (equal ranks needed;
      cross terms make this an approximation of the weighted sum, as in PEFT).
    - ``cat``: ranks concatenated, exactly ``sum w_i s_i B_i A_i``.
    - ``svd``: the rank-``svd_rank`` (default: largest source rank) truncated SVD of ``sum w_i s_i B_i A_i``.
    The new adapter has scaling 1 (alpha = rank) and no modules_to_save copies.
    """
    state = _require_state(model)
    if method not in ("linear", "cat", "svd"):
        raise ConfigError(f"method must be 'linear', 'cat' or 'svd', got {method!r}")
    if not sources or len(sources) != len(weights):
        raise ConfigError(f"need one weight per source adapter, got {len(sources)} sources and {len(weights)} weights")
    _check_known(state, sources)
    if name in state.configs:
        raise AdapterStateError(f"an adapter named {name!r} already exists; pick another name")
    layers = [(ln, layer) for ln, layer in lora_layers(model) if any(s in layer.r for s in sources)]
    for ln, layer in layers:
        if any(s in layer.lora_magnitude_vector for s in sources):
            raise ConfigError(f"{ln}: DoRA adapters cannot be combined (their magnitude is not additive)")
        ranks = {layer.r[s] for s in sources if s in layer.r}
        if method == "linear" and (len(ranks) > 1 or not all(s in layer.r for s in sources)):
            raise ConfigError(f"method='linear' needs every source on every layer with one rank; {ln} has ranks "
                              f"{sorted(ranks)} for {[s for s in sources if s in layer.r]}: use 'cat' or 'svd'")
    first = state.configs[sources[0]]
    rank_pattern: dict[str, int] = {}
    with torch.no_grad():
        for ln, layer in layers:
            parts = [(layer.ab_weights(s), layer.scaling[s], w) for s, w in zip(sources, weights) if s in layer.r]
            if method == "linear":
                A = sum(math.sqrt(abs(w) * s) * a for (a, _), s, w in parts)
                B = sum(math.copysign(math.sqrt(abs(w) * s), w) * b for (_, b), s, w in parts)
            elif method == "cat":
                A = torch.cat([a for (a, _), _, _ in parts], dim=0)
                B = torch.cat([b * (w * s) for (_, b), s, w in parts], dim=1)
            else:
                A, B = _svd_combine(parts, svd_rank or max(layer.r[s] for s in sources if s in layer.r))
            r = A.shape[0]
            rank_pattern[re.escape(ln)] = r
            layer.add(name, r, r, first.dropout, "default", use_rslora=False, use_dora=False)
            a_new, b_new = layer.ab_weights(name)
            a_new.copy_(A)
            b_new.copy_(B)
    base_rank = max(rank_pattern.values())
    state.configs[name] = LoraConfig(
        r=base_rank, alpha=base_rank, dropout=first.dropout, target_modules=[ln for ln, _ in layers],
        rank_pattern={k: v for k, v in rank_pattern.items() if v != base_rank},
        alpha_pattern={k: v for k, v in rank_pattern.items() if v != base_rank},
        task_type=first.task_type, base_model_name_or_path=first.base_model_name_or_path)
    for _, layer in layers:
        for param in layer.adapter_parameters(name):
            param.requires_grad_(False)


def copy_modules_to_save(model: nn.Module, source: str, target: str) -> None:
    """Give adapter ``target`` frozen copies of adapter ``source``'s ``modules_to_save`` (parameters and buffers,
    e.g. a classifier head, a trained BatchNorm's running statistics) and list them in ``target``'s config:
    what a combined adapter (`add_weighted_adapter`, which has none) needs to be used, or saved, for a task."""
    state = _require_state(model)
    _check_known(state, [source, target])
    for _, module in lora_modules(model):
        if isinstance(module, ModulesToSave) and source in module.modules_to_save:
            if target not in module.modules_to_save:
                module.add(target)
            module.modules_to_save[target].load_state_dict(module.modules_to_save[source].state_dict())
            module.modules_to_save[target].requires_grad_(False)
    state.configs[target] = dataclasses.replace(state.configs[target],
                                                modules_to_save=state.configs[source].modules_to_save)


def _svd_combine(parts: list, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``sum w s B A`` with A, B flattened to matrices (conv kernels, embedding tables)."""
    (a0, b0), _, _ = parts[0]
    delta = sum((w * s) * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)) for (a, b), s, w in parts)
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    rank = min(rank, S.numel())
    A = Vh[:rank].reshape(rank, *a0.shape[1:])
    B = (U[:, :rank] * S[:rank]).reshape(b0.shape[0], rank, *b0.shape[2:])
    return A.to(a0.dtype), B.to(b0.dtype)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the sub-module called ``name`` (a dotted path; the wrapping and unwrapping of
    layers by `lorakit.inject.add_adapter`, `delete_adapter` and `unload`)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)

