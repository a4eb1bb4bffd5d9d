"""Adapter folders for other tools: export for a serving target (vLLM, plain PEFT LoRA), merge into a full model
folder, and what a folder holds (``lorakit info``). The sub-commands live in `lorakit.cli.files`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .adapters import unload
from .config import LoraConfig
from .errors import AdapterError, ConfigError
from .files import atomic_directory, json_default, json_text, read_safetensors, read_safetensors_header, write_file
from .io import load_adapter, lorakit_version, write_adapter_folder
from .peft_format import (CONFIG_FILE, FILE_PARTS, PICKLE_FILE, PISSA_INIT_FILE, PREFIX, WEIGHTS_FILE,
                          AdapterFiles, parse_metadata, read_adapter, read_adapter_config)
from .tasks import task_from_peft

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


# =========================================================================================================
# Export for a serving target
# =========================================================================================================
@dataclass
class ExportReport:
    """What a target needs: ``reasons`` it cannot serve the adapter, ``conversions`` done to the written copy."""

    source: Path
    target: str
    reasons: list[str] = field(default_factory=list)
    conversions: list[str] = field(default_factory=list)
    output: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.reasons

    def __str__(self) -> str:
        if self.reasons:
            return f"{self.target} cannot serve {self.source}:\n" + "\n".join(f"  - {r}" for r in self.reasons)
        done = "; ".join(self.conversions) if self.conversions else "no conversion needed"
        where = f", written to {self.output}" if self.output else ""
        return f"{self.target} can serve {self.source} ({done}){where}"


def _module_factors(files: AdapterFiles) -> dict[str, tuple[Tensor, Tensor, float]]:
    """Per LoRA module ``(A, B, s)`` with ``ΔW = s B A``."""
    config, out = files.config, {}
    for key, tensor in files.tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX): -len(".lora_A.weight")]
            B = files.tensors[PREFIX + module + ".lora_B.weight"]
            r = tensor.shape[0]
            out[module] = (tensor, B, config.scaling(r, config.alpha_for(module)))
    return out


def _pissa_to_lora(files: AdapterFiles, initial: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor, float]]:
    """PiSSA -> plain LoRA for the original base (PEFT's ``subtract_mutated_init``).

    The trained model is ``W_res + s B' A'`` with ``W_orig = W_res + s B0 A0``, so against ``W_orig`` the update is
    ``s (B' A' - B0 A0) = s [B', -B0] [A'; A0]``: rank 2r with the same scaling.
    """
    factors = {}
    for module, (A, B, s) in _module_factors(files).items():
        A0, B0 = initial[PREFIX + module + ".lora_A.weight"], initial[PREFIX + module + ".lora_B.weight"]
        factors[module] = (torch.cat([A, A0.to(A.dtype)], 0), torch.cat([B, -B0.to(B.dtype)], 1), s)
    return factors


def vllm_refusals(files: AdapterFiles, lora_keys: list[str], other_keys: list[str]) -> list[str]:
    """Why vLLM cannot serve this adapter as it is (empty: it can): vLLM's LoRA is plain LoRA on linear layers."""
    config = files.config
    reasons: list[str] = []
    if config.use_dora:
        reasons.append("DoRA (use_dora=true): vLLM serves plain LoRA only")
    if config.bias != "none":
        reasons.append(f"bias={config.bias!r}: trained biases change the base model, vLLM cannot apply them")
    if config.lora_bias:
        reasons.append("lora_bias=true: vLLM's LoRA has no bias on B")
    nested = sorted({k[len(PREFIX):].split(".base_layer.")[0] for k in lora_keys if ".base_layer." in k})
    if nested and not config.target_parameters:
        reasons.append(f"LoRA inside nested wrappers {nested[:3]} (nn.MultiheadAttention's out_proj): "
                       "vLLM serves LoRA on linear layers")
    if config.target_parameters:
        reasons.append(f"target_parameters {config.target_parameters}: vLLM serves LoRA on modules, not "
                       "on parameters")
    if config.modules_to_save and other_keys:
        reasons.append(f"modules_to_save {sorted(set(config.modules_to_save))}: vLLM cannot swap in "
                       "fully trained modules")
    embeds = sorted({k[len(PREFIX):].rsplit(".", 1)[0] for k in lora_keys if ".lora_embedding_" in k})
    if embeds:
        reasons.append(f"LoRA on embedding layers {embeds}: vLLM serves LoRA on linear layers")
    convs = sorted({k[len(PREFIX): -len(".lora_A.weight")] for k in lora_keys
                    if k.endswith(".lora_A.weight") and files.tensors[k].dim() != 2})
    if convs:
        reasons.append(f"LoRA on convolutions {convs[:3]}: vLLM serves LoRA on linear layers")
    return reasons


def export_adapter(directory: str | os.PathLike, target: str, output: str | os.PathLike | None = None
                   ) -> ExportReport:
    """Check what ``target`` (``"vllm"`` or ``"peft"``) can serve and, with ``output``, write a converted copy.

    Conversions (exact up to float rounding): a PiSSA adapter (with its initial A0/B0) becomes plain LoRA of
    rank 2r for the original base; for vLLM, ranks outside `VLLM_RANKS` are zero-padded to the next allowed one
    and per-module ranks/alphas made uniform by folding each module's scaling into B. What cannot be converted
    (DoRA, trained biases, modules_to_save, embedding/conv LoRA for vLLM) is listed in ``reasons``; with
    ``output`` set an `AdapterError` lists them and nothing is written.
    """
    if target not in ("vllm", "peft"):
        raise ConfigError(f"export target must be 'vllm' or 'peft', got {target!r}")
    files = read_adapter(directory)
    config = files.config
    report = ExportReport(files.directory, target)
    lora_keys = [k for k in files.tensors if k.endswith(tuple(FILE_PARTS))]
    other_keys = sorted(set(files.tensors) - set(lora_keys))
    initial, init_meta = None, {}
    if config.init == "pissa":
        if config.use_dora:
            report.reasons.append("PiSSA with DoRA cannot be turned into plain LoRA")
        elif (files.directory / PISSA_INIT_FILE).is_file():
            initial, init_meta = read_safetensors(files.directory / PISSA_INIT_FILE)
            report.conversions.append(f"PiSSA -> plain LoRA of rank 2r={2 * config.r} for the original base")
        elif target == "vllm":
            report.reasons.append(f"PiSSA adapter without its initial A0/B0 ({PISSA_INIT_FILE}): it only applies to "
                                  "the residual base; save it with save_adapter(..., pissa_initial=...)")
    if target == "vllm":
        report.reasons.extend(vllm_refusals(files, lora_keys, other_keys))
    factors = _pissa_to_lora(files, initial) if initial is not None else None
    new_config = dict(files.raw_config)
    if target == "vllm" and not report.reasons:
        factors = _uniform_for_vllm(files, factors, config, report, new_config)
        if isinstance(config.target_modules, str):  # vLLM wants a list: the exact modules the weights hold
            new_config["target_modules"] = sorted(_module_factors(files))
        new_config["modules_to_save"] = None
    elif target == "peft" and factors is not None:  # PiSSA conversion: per-module patterns kept, doubled
        grow = 2.0 if not config.use_rslora else math.sqrt(2.0)
        new_config.update(r=2 * config.r, lora_alpha=config.alpha * grow,
                          rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                          alpha_pattern={k: v * grow for k, v in config.alpha_pattern.items()})
    if report.reasons:
        if output is not None:
            raise AdapterError(str(report))
        return report
    if output is None:
        return report
    tensors = dict(files.tensors)
    if factors is not None:
        new_config["init_lora_weights"] = True
        for module, (A, B, _) in factors.items():
            tensors[PREFIX + module + ".lora_A.weight"] = A.contiguous()
            tensors[PREFIX + module + ".lora_B.weight"] = B.contiguous()
    ours = dict(files.lorakit)
    ours.pop("tensors_sha256", None)
    if initial is not None:  # the converted adapter applies to the original base, whose fingerprint was recorded
        ours["fingerprint"] = parse_metadata(init_meta, PISSA_INIT_FILE).get("fingerprint")
    ours["export"] = {"target": target, "source": str(files.directory), "conversions": report.conversions}
    with atomic_directory(output, replace=None) as staging:
        write_adapter_folder(staging, new_config, tensors, ours)
    report.output = Path(output)
    return report


def _uniform_for_vllm(files: AdapterFiles, factors: dict[str, tuple[Tensor, Tensor, float]] | None,
                      config: LoraConfig, report: ExportReport, new_config: dict[str, Any]
                      ) -> dict[str, tuple[Tensor, Tensor, float]] | None:
    """One rank from `VLLM_RANKS` and one scaling for every module: smaller ranks zero-padded (A gets zero rows,
    B zero columns, so ``B A`` is unchanged) and each module's scaling folded into B, with ``lora_alpha = r``."""
    current = factors or _module_factors(files)
    ranks = sorted({A.shape[0] for A, _, _ in current.values()})
    scalings = {s for _, _, s in current.values()}
    if factors is None and len(ranks) == 1 and ranks[0] in VLLM_RANKS and len(scalings) == 1 \
            and not config.rank_pattern and not config.alpha_pattern:
        return None  # servable as it is
    rank = next((r for r in VLLM_RANKS if r >= ranks[-1]), None)
    if rank is None:
        report.reasons.append(f"rank {ranks[-1]} is above vLLM's largest ({VLLM_RANKS[-1]})")
        return None
    if ranks != [rank]:
        report.conversions.append(f"ranks {ranks} zero-padded to {rank} (vLLM ranks: {list(VLLM_RANKS)})")
    report.conversions.append("each module's scaling folded into B (lora_alpha = r)")
    new_config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    return {m: (torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])], 0),
                torch.cat([B * s, B.new_zeros(B.shape[0], rank - B.shape[1])], 1), 1.0)
            for m, (A, B, s) in current.items()}


# =========================================================================================================
# Merge into a full model folder
# =========================================================================================================
PROBE_TEXTS = ("The film was a delight from the first scene to the last.",
               "I would not recommend this place to anyone.",
               "Low-rank adapters make fine-tuning cheap enough for a laptop.",
               "What is the capital of Sweden?")


@dataclass
class MergeReport:
    output: Path
    task: str
    max_abs_diff: float  # merged vs unmerged outputs on the probe inputs' real tokens (padding left out)
    mean_abs_diff: float
    inputs: int

    def __str__(self) -> str:
        return (f"merged model written to {self.output} ({self.task}); outputs on {self.inputs} probe inputs, "
                f"merged vs unmerged: max |diff| {self.max_abs_diff:.3e}, mean |diff| {self.mean_abs_diff:.3e}")


def model_output(model: nn.Module, inputs: Mapping[str, Tensor] | Tensor) -> Tensor:
    """The main output tensor of a model (logits, else last hidden state)."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    for attr in ("logits", "last_hidden_state"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def output_drift(before: Tensor, after: Tensor, inputs: Mapping[str, Tensor] | Tensor) -> Tensor:
    """``|after - before|`` at the positions that hold real tokens.

    Outputs are ``(batch, seq, features)`` per token or ``(batch, labels)`` per row; with an ``attention_mask``
    ``(batch, seq)`` among ``inputs`` and a per-token output, padding positions are left out: their values are
    computed from masked attention only, carry no meaning and differ by orders of magnitude more than real
    tokens do (merge of a MiniLM adapter: 1.1e-1 at padding, 9.5e-5 on real tokens). Returns a 1-D tensor.
    """
    diff = (after - before).abs()
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if mask is not None and diff.dim() >= 3 and tuple(diff.shape[:2]) == tuple(mask.shape):
        return diff[mask.bool()].reshape(-1)
    return diff.reshape(-1)


def _probe_inputs(loaded: Any, texts: Sequence[str] | None) -> tuple[Mapping[str, Tensor] | Tensor, int]:
    if loaded.tokenizer is not None:
        texts = list(texts or PROBE_TEXTS)
        return dict(loaded.tokenizer(texts, return_tensors="pt", padding=True)), len(texts)
    size = loaded.image_size or 224
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return images, 2


def _task_of(files: AdapterFiles) -> str:
    task = files.provenance.get("task")
    if isinstance(task, str):
        return task
    recipe = files.provenance.get("recipe")
    if isinstance(recipe, dict) and isinstance(recipe.get("task"), str):
        return recipe["task"]
    return task_from_peft(files.config.task_type)


def _num_labels(files: AdapterFiles) -> int | None:
    """Classes of the trained head: the smallest first dimension of a 2-D modules_to_save weight."""
    rows = [t.shape[0] for k, t in files.tensors.items()
            if not k.endswith(tuple(FILE_PARTS)) and k.endswith(".weight") and t.dim() == 2]
    return min(rows) if rows else None


def merge_to_folder(base: str, adapter: str | os.PathLike, output: str | os.PathLike, task: str | None = None,
                    num_labels: int | None = None, force: bool = False, allow_pickle: bool = False,
                    texts: Sequence[str] | None = None) -> MergeReport:
    """Load ``base`` (`lorakit.models.load_model`), apply ``adapter``, fold it in and write a plain model folder
    (safetensors + tokenizer, loadable by transformers' ``from_pretrained``), atomically.

    The report gives the measured difference between merged and unmerged outputs on a few real inputs.
    """
    from .models import load_model

    files = read_adapter(adapter, allow_pickle=allow_pickle)
    task = task or _task_of(files)
    if num_labels is None and task.endswith("classification"):
        num_labels = _num_labels(files)
    loaded = load_model(base, task=task, num_labels=num_labels)
    model = loaded.model.eval()
    load_adapter(model, adapter, force=force, allow_pickle=allow_pickle, tokenizer=loaded.tokenizer)
    inputs, count = _probe_inputs(loaded, texts)
    with torch.no_grad():
        before = model_output(model, inputs).float()
        unload(model, merge=True)
        after = model_output(model, inputs).float()
    diff = output_drift(before, after, inputs)
    report = MergeReport(Path(output), task, float(diff.max()), float(diff.mean()), count)
    with atomic_directory(output, replace=None) as staging:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(staging)
        else:
            from safetensors.torch import save

            write_file(staging / "model.safetensors",
                        save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata={"format": "pt"}))
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(staging)
        record = {"base": base, "adapter": str(adapter), "task": task, "max_abs_diff": report.max_abs_diff,
                  "mean_abs_diff": report.mean_abs_diff, "fingerprint": files.fingerprint,
                  "provenance": files.provenance, "lorakit_version": lorakit_version()}
        write_file(staging / "lorakit_merge.json", json_text(record).encode())
    return report


# =========================================================================================================
# Info
# =========================================================================================================
def _weights_bytes(folder: Path) -> int:
    """Bytes of the model weight files at the top of a folder the *user* named (never one named in a file)."""
    suffixes = (".safetensors", ".bin", ".gguf", ".pth", ".pt")
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.name.endswith(suffixes) and p.is_file() and not p.is_symlink())


def _folder_bytes(folder: Path) -> int:
    """Bytes of the regular files in an adapter folder and its sub-adapter folders (symlinks not followed)."""
    total = 0
    for entry in folder.iterdir():
        if entry.is_symlink():
            continue
        if entry.is_file():
            total += entry.stat().st_size
        elif entry.is_dir() and (entry / CONFIG_FILE).is_file():
            total += sum(p.stat().st_size for p in entry.iterdir() if p.is_file() and not p.is_symlink())
    return total


def _counts(entries: Mapping[str, tuple[str, list[int], int, int]]) -> tuple[int, int, dict[str, int]]:
    """LoRA and modules_to_save parameter counts, and the rank of each adapted module, from header entries."""
    lora_params = saved_params = 0
    ranks: dict[str, int] = {}
    for key, (_, shape, _, _) in entries.items():
        n = math.prod(shape)
        if key.endswith(tuple(FILE_PARTS)):
            lora_params += n
            if key.endswith((".lora_A.weight", ".lora_embedding_A")) and shape:
                ranks[key[len(PREFIX):].rsplit(".lora_", 1)[0]] = shape[0]
        else:
            saved_params += n
    return lora_params, saved_params, ranks


def adapter_info(directory: str | os.PathLike, base: str | os.PathLike | None = None) -> dict[str, Any]:
    """What an adapter folder holds, from its config and the safetensors header (no tensor is read).

    Only the folder itself is looked at: ``base_model_name_or_path`` inside the file is shown, never opened. Pass
    ``base`` (a model folder) to compare the adapter's size with that base's weight files.
    """
    folder = Path(directory)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{folder} has no {WEIGHTS_FILE}" + (" (only a pickle .bin: lorakit does not open it)"
                                                                  if (folder / PICKLE_FILE).is_file() else ""))
    entries, metadata, total = read_safetensors_header(weights)
    ours = parse_metadata(metadata, str(weights))
    config = read_adapter_config(folder)
    lora_params, saved_params, ranks = _counts(entries)
    leaves: dict[str, int] = {}
    for module in ranks:
        leaf = module.rsplit(".", 1)[-1]
        leaves[leaf] = leaves.get(leaf, 0) + 1
    info: dict[str, Any] = {
        "path": str(folder), "peft_type": "LORA", "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "r": config.r, "alpha": config.alpha, "ranks": sorted(set(ranks.values())),
        "rank_pattern": config.rank_pattern, "alpha_pattern": config.alpha_pattern,
        "init": config.init, "use_dora": config.use_dora, "use_rslora": config.use_rslora, "bias": config.bias,
        "target_modules": config.target_modules, "adapted_modules": len(ranks), "adapted_by_name": leaves,
        "modules_to_save": config.modules_to_save, "lora_parameters": lora_params,
        "modules_to_save_parameters": saved_params, "parameters": lora_params + saved_params,
        "weights_bytes": total, "folder_bytes": _folder_bytes(folder),
        "fingerprint": ours.get("fingerprint"), "provenance": ours.get("provenance"),
        "lorakit_version": ours.get("lorakit_version"), "written_by": "lorakit" if ours else "another tool (PEFT?)",
        "pissa_initial": (folder / PISSA_INIT_FILE).is_file(),
        "sub_adapters": sorted(p.name for p in folder.iterdir()
                               if not p.is_symlink() and p.is_dir() and (p / CONFIG_FILE).is_file()),
    }
    if base is not None:
        if not Path(base).is_dir():
            raise AdapterError(f"--base {base} is not a model folder")
        base_bytes = _weights_bytes(Path(base))
        if base_bytes:
            info["base_model_bytes"] = base_bytes
            info["adapter_to_base"] = total / base_bytes
    return info


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_info(info: dict[str, Any]) -> str:
    fp = info.get("fingerprint")
    lines = [
        f"adapter        {info['path']}  (written by {info['written_by']}"
        + (f" {info['lorakit_version']})" if info.get("lorakit_version") else ")"),
        f"base model     {info['base_model_name_or_path']}  task_type={info['task_type']}",
        f"rank           r={info['r']} alpha={info['alpha']:g} ranks in file {info['ranks']}"
        + (f" rank_pattern={info['rank_pattern']}" if info["rank_pattern"] else "")
        + (f" alpha_pattern={info['alpha_pattern']}" if info["alpha_pattern"] else ""),
        f"method         init={info['init']} dora={info['use_dora']} rslora={info['use_rslora']} bias={info['bias']}",
        f"targets        {info['target_modules']} -> {info['adapted_modules']} modules "
        + ", ".join(f"{k} x{v}" for k, v in sorted(info["adapted_by_name"].items())),
        f"modules_to_save {info['modules_to_save']}",
        f"parameters     {info['parameters']:,} (LoRA {info['lora_parameters']:,}, "
        f"modules_to_save {info['modules_to_save_parameters']:,})",
        f"size           {_human(info['weights_bytes'])} weights, {_human(info['folder_bytes'])} folder"
        + (f"; base model {_human(info['base_model_bytes'])} on disk -> adapter is "
           f"{100 * info['adapter_to_base']:.2f}% of it" if info.get("base_model_bytes") else ""),
        "fingerprint    " + (f"sha256 {fp['sha256'][:16]}... over {fp.get('modules')} modules, "
                             f"{fp.get('bytes') or 0:,} bytes, vocab {fp.get('vocab_size')}" if fp else "not recorded"),
        f"provenance     {json.dumps(info['provenance'], default=json_default) if info.get('provenance') else 'none'}",
    ]
    if info.get("pissa_initial"):
        lines.append(f"pissa          initial A0/B0 kept ({PISSA_INIT_FILE}): exportable as plain LoRA")
    if info.get("sub_adapters"):
        lines.append(f"sub-adapters   {', '.join(info['sub_adapters'])}")
    return "\n".join(lines)


__all__ = ["ExportReport", "MergeReport", "adapter_info", "export_adapter", "format_info", "merge_to_folder",
           "output_drift"]
