"""LoRA on ``nn.Embedding``: the row lookup replaces the first product (PEFT's ``lora_embedding_A/B``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .base import LoraLayer, TransposedWeight


class LoraEmbedding(TransposedWeight, LoraLayer):
    """LoRA on ``nn.Embedding`` (weight ``(num, dim)``): ``lora_embedding_A (r, num)``, ``lora_embedding_B
    (dim, r)``; ``s · B A`` read at the token's column. As in PEFT, A starts at zero and B random, dropout is not
    applied (token ids), and DoRA's magnitude has one value per embedding dimension: the weight reads as the
    ``(dim, num)`` matrix of a linear map from one-hot tokens."""

    supports_dora = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)  # lora_A/lora_B stay empty, as in PEFT
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    @classmethod
    def max_rank(cls, base_layer: nn.Module) -> int:
        return min(base_layer.weight.shape)

    @classmethod
    def added_params(cls, base_layer: nn.Module, r: int, use_dora: bool) -> int:
        num, dim = base_layer.weight.shape
        return r * (num + dim) + (dim if use_dora else 0)

    def _create(self, name: str, r: int, dtype: torch.dtype, device: torch.device, bias: bool = False) -> None:
        num, dim = self.base_layer.weight.shape
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, num, dtype=dtype, device=device))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(dim, r, dtype=dtype, device=device))

    def reset(self, name: str, init: str) -> None:
        if init == "pissa":
            raise ConfigError("init='pissa' is not supported for Embedding layers")
        if init == "gaussian":
            nn.init.normal_(self.lora_embedding_A[name])
            nn.init.zeros_(self.lora_embedding_B[name])
        else:
            nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])

    def remove(self, name: str) -> None:
        for container in (self.lora_embedding_A, self.lora_embedding_B):
            if name in container:
                del container[name]
        super().remove(name)

    def ab_weights(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def lora_bias(self, name: str) -> Tensor | None:
        return None

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = [self.lora_embedding_A[name], self.lora_embedding_B[name]]
        if name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[name])
        return params

    def _embed(self, ids: Tensor, table: Tensor) -> Tensor:
        base = self.base_layer
        return F.embedding(ids, table, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                           sparse=base.sparse)

    def lora_output(self, x: Tensor, name: str) -> Tensor:
        # dropout on token ids makes no sense; PEFT ignores it for embeddings too
        return self.lora_path(x, name)

    def lora_path(self, x: Tensor, name: str) -> Tensor:
        hidden = self._embed(x, self.lora_embedding_A[name].T)  # (..., r)
        return (hidden @ self.lora_embedding_B[name].T) * self.scaling[name]

    def dora_output(self, x: Tensor, name: str, base_result: Tensor) -> Tensor:
        """``(m/n - 1) · E[x] + (m/n) · s (B A)[x]`` (n detached), no dropout, as PEFT's DoRA embedding."""
        scale = self.lora_magnitude_vector[name] / self.row_norm(name).detach()
        return (scale - 1) * base_result + scale * self.lora_path(x, name)

    def delta_weight(self, name: str) -> Tensor:
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]
