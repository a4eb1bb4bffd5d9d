"""LoRA wrappers around existing layers, and the registry that picks one per layer type.

A wrapper keeps the original layer as ``base_layer`` (frozen) and any number of named adapters in
``ModuleDict``/``ParameterDict`` containers named as in PEFT (``lora_A``, ``lora_B``, ``lora_embedding_A``,
``lora_embedding_B``, ``lora_magnitude_vector``), so a state-dict key is PEFT's key plus the adapter name.

Modules: `base` (what every wrapper shares: bookkeeping, forward, DoRA, merge), `linear` (``nn.Linear``, HF
``Conv1D``), `conv` (``nn.Conv1d/2d/3d``, grouped too), `embedding`, `attention` (``nn.MultiheadAttention``), `parameter` (LoRA on parameters: fused MoE experts), `modules_to_save` (modules trained in
full), `registry` (layer type -> wrapper). Mixed-adapter batches: `lorakit.routing`.
"""

from __future__ import annotations

from torch import nn

from .attention import LoraMultiheadAttention
from .base import LORA_PARTS, LoraLayer, dora_merge, dora_unmerge
from .conv import LoraConv, LoraConv2d
from .embedding import LoraEmbedding
from .linear import LoraConv1D, LoraLinear
from .modules_to_save import ModulesToSave
from .parameter import LoraParameter, parameter_added_params
from .registry import LAYER_REGISTRY, register_layer, registered_type, wrapper_for

for _layer_type, _wrapper in ((nn.Linear, LoraLinear), (nn.Embedding, LoraEmbedding), (nn.Conv1d, LoraConv),
                              (nn.Conv2d, LoraConv), (nn.Conv3d, LoraConv),
                              (nn.MultiheadAttention, LoraMultiheadAttention)):
    register_layer(_layer_type, _wrapper)

__all__ = ["LAYER_REGISTRY", "LORA_PARTS", "LoraConv", "LoraConv1D", "LoraConv2d", "LoraEmbedding", "LoraLayer",
           "LoraLinear", "LoraMultiheadAttention", "LoraParameter", "ModulesToSave", "dora_merge", "dora_unmerge",
           "parameter_added_params", "register_layer", "registered_type", "wrapper_for"]
