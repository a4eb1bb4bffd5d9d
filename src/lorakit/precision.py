"""Storage dtype of the frozen base (``train.dtype``): fp32, bf16 or fp16, with what trains kept in fp32.

A bf16 base takes 2 bytes a parameter instead of 4. The base is loaded in that dtype (`lorakit.models.load_model`
``dtype=``), so the fp32 model never exists whole; after the adapters are added, `keep_trainable_fp32` casts
every trained tensor (LoRA A/B, DoRA magnitudes, ``modules_to_save`` copies, trained biases) back to fp32, so
AdamW's moments and the updates are fp32 as before ("mixed precision" in the sense of Micikevicius et al. 2018:
low-precision frozen weights and activations, fp32 trained weights). LoRA layers already compute their branch in
the adapter's dtype and add it in the base's (``x.to(A.dtype)``, result cast back). A trained module that is not
a LoRA layer (a classifier head kept whole) gets a pair of hooks: its floating inputs are cast to fp32 and its
output back to the dtype it was given, so it sits between bf16 layers unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``fp32`` | ``bf16`` | ``fp16`` -> the torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def _bridge(module: nn.Module) -> None:
    """Run ``module`` (fp32 weights) between layers of another dtype: inputs to fp32, output back."""
    given: list[torch.dtype] = []

    def before(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        floats = [a.dtype for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
        given.append(floats[0] if floats else torch.float32)
        return _cast_floats(args, torch.float32), _cast_floats(kwargs, torch.float32)

    def after(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return _cast_floats(output, given.pop())

    module.register_forward_pre_hook(before, with_kwargs=True)
    module.register_forward_hook(after, with_kwargs=True)


def keep_trainable_fp32(model: nn.Module) -> int:
    """Cast every parameter that requires grad to fp32 (the frozen base keeps its dtype); trained modules that
    are not LoRA layers get input/output casts (`_bridge`); on a CPU, attention with dropout runs in the base's
    dtype (`low_precision_attention`). Returns how many tensors were cast; 0 when the model is fp32 already
    (then nothing else changes either)."""
    from .layers import LoraLayer

    low_precision_attention(model)

    lora_paths = tuple(name for name, module in model.named_modules() if isinstance(module, LoraLayer))
    cast = 0
    bridged: set[int] = set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and p.dtype != torch.float32]
        for param in own:
            param.data = param.data.float()
            cast += 1
        inside_lora = any(name == path or name.startswith(path + ".") for path in lora_paths)
        if own and not inside_lora:  # LoRA layers cast their branch themselves
            top = _outermost_trained(model, name)
            if id(top) not in bridged:
                bridged.add(id(top))
                _bridge(top)
    return cast


def _outermost_trained(model: nn.Module, name: str) -> nn.Module:
    """The largest module around module ``name`` whose parameters all train (e.g. a whole classifier copy), so its
    internals run in fp32 and only its boundary is cast."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        candidate = model.get_submodule(".".join(parts[:i]))
        params = list(candidate.parameters())
        if isinstance(candidate, (nn.ModuleDict, nn.ModuleList)):  # containers are never called
            continue
        if params and all(p.requires_grad for p in params):
            return candidate
    return model.get_submodule(name)


#: config fields transformers models keep their attention-probability dropout in
ATTENTION_DROPOUT_FIELDS = ("attention_probs_dropout_prob", "attention_dropout")


def low_precision_attention(model: nn.Module) -> bool:
    """On a CPU, run the attention of a bf16/fp16-stored transformers model in that dtype; returns whether the
    attention implementation was switched (SDPA -> transformers' eager).

    Why: with dropout on the attention probabilities (training), torch's CPU SDPA cannot use its fused kernel
    and falls back to the math kernel, which upcasts bf16/fp16 inputs and computes in fp32: MiniLM's bf16
    training step keeps four fp32 ``(batch, heads, seq, seq)`` tensors a layer, 162 of its 302 MiB (measured in
    docs/scaling.md). Eager attention computes the same in the inputs' dtype (the softmax kernel accumulates in
    fp32 and rounds its output). Nothing changes on a GPU, without attention dropout (the fused CPU kernel
    already runs in bf16, e.g. Llama), or for an fp32 base.
    """
    config, setter = getattr(model, "config", None), getattr(model, "set_attn_implementation", None)
    if config is None or setter is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    frozen = next((p for p in model.parameters() if not p.requires_grad), None)
    if frozen is None or frozen.dtype == torch.float32 or frozen.device.type != "cpu":
        return False
    configured = max(float(getattr(config, name, 0.0) or 0.0) for name in ATTENTION_DROPOUT_FIELDS)
    if configured == 0 or all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout)):
        return False  # no attention dropout (or train.model_dropout=0): the fused kernel runs in bf16
    setter("eager")
    log.info("%s base on a CPU: attention runs in transformers' eager implementation in %s (torch's CPU SDPA "
             "computes in fp32 when attention dropout is on)", frozen.dtype, frozen.dtype)
    return True
