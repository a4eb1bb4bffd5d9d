"""Choosing target modules and wrapping them: `inject`, `add_adapter`, `targeting_report`.

Targets are chosen by one data-driven matcher (PEFT's ``target_modules`` semantics): a list of name suffixes,
a regex that must match the full module name, or ``"all-linear"``; then ``exclude_modules`` and
``layers_to_transform`` filter. Every check runs before the model is touched, so a bad config leaves it as it was.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

from torch import nn

from .adapters import check_adapter_name, lora_layers, lora_state, replace_module, set_adapter, update_trainable
from .config import ALL_LINEAR, LoraConfig
from .errors import AdapterStateError, ConfigError, TargetError
from .layers import (LAYER_REGISTRY, LORA_PARTS, LoraLayer, LoraParameter, ModulesToSave, parameter_added_params,
                     wrapper_for)

# Names of the repeated-block lists in common architectures (for ``layers_to_transform``), as PEFT.
COMMON_LAYER_LISTS = ("layers", "h", "block", "blocks", "layer")


@dataclass
class TargetRow:
    """One module the config selects: what it is, the rank it gets and the parameters LoRA adds."""

    name: str
    layer_type: str
    shape: tuple[int, ...]
    r: int
    alpha: float
    added_params: int
    skipped: str | None = None
    #: a parameter target (``target_parameters``): ``name`` is ``module.parameter``
    parameter: bool = False


@dataclass
class TargetingReport:
    """Every module a config selects (or skips, with the reason), the modules trained in full, and totals."""

    rows: list[TargetRow]
    modules_to_save: list[tuple[str, int]] = field(default_factory=list)
    base_params: int = 0

    @property
    def targeted(self) -> list[TargetRow]:
        return [row for row in self.rows if row.skipped is None]

    @property
    def added_params(self) -> int:
        return sum(row.added_params for row in self.targeted)

    @property
    def trainable_params(self) -> int:
        """Adapter parameters plus the full copies of ``modules_to_save``."""
        return self.added_params + sum(n for _, n in self.modules_to_save)

    def to_dict(self) -> dict:
        return {
            "modules": [row.__dict__ | {"shape": list(row.shape)} for row in self.rows],
            "modules_to_save": [{"name": n, "params": p} for n, p in self.modules_to_save],
            "targeted_modules": len(self.targeted),
            "added_params": self.added_params,
            "trainable_params": self.trainable_params,
            "base_params": self.base_params,
            "trainable_fraction": self.trainable_params / max(1, self.base_params + self.trainable_params),
        }

    def __str__(self) -> str:
        header = ("module", "type", "shape", "rank", "alpha", "added params")
        lines = [(r.name, r.layer_type, "x".join(map(str, r.shape)),
                  str(r.r) if r.skipped is None else "-", f"{r.alpha:g}" if r.skipped is None else "-",
                  f"{r.added_params:,}" if r.skipped is None else f"skipped: {r.skipped}") for r in self.rows]
        lines += [(n, "modules_to_save", "", "full", "", f"{p:,}") for n, p in self.modules_to_save]
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*line) for line in lines]
        total = self.base_params + self.trainable_params
        skipped = len(self.rows) - len(self.targeted)
        out.append(f"{len(self.targeted)} modules adapted" + (f", {skipped} skipped" if skipped else "")
                   + f"; trainable {self.trainable_params:,} of {total:,} parameters "
                   f"({100 * self.trainable_params / max(1, total):.3f}%)")
        return "\n".join(out)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add LoRA adapter ``adapter_name`` to ``model`` in place, make it the active one, freeze everything else.

    Returns the same ``model`` object. Raises `TargetError`/`ConfigError`/`AdapterStateError` (model unchanged)
    when the config matches nothing, a rank is invalid, or the name is taken.
    """
    add_adapter(model, adapter_name, config)
    set_adapter(model, adapter_name)
    return model


def add_adapter(model: nn.Module, adapter_name: str, config: LoraConfig) -> None:
    """Add adapter ``adapter_name`` (inactive and frozen until `set_adapter`), wrapping new layers as needed."""
    state = lora_state(model, create=False)
    check_adapter_name(adapter_name)
    if state is not None and adapter_name in state.configs:
        raise AdapterStateError(f"an adapter named {adapter_name!r} already exists on this model "
                                f"(adapters: {list(state.configs)}); pick another name or delete_adapter() it first")
    report = targeting_report(model, config)  # validates everything before any change
    if state is not None and any(m.merged for _, m in lora_layers(model)):
        raise AdapterStateError("adapters are merged into the weights; unmerge(model) before adding another")
    state = lora_state(model, create=True)
    modules = dict(model.named_modules())
    for row in report.targeted:
        if row.parameter:
            _wrap_parameter(model, row, adapter_name, config)
            continue
        module = modules[row.name]
        if not isinstance(module, LoraLayer):
            module = wrapper_for(module)(module).train(module.training)
            replace_module(model, row.name, module)
        module.add(adapter_name, row.r, row.alpha, config.dropout, config.init, config.use_rslora, config.use_dora,
                   config.lora_bias)
        module.attach()
    for name, _ in report.modules_to_save:
        module = modules[name]
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module).train(module.training)
            replace_module(model, name, module)
        module.add(adapter_name)
    state.configs[adapter_name] = config
    update_trainable(model)


def targeting_report(model: nn.Module, config: LoraConfig) -> TargetingReport:
    r"""What ``config`` would do to ``model``: matched modules with shape, rank and added parameters, skipped
    modules with the reason, and totals. Raises when a target matches nothing (listing the closest names).

    A name suffix that names a module lorakit cannot adapt is an error; a regex keeps only adaptable layers
    among its matches (so ``r"features\..*"`` means "every adaptable layer under features")."""
    candidates = list(_candidates(model))
    save_names = _match_modules_to_save(model, config)
    targets = config.target_modules
    matched = _match_targets(model, config, candidates, save_names) if targets or isinstance(targets, str) else []
    rows = []
    owned = _owned_sub_layers(candidates)
    for name, module in matched:
        wrapper = wrapper_for(module)
        layer_type = type(module).__name__
        shape = tuple(module.weight.shape) if hasattr(module, "weight") else ()
        if wrapper is None:
            supported = ", ".join(sorted({cls.__name__ for cls in LAYER_REGISTRY}))
            raise TargetError(f"target {name!r} is a {layer_type}, which lorakit cannot adapt (supported: "
                              f"{supported}); target its linear sub-layers instead, or lorakit.register_layer() "
                              f"a wrapper for {layer_type}")
        r, alpha = config.rank_for(name), config.alpha_for(name)
        # a layer type it cannot take, or a rank/DoRA it cannot take (a grouped conv), is skipped with the reason
        reason = owned.get(name) or wrapper.skip_reason(module) or wrapper.config_problem(module, r, config.use_dora)
        if reason is not None:
            rows.append(TargetRow(name, layer_type, shape, r, alpha, 0, skipped=reason))
            continue
        _check_options(config, name, module, wrapper, r)
        rows.append(TargetRow(name, layer_type, shape, r, alpha, wrapper.added_params(module, r, config.use_dora)))
    rows += _parameter_rows(model, config, candidates, {name for name, _ in matched})
    if not any(row.skipped is None for row in rows):
        raise TargetError("the config adapts no module: every match was skipped ("
                          + "; ".join(f"{row.name}: {row.skipped}" for row in rows) + ")")
    modules = dict(model.named_modules())
    saves = [(n, sum(p.numel() for p in _base_of(modules[n]).parameters())) for n in save_names]
    base_params = sum(p.numel() for n, p in model.named_parameters() if is_base_param(n))
    return TargetingReport(rows, saves, base_params)


def _check_options(config: LoraConfig, name: str, module: nn.Module, wrapper: type[LoraLayer], r: int) -> None:
    """Refuse options the layer cannot take (`ConfigError` with the fix); warn about ranks above its size."""
    layer_type = type(module).__name__
    supported = sorted({cls.__name__ for cls, w in LAYER_REGISTRY.items() if w.supports_dora})
    if config.use_dora and not wrapper.supports_dora:
        raise ConfigError(f"use_dora is supported on {', '.join(supported)} layers; {name!r} is a {layer_type}: "
                          "exclude it (exclude_modules) or turn DoRA off")
    if config.dropout and not wrapper.supports_dropout:
        raise ConfigError(f"dropout is not supported on {layer_type} layers ({name!r}; their LoRA is a weight update "
                          "with no input of its own, PEFT ignores it there): set dropout=0 or exclude it")
    if config.lora_bias and not wrapper.supports_lora_bias:
        raise ConfigError(f"lora_bias is not supported on {layer_type} layers ({name!r}; PEFT has it on Linear, "
                          "Conv1D and convolutions): exclude it or set lora_bias=False")
    limit = wrapper.max_rank(module)
    if config.init == "pissa" and (not wrapper.supports_pissa or r > limit):
        why = f"rank {r} is above the layer's {limit} singular vectors" if wrapper.supports_pissa else \
            "it is supported on Linear/Conv1D layers only"
        raise ConfigError(f"init='pissa' cannot be used on {name!r} ({layer_type}): {why}; exclude it, lower r "
                          "(rank_pattern) or use init='default'")
    if r > limit:
        warnings.warn(f"rank {r} on {name!r} ({layer_type} {tuple(module.weight.shape)}) is above the {limit} "
                      f"directions its update can have: the extra rank adds parameters, not expressiveness "
                      f"(accepted, as in PEFT)", stacklevel=4)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared tensors counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def _owned_sub_layers(candidates: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """Sub-layers whose weight their parent reads without calling them (MultiheadAttention's ``out_proj``): LoRA
    there would never run, so they are skipped with the reason; the parent's wrapper adapts them."""
    owned = {}
    for name, module in candidates:
        wrapper = wrapper_for(module)
        for param in getattr(wrapper, "nested_parameters", {}):
            child = f"{name}.{param.rpartition('.')[0]}"
            owned[child] = (f"{type(module).__name__} {name!r} reads its weight without calling it, so LoRA here "
                            f"would never run: target {name!r} instead (it adapts this layer too)")
    return owned


# -- parameter targets (target_parameters) ----------------------------------------------------------------------
def _parameter_rows(model: nn.Module, config: LoraConfig, candidates: list[tuple[str, nn.Module]],
                    module_targets: set[str]) -> list[TargetRow]:
    """A row per parameter ``target_parameters`` selects (PEFT's rule: ``module.parameter`` equal to a key or
    ending in ``.key``), in module order and each module's parameter registration order (PEFT's nesting order)."""
    keys = config.target_parameters or []
    rows, hit = [], set()
    owners = [("", model), *candidates]
    for name, module in owners:
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{name}.{param_name}" if name else param_name
            found = [k for k in keys if key == k or key.endswith("." + k)]
            if not found:
                continue
            hit.update(found)
            if not name:
                raise ConfigError(f"target_parameters: {key!r} belongs to the top-level model; LoRA on parameters "
                                  "needs a sub-module that owns them (PEFT refuses it too)")
            if name in module_targets:
                raise ConfigError(f"{name!r} is selected by target_modules and its parameter {param_name!r} by "
                                  "target_parameters; choose one")
            if param.dim() not in (2, 3):
                raise ConfigError(f"target_parameters: {key!r} has shape {tuple(param.shape)}; LoRA on parameters "
                                  "takes 2-D (out, in) or 3-D (experts, d1, d2) parameters")
            r, alpha = config.rank_for(key), config.alpha_for(key)
            rows.append(TargetRow(key, "Parameter", tuple(param.shape), r, alpha,
                                  parameter_added_params(tuple(param.shape), r), parameter=True))
    missing = [k for k in keys if k not in hit]
    if missing:
        names = [f"{n}.{p}" for n, m in owners if n for p, _ in m.named_parameters(recurse=False)]
        close = difflib.get_close_matches(missing[0], names, n=5, cutoff=0.3)
        raise TargetError(f"target_parameters entry {missing[0]!r} matches no parameter of this model"
                          + (f"; closest: {', '.join(close)}" if close else ""))
    return rows


class WrapperSlot(NamedTuple):
    """A parameter LoRA wrapper `add_adapter` would create: its parameter (``module.parameter``), rank, alpha and
    the targeting-report row it belongs to (the parameter itself, or a module that adapts a sub-layer too)."""

    key: str
    r: int
    alpha: float
    target: str


def parameter_wrappers(model: nn.Module, config: LoraConfig, report: TargetingReport | None = None
                       ) -> dict[str, WrapperSlot]:
    """``{module path of the wrapper: slot}`` for the parameters ``config`` adapts, as `add_adapter` nests them (new
    wrappers around existing ones, first parameter innermost; MultiheadAttention's ``out_proj`` under it): the
    module names of PEFT's file keys (``experts.base_layer`` for the inner of two). ``report``: the caller's
    ``targeting_report(model, config)``, when it has one (each report walks the whole model)."""
    modules = dict(model.named_modules())
    chains: dict[str, list[str]] = {}  # owner path -> parameter names, outermost wrapper first
    rows, out = (report or targeting_report(model, config)).targeted, {}
    for row in (row for row in rows if not row.parameter):
        base = modules[row.name].base_layer if isinstance(modules[row.name], LoraLayer) else modules[row.name]
        for param, path in getattr(wrapper_for(base), "nested_parameters", {}).items():
            out[f"{row.name}.{path}"] = WrapperSlot(f"{row.name}.{param}", row.r, row.alpha, row.name)
    for row in (row for row in rows if row.parameter):
        path, _, param_name = row.name.rpartition(".")
        if path not in chains:
            chain, module = [], modules[path]
            while isinstance(module, LoraParameter):
                chain.append(module.parameter_name)
                module = module.base_layer
            chains[path] = chain
        if param_name not in chains[path]:
            chains[path].insert(0, param_name)
    for row in (row for row in rows if row.parameter):
        path, _, param_name = row.name.rpartition(".")
        out[path + ".base_layer" * chains[path].index(param_name)] = WrapperSlot(row.name, row.r, row.alpha, row.name)
    return out


def _wrap_parameter(model: nn.Module, row: TargetRow, adapter_name: str, config: LoraConfig) -> None:
    """Add adapter ``adapter_name`` on parameter ``row.name``, reusing its wrapper or nesting a new one outside."""
    path, _, param_name = row.name.rpartition(".")
    outer = model.get_submodule(path)
    module = outer
    while isinstance(module, LoraParameter) and module.parameter_name != param_name:
        module = module.base_layer
    if not isinstance(module, LoraParameter):
        module = LoraParameter(outer, param_name).train(outer.training)
        replace_module(model, path, module)
    module.add(adapter_name, row.r, row.alpha, 0.0, config.init, config.use_rslora, False)


# -- matching ------------------------------------------------------------------------------------------------
def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for every module that could be a target, in ``named_modules`` order; a LoRA wrapper stands for
    its base layer, and lorakit's own sub-modules (lora_A, copies of modules_to_save...) are never candidates.

    The walk does not enter wrappers (as `lora_modules`): with many adapters their sub-modules outnumber the model's
    own, and every load walks the model (SmolLM2, 210 adapted layers: 164 -> a few ms per walk)."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:  # a module reached twice is listed once, at its first place (named_modules' rule)
            continue
        seen.add(id(module))
        if isinstance(module, (LoraLayer, ModulesToSave)):
            inner = module.original_module if isinstance(module, ModulesToSave) else module.base_layer
            while isinstance(inner, LoraParameter):  # parameter targets nest: the module that owns them
                seen.add(id(inner))
                inner = inner.base_layer
            seen.add(id(inner))
            if isinstance(module, LoraLayer):
                yield name, inner
            continue
        if name:
            yield name, module
        children = [(f"{name}.{key}" if name else key, child) for key, child in module._modules.items()
                    if child is not None]
        stack.extend(reversed(children))


def suffix_match(key: str, name: str) -> bool:
    """PEFT's list-entry rule: ``key`` is ``name`` or a dotted suffix of it (``"query"`` matches ``x.query``)."""
    return name == key or name.endswith("." + key)


def dotted_suffixes(name: str) -> list[str]:
    """``name`` and every dotted suffix of it (``a.b.c`` -> ``a.b.c``, ``b.c``, ``c``): the keys `suffix_match` accepts
    for it, so a list of keys is matched with set look-ups instead of comparing every key with every name."""
    out, start = [name], name.find(".")
    while start >= 0:
        out.append(name[start + 1:])
        start = name.find(".", start + 1)
    return out


def _selector(spec: list[str] | str | None) -> Callable[[str], bool]:
    """``name -> selected?`` for a list of name suffixes (PEFT's list rule, set look-ups) or a full-match regex."""
    if spec is None:
        return lambda name: False
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda name: pattern.fullmatch(name) is not None
    keys = frozenset(spec)
    return lambda name: not keys.isdisjoint(dotted_suffixes(name))


def _layer_index_ok(config: LoraConfig, name: str) -> bool:
    if config.layers_to_transform is None:
        return True
    lists = config.layers_pattern or COMMON_LAYER_LISTS
    lists = [lists] if isinstance(lists, str) else list(lists)
    found = re.match(rf"(?:^|.*\.)(?:{'|'.join(map(re.escape, lists))})\.(\d+)(?:\.|$)", name)
    return found is not None and int(found.group(1)) in config.layers_to_transform


def _output_layer_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    if output is None:
        return set()
    return {name for name, module in model.named_modules() if module is output}


def _match_targets(model: nn.Module, config: LoraConfig, candidates: list[tuple[str, nn.Module]],
                   save_names: list[str]) -> list[tuple[str, nn.Module]]:
    targets = config.target_modules
    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    if all_linear:
        skip = _output_layer_names(model) | set(save_names) | set(_owned_sub_layers(candidates))
        hits = [(n, m) for n, m in candidates
                if n not in skip and (w := wrapper_for(m)) is not None and w.linear_like]
    else:
        selected = _selector(targets)
        hits = [(n, m) for n, m in candidates if selected(n)]
        _check_every_key_matched(targets, candidates)
        if isinstance(targets, str):
            # a regex sweeps over containers and norms too: keep only the layer types lorakit adapts
            hits = [(n, m) for n, m in hits if wrapper_for(m) is not None]
    excluded = _selector(config.exclude_modules)
    hits = [(n, m) for n, m in hits if not excluded(n) and _layer_index_ok(config, n)
            and not any(n == s or n.startswith(s + ".") for s in save_names)]
    if not hits:
        raise TargetError(f"target_modules={targets!r} matches no module after exclude_modules/"
                          f"layers_to_transform filtering; {_closest(str(targets), candidates)}")
    return hits


def _check_every_key_matched(targets: list[str] | str, candidates: list[tuple[str, nn.Module]]) -> None:
    if isinstance(targets, str):
        selected = _selector(targets)
        missing = None if any(selected(n) for n, _ in candidates) else targets
    else:
        keys, found = frozenset(targets), set()
        for name, _ in candidates:
            found.update(keys.intersection(dotted_suffixes(name)))
        missing = next((key for key in targets if key not in found), None)
    if missing is not None:
        raise TargetError(f"target {missing!r} matches no module of this model; {_closest(missing, candidates)}")


def _closest(key: str, candidates: list[tuple[str, nn.Module]]) -> str:
    adaptable = [(n, m) for n, m in candidates if wrapper_for(m) is not None]
    leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in adaptable})
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.3)
    close += [n for n in difflib.get_close_matches(key, [n for n, _ in adaptable], n=3, cutoff=0.5)]
    if close:
        return f"closest module names: {', '.join(dict.fromkeys(close))}"
    return f"adaptable module names here: {', '.join(leaves[:20])}"


def _match_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    candidates = [(n, m) for n, m in model.named_modules() if n and not is_internal(n)]
    found = []
    for key in config.modules_to_save:
        hits = [n for n, _ in candidates if suffix_match(key, n)]
        if not hits:
            raise TargetError(f"modules_to_save entry {key!r} matches no module; {_closest(key, candidates)}")
        found += hits
    # a wrapper already around the module stands for it; never nest one inside another match
    found = sorted(set(found))
    return [n for n in found if not any(n != o and n.startswith(o + ".") for o in found)]


_INTERNAL = re.compile(r"(^|\.)(" + "|".join((*LORA_PARTS, "lora_dropout", "base_layer", "original_module",
                                                  "modules_to_save")) + r")(\.|$)")
_ADAPTER_PARAM = re.compile(r"(^|\.)(" + "|".join((*LORA_PARTS, "modules_to_save")) + r")(\.|$)")


def is_internal(name: str) -> bool:
    """True for lorakit's own sub-modules and parameters (``lora_A``, ``base_layer``, modules_to_save copies...)."""
    return _INTERNAL.search(name) is not None


def is_base_param(name: str) -> bool:
    """Parameters of the original model (LoRA tensors and modules_to_save copies excluded)."""
    return _ADAPTER_PARAM.search(name) is None


def _base_of(module: nn.Module) -> nn.Module:
    return module.original_module if isinstance(module, ModulesToSave) else module


__all__ = ["TargetRow", "TargetingReport", "WrapperSlot", "add_adapter", "inject", "is_base_param", "is_internal",
           "dotted_suffixes", "parameter_wrappers", "suffix_match", "targeting_report", "trainable_parameters"]
