"""Adapter folders on a model: load them safely (every check before the model is touched, rollback on any
failure) and save them atomically. The folder format and reading it: `lorakit.peft_format`; export, merge and
``lorakit info``: `lorakit.export`.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .adapters import ModelFlags, check_adapter_name, delete_adapter, lora_modules, lora_state, set_adapter
from .config import LoraConfig
from .errors import AdapterError, AdapterStateError, ConfigError, LorakitError, TargetError
from .files import atomic_directory, inside, json_default, safetensors_bytes, write_file
from .fingerprint import base_fingerprint, digest, verify as verify_fingerprint
from .hf import base_model_id, peft_task_type
from .inject import (TargetingReport, WrapperSlot, add_adapter, dotted_suffixes, is_base_param, is_internal,
                     parameter_wrappers, suffix_match, targeting_report)
from .layers import LORA_PARTS, LoraLayer, LoraParameter, ModulesToSave, wrapper_for
from .peft_format import (CONFIG_FILE, FILE_PARTS, METADATA_KEY, PICKLE_FILE, PISSA_INIT_FILE, PREFIX,
                          WEIGHTS_FILE, AdapterFiles, adapter_modules, adapter_state_dict, layer_parts,
                          read_adapter, read_adapter_config, strip_wrappers)

#: largest |value| accepted in an adapter tensor, and bound on the entries of a LoRA update ``s B A``
MAX_ABS_WEIGHT = 1e5

log = logging.getLogger(__name__)


# =========================================================================================================
# Loading onto a model
# =========================================================================================================
@dataclass
class _Plan:
    """What a file puts where, checked against the model before anything changes."""

    lora: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module -> {part: tensor}
    saves: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # modules_to_save module -> {key: tensor}
    biases: dict[str, Tensor] = field(default_factory=dict)  # unwrapped parameter name -> tensor
    parameters: dict[str, WrapperSlot] = field(default_factory=dict)  # parameter wrapper's module path -> slot


def _save_modules(model: nn.Module, entries: Sequence[str] | None) -> list[str]:
    """Modules ``modules_to_save`` entries name in this model (entries matching nothing are ignored, as PEFT)."""
    if not entries:
        return []
    hits = sorted({n for n, _ in model.named_modules() if n and not is_internal(n)
                   and any(suffix_match(e, n) for e in entries)})
    return [n for n in hits if not any(n != o and n.startswith(o + ".") for o in hits)]


def _plan(model: nn.Module, files: AdapterFiles) -> _Plan:
    config, where = files.config, files.weights_file
    modules = dict(model.named_modules())
    save_names = set(_save_modules(model, config.modules_to_save))
    params = dict(model.named_parameters())
    base_params = {strip_wrappers(n): n for n in params if is_base_param(n)}
    plan = _Plan()
    for key, tensor in files.tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"{where}: unexpected tensor {key!r} (PEFT keys start with {PREFIX!r})")
        path = key[len(PREFIX):]
        suffix = next((suffix for suffix in FILE_PARTS if path.endswith(suffix)), None)
        if suffix is not None:
            module_name, part = path[: -len(suffix)], FILE_PARTS[suffix]
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
        elif config.bias != "none" and pieces[-1] == "bias" and strip_wrappers(path) in base_params:
            plan.biases[strip_wrappers(path)] = tensor
        else:
            hint = f" (bias={config.bias!r} in {CONFIG_FILE})" if pieces[-1] == "bias" else ""
            raise AdapterError(f"{where}: unexpected tensor {key!r}: it is no LoRA tensor, no modules_to_save "
                               f"entry and no bias of this model{hint}")
    if not plan.lora:
        raise AdapterError(f"{where} has no LoRA tensors (lora_A/lora_B/lora_embedding_A/B)")
    report, plan.parameters = _config_report(model, config, where)
    missing = sorted(set(plan.parameters) - set(plan.lora))
    if missing:
        raise AdapterError(f"{where}: missing tensors for {missing[:3]} ({CONFIG_FILE} targets them)")
    probes: dict[tuple, dict[str, Tensor]] = {}
    for name, parts in plan.lora.items():
        if name in plan.parameters:
            _check_parameter(model, config, plan.parameters[name], parts, where)
        else:
            _check_lora_module(model, modules, config, name, parts, where, probes)
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
    _check_config_targets(report, set(plan.lora), where, plan.parameters)
    return plan


def _config_report(model: nn.Module, config: LoraConfig, where: Path
                   ) -> tuple[TargetingReport, dict[str, WrapperSlot]]:
    """What the file's config selects on this model as PEFT reads it, and the parameter wrappers that implies: one
    targeting walk per load, shared by the checks (each walk visits every module of the model)."""
    try:
        peft_reads = _as_peft_reads(model, config)
        report = targeting_report(model, peft_reads)
        return report, parameter_wrappers(model, peft_reads, report)
    except LorakitError as err:
        raise AdapterError(f"{where.parent / CONFIG_FILE} does not fit this model: {err}") from None


def _check_parameter(model: nn.Module, config: LoraConfig, slot: WrapperSlot, parts: dict[str, Tensor],
                     where: Path) -> None:
    """The tensors for a parameter's wrapper (``slot.key``: ``module.parameter``) have PEFT's layout's shapes."""
    key = slot.key
    owner_name, _, param_name = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    while isinstance(owner, LoraParameter):
        owner = owner.base_layer
    probe = LoraParameter(owner, param_name)  # not attached to the model
    probe.add("probe", slot.r, slot.alpha, 0.0, "default", config.use_rslora, False)
    _check_tensors(f"parameter {key!r}", layer_parts(probe, "probe"), parts, where)


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
        if got.dtype.is_floating_point and got.numel():
            if not bool(torch.isfinite(got).all()):
                raise AdapterError(f"{where}: {what}: {key} contains NaN or inf values")
            peak = float(got.abs().max())
            if peak > MAX_ABS_WEIGHT or not bool(torch.isfinite(got.to(want.dtype)).all()):
                raise AdapterError(f"{where}: {what}: {key} holds values up to {peak:.3g}, beyond the "
                                   f"{MAX_ABS_WEIGHT:g} lorakit accepts or the model's {want.dtype} (outputs would "
                                   "be inf/NaN); the file is corrupted or was trained into divergence")


def _check_update_bound(config: LoraConfig, name: str, r: int, parts: Mapping[str, Tensor], where: Path) -> None:
    """Every entry of ``s B A`` is at most ``s r max|A| max|B|``: keep it within `MAX_ABS_WEIGHT` so a finite
    adapter cannot overflow a forward pass (two 1e19 factors are finite, their product is not in fp32)."""
    pair = [parts[p] for p in LORA_PARTS if p in parts and p != "lora_magnitude_vector"]  # (A, B)
    if len(pair) != 2 or not all(t.dtype.is_floating_point and t.numel() for t in pair):
        return
    bound = abs(config.scaling(r, config.alpha_for(name))) * r * float(pair[0].abs().max()) * float(
        pair[1].abs().max())
    if bound > MAX_ABS_WEIGHT:
        raise AdapterError(f"{where}: module {name!r}: the update s*B*A can reach {bound:.3g}, beyond the "
                           f"{MAX_ABS_WEIGHT:g} lorakit accepts; the file is corrupted or was trained into divergence")


def _check_lora_module(model: nn.Module, modules: dict[str, nn.Module], config: LoraConfig, name: str,
                       parts: dict[str, Tensor], where: Path, probes: dict[tuple, dict[str, Tensor]] | None = None
                       ) -> None:
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
    if r < 1:  # a rank above the layer's size is accepted, as PEFT does (inject warns)
        raise AdapterError(f"{where}: module {name!r} has rank {r}")
    if (problem := wrapper.config_problem(base, r, config.use_dora)) is not None:
        raise AdapterError(f"{where}: module {name!r}: {problem}")
    if config.use_dora and not wrapper.supports_dora:
        raise AdapterError(f"{where}: DoRA on {name!r} ({type(base).__name__}) is not supported")
    weight = getattr(base, getattr(wrapper, "wrapped_parameter", "weight"))  # MultiheadAttention: in_proj_weight
    key = (wrapper, type(base), tuple(weight.shape), weight.dtype, weight.device, r, config.use_dora,
           config.lora_bias, getattr(base, "groups", None), getattr(base, "kernel_size", None))
    if probes is None or key not in probes:
        probe = wrapper(base)  # a throwaway wrapper: the shapes the real one will have (the model is not touched)
        probe.add("probe", r, config.alpha_for(name), 0.0, "default", config.use_rslora, config.use_dora,
                  config.lora_bias)
        expected = layer_parts(probe, "probe")
        if probes is not None:  # layers of one shape share their probe (SmolLM2 all-linear: 7 probes, not 210)
            probes[key] = expected
    else:
        expected = probes[key]
    _check_tensors(f"module {name!r}", expected, parts, where)
    _check_update_bound(config, name, r, parts, where)


def _as_peft_reads(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` without the entries PEFT ignores on this model: ``modules_to_save`` entries and (when another key
    matches) ``target_modules`` keys that match no module (PEFT's SEQ_CLS adds ``classifier`` *and* ``score``)."""
    entries = [e for e in dict.fromkeys(config.modules_to_save or []) if _save_modules(model, [e])]
    targets = config.target_modules
    if isinstance(targets, list):
        present = {s for n, _ in model.named_modules() if n and not is_internal(n) for s in dotted_suffixes(n)}
        targets = [t for t in targets if t in present] or targets
    return config.replace(modules_to_save=entries or None, target_modules=targets)


def _check_config_targets(report: TargetingReport, found: set[str], where: Path,
                          parameters: Mapping[str, WrapperSlot] | None = None) -> None:
    """The modules (and parameters: wrapper path -> ``module.parameter``) the config selects on this model
    (``report``, from `_config_report`) must be exactly those the weights hold."""
    selected = {row.name for row in report.targeted}
    found = {parameters[n].target if n in (parameters or {}) else n for n in found}
    missing, extra = sorted(selected - found), sorted(found - selected)
    if missing:
        raise AdapterError(f"{where}: missing tensors: {CONFIG_FILE} targets {len(missing)} module(s) the weights "
                           f"do not cover, e.g. {missing[:3]}")
    if extra:
        raise AdapterError(f"{where}: tensors for {len(extra)} module(s) {CONFIG_FILE} does not target, "
                           f"e.g. {extra[:3]}")


def _default_name(files: AdapterFiles) -> str:
    """The name an adapter was saved under; a stored name is checked like a user's (it may become a folder)."""
    stored = files.lorakit.get("adapter_name")
    if stored is not None:
        try:
            return check_adapter_name(stored, f"{files.weights_file}: the stored adapter_name")
        except AdapterStateError as err:
            raise AdapterError(f"{err}; the file is corrupted (pass adapter_name=... to load it under a name of "
                               "your own)") from None
    if (files.directory.parent / CONFIG_FILE).is_file():  # a sub-folder of PEFT's multi-adapter layout
        return check_adapter_name(files.directory.name, f"sub-folder name {files.directory.name!r}")
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
    name = check_adapter_name(adapter_name) if adapter_name is not None else _default_name(files)
    state = lora_state(model)
    if state is not None and name in state.configs:
        raise AdapterStateError(f"an adapter named {name!r} is already loaded; pass another adapter_name")
    if state is not None and any(m.merged for _, m in lora_modules(model) if isinstance(m, LoraLayer)):
        raise AdapterStateError("adapters are merged into the weights; unmerge(model) before loading another")
    flags = ModelFlags.of(model)
    try:
        _check_and_apply(model, files, name, trainable, force, tokenizer, flags)
    except BaseException as err:
        flags.restore()  # a failed load leaves train/eval modes and requires_grad exactly as they were
        if isinstance(err, (ConfigError, TargetError)):  # settings read from the file: the file's problem
            raise AdapterError(f"{files.directory}: {err}") from None
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
        names = sorted(plan.parameters[n].key if n in plan.parameters else n for n in plan.lora)
        difference, note = verify_fingerprint(model, names, stored, tokenizer)
        if note is not None:
            log.info("adapter %s: %s", files.directory, note)
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
        injected = config.replace(target_modules=sorted(n for n in plan.lora if n not in plan.parameters),
                                  exclude_modules=None, layers_to_transform=None,
                                  layers_pattern=None, modules_to_save=sorted(plan.saves) or None,
                                  init="pissa" if config.init == "pissa" else "default")
        add_adapter(model, name, injected)
        added = True
        lora_state(model).configs[name] = config  # the file's own config (PEFT targets), for re-saving
        modules = dict(model.named_modules())
        params = {strip_wrappers(n): p for n, p in model.named_parameters() if is_base_param(n)}
        with torch.no_grad():
            for module_name, parts in plan.lora.items():
                slots = layer_parts(modules[module_name], name)
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
        params = {strip_wrappers(n): p for n, p in model.named_parameters() if is_base_param(n)}
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
def adapter_weights_bytes(tensors: Mapping[str, Tensor], ours: Mapping[str, Any]) -> bytes:
    """``adapter_model.safetensors`` bytes: ``tensors`` (PEFT file keys) with lorakit's metadata ``ours`` and a
    checksum of the tensors in the header."""
    ours = dict(ours, tensors_sha256=digest(sorted(tensors.items()))[0])
    return safetensors_bytes(tensors, {"format": "pt", METADATA_KEY: json.dumps(ours, sort_keys=True,
                                                                               default=json_default)})


def write_adapter_folder(folder: Path, config: Mapping[str, Any], tensors: Mapping[str, Tensor],
                         ours: Mapping[str, Any], pissa_init: Mapping[str, Tensor] | None = None,
                         pissa_ours: Mapping[str, Any] | None = None) -> None:
    """Write one adapter's files into ``folder`` (a staging folder of `atomic_directory`): the weights with
    lorakit's metadata, PiSSA's initial A0/B0 when given, and ``adapter_config.json`` (PEFT's keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_file(folder / WEIGHTS_FILE, adapter_weights_bytes(tensors, ours))
    if pissa_init is not None:
        write_file(folder / PISSA_INIT_FILE, adapter_weights_bytes(pissa_init, pissa_ours or {}))
    write_file(folder / CONFIG_FILE, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def lorakit_version() -> str:
    """The installed lorakit's version (recorded in every file lorakit writes)."""
    import lorakit

    return getattr(lorakit, "__version__", "unknown")


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | Sequence[str] = "default",
                 provenance: dict[str, Any] | None = None, *, tokenizer: Any = None,
                 fingerprint: dict[str, Any] | None = None,
                 pissa_initial: Mapping[str, Tensor] | str | os.PathLike | None = None,
                 tensors: Mapping[str, Tensor] | None = None) -> Path:
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
        tensors: the adapter's whole tensors under PEFT keys when the model's own are sharded (FSDP: gathered by
            `lorakit.sharding.gather_adapter` and checked by `lorakit.sharding.check_adapter`); one adapter only.
            Refused unless the keys and shapes are exactly the model's.
    """
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    given = tensors
    if given is not None and len(names) != 1:
        raise AdapterStateError("tensors= holds one adapter's tensors; save one adapter at a time")
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
        if peft_config.get("task_type") is None:  # PEFT's AutoPeftModel picks the model class from it
            peft_config["task_type"] = peft_task_type(model)
        if peft_config.get("base_model_name_or_path") is None:
            peft_config["base_model_name_or_path"] = base_model_id(model)
        tensors = adapter_state_dict(model, name) if given is None else _given_tensors(model, name, given)
        if fingerprint is not None:
            recorded = dict(fingerprint)
        elif config.init == "pissa":
            warnings.warn(f"adapter {name!r} is a PiSSA adapter: its base weights are a residual now, so no base "
                          "fingerprint is recorded; pass fingerprint=base_fingerprint(model, config) taken before "
                          "inject()", stacklevel=2)
            recorded = None
        else:
            recorded = base_fingerprint(model, adapter_modules(model, name), tokenizer)
        ours = {"format": 1, "lorakit_version": lorakit_version(), "adapter_name": name, "fingerprint": recorded,
                "provenance": json.loads(json.dumps(provenance or {}, default=json_default))}
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
            folder = staging if single or name == "default" else inside(staging, staging / check_adapter_name(name))
            write_adapter_folder(folder, peft_config, tensors, ours, initial,
                           {"format": 1, "fingerprint": ours["fingerprint"], "role": "pissa-initial"})
    return Path(directory)


def _given_tensors(model: nn.Module, name: str, given: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``given`` checked against the model's adapter (keys, whole shapes; sharded tensors report theirs)."""
    own = {key: tuple(value.shape) for key, value in adapter_state_dict(model, name).items()}
    if not given or set(given) != set(own):
        raise AdapterError(f"tensors= has {len(given)} tensors, adapter {name!r} has {len(own)} "
                           f"(missing {sorted(set(own) - set(given))[:3]}); nothing written")
    wrong = [key for key, shape in own.items() if tuple(given[key].shape) != shape]
    if wrong:
        raise AdapterError(f"tensors= {wrong[0]} has shape {tuple(given[wrong[0]].shape)}, the model's is "
                           f"{own[wrong[0]]}; nothing written")
    return {key: value.detach().cpu().contiguous() for key, value in given.items()}


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


__all__ = ["AdapterFiles", "adapter_state_dict", "adapter_weights_bytes", "atomic_directory", "base_fingerprint",
           "load_adapter", "load_adapters", "lorakit_version", "read_adapter", "read_adapter_config", "save_adapter",
           "save_adapters", "write_adapter_folder"]
