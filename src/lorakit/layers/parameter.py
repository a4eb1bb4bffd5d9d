"""LoRA on a parameter rather than a layer (PEFT's ``target_parameters``): fused mixture-of-experts weights.

Mixture-of-experts blocks often hold every expert's projection in one 3-D ``nn.Parameter`` ``(experts, d1, d2)``
and index it in their own ``forward``; there is no ``nn.Linear`` to wrap. `LoraParameter` wraps the module that
owns the parameter and runs that module's own ``forward`` with the parameter replaced by ``W + s · ΔW``, as
PEFT's ``ParamWrapper`` does, with PEFT's factor layout (so adapter files are interchangeable):

- 2-D ``(out, in)``: ``A (r, in)``, ``B (out, r)``, ``ΔW = B A``;
- 3-D ``(E, d1, d2)``: ``A (r·E, d2)``, ``B (d1, r·E)``, ``ΔW[e] = B[:, r-block of e] A[e's r rows]`` — B's
  columns read as ``(r, E)`` and A's rows as ``(E, r)``, PEFT's layout (``(r·E, d1)`` / ``(d2, r·E)`` with
  ``ΔW[e]`` transposed when the module sets ``is_transposed``).

Several parameters of one module nest wrappers, the first parameter (in registration order) innermost, as in
PEFT, so the file keys (``experts.base_layer.lora_A.weight``...) are PEFT's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import AdapterStateError, ConfigError
from .base import LoraLayer


class LoraParameter(LoraLayer):
    """LoRA on parameter ``parameter_name`` of ``base_layer`` (the owning module, or another `LoraParameter`
    around it). No dropout, DoRA or ``lora_bias`` (PEFT refuses them too)."""

    supports_dropout = False
    follows_own_forward = True

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        param = self.parameter()
        if param.dim() not in (2, 3):
            raise ConfigError(f"target_parameters: {parameter_name!r} has {param.dim()} dimensions; LoRA on "
                              "parameters takes 2-D (out, in) or 3-D (experts, d1, d2) ones")

    def __getattr__(self, name: str) -> Any:
        """Attributes of the wrapped module (``experts.num_experts``...) read through the wrapper, as PEFT's. The
        parameter itself read from outside the module's ``forward`` is the base one: LoRA applies inside it."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # -- the parameter -------------------------------------------------------------------------------------
    def owner(self) -> nn.Module:
        """The module that holds the parameter (under any nested `LoraParameter`)."""
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    def parameter(self) -> nn.Parameter:
        return getattr(self.owner(), self.parameter_name)

    def _path(self) -> str:
        """The parameter's name relative to ``base_layer``, for `functional_call`."""
        depth, module = 0, self.base_layer
        while isinstance(module, LoraParameter):
            depth, module = depth + 1, module.base_layer
        return "base_layer." * depth + self.parameter_name

    @property
    def weight(self) -> Tensor:
        return self.parameter()

    @property
    def bias(self) -> Tensor | None:
        """The owning module's bias, if any (MultiheadAttention reads ``out_proj.bias`` through the wrapper)."""
        return getattr(self.owner(), "bias", None)

    @property
    def experts(self) -> int:
        param = self.parameter()
        return param.shape[0] if param.dim() == 3 else 1

    def _transposed(self) -> bool:
        return bool(getattr(self.owner(), "is_transposed", False))

    def features(self) -> tuple[int, int]:
        """``(in, out)`` of A and B as PEFT counts them (3-D: swapped unless the module is ``is_transposed``)."""
        shape = self.parameter().shape
        if len(shape) == 2:
            return shape[1], shape[0]
        return (shape[1], shape[2]) if self._transposed() else (shape[2], shape[1])

    # -- adapters ------------------------------------------------------------------------------------------
    def _create(self, name: str, r: int, dtype: torch.dtype, device: torch.device, bias: bool = False) -> None:
        in_f, out_f = self.features()
        self.lora_A[name] = nn.Linear(in_f, r * self.experts, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(r * self.experts, out_f, bias=False, dtype=dtype, device=device)

    def add(self, name: str, r: int, alpha: float, dropout: float, init: str, use_rslora: bool,
            use_dora: bool, lora_bias: bool = False) -> None:
        if dropout or use_dora or lora_bias or init == "pissa":
            raise ConfigError("LoRA on parameters (target_parameters) takes no dropout, DoRA, lora_bias or PiSSA "
                              "(PEFT refuses them too)")
        super().add(name, r, alpha, dropout, init, use_rslora, use_dora, lora_bias)

    def delta_weight(self, name: str) -> Tensor:
        """``s · ΔW`` shaped like the parameter (PEFT's ``ParamWrapper.get_delta_weight``)."""
        A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        if self.experts == 1:
            return (B @ A) * s
        A3 = A.reshape(self.experts, -1, A.shape[-1])  # (E, r, in)
        B3 = B.reshape(B.shape[0], -1, self.experts)  # (out, r, E)
        pattern = "ore,eri->eio" if self._transposed() else "ore,eri->eoi"
        return torch.einsum(pattern, B3, A3) * s

    def lora_path(self, x: Tensor, name: str) -> Tensor:
        raise NotImplementedError("LoRA on a parameter changes the weight its module reads, not an output")

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.routing is not None and any(n in self.r for n in [*self.routing.names, *self.routing.shared]):
            raise AdapterStateError("mixed-adapter batches are not supported for LoRA on parameters "
                                    "(target_parameters, MultiheadAttention): the whole batch reads one weight; run "
                                    "each adapter's rows separately")
        substitutions = {} if self.disabled or self.routing is not None else self.substitutions()
        if not substitutions:
            return self.base_layer(*args, **kwargs)
        return functional_call(self.base_layer, substitutions, args, kwargs)

    def substitutions(self) -> dict[str, Tensor]:
        """``{path under base_layer: W + sum of the active unmerged adapters' s · ΔW}`` ({} when none)."""
        names = [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]
        if not names:
            return {}
        param = self.parameter()
        return {self._path(): param + sum(self.delta_weight(n).to(param.dtype) for n in names)}

    # -- merge ---------------------------------------------------------------------------------------------
    def weight_matrix(self) -> Tensor:
        """The parameter as a matrix: 3-D experts stacked along the rows, ``(E · d1, d2)``."""
        return self.to_matrix(self.parameter())

    def to_matrix(self, weight: Tensor) -> Tensor:
        return weight.reshape(-1, weight.shape[-1])

    def from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix.reshape(self.parameter().shape)

    def write_base_weight(self, weight: Tensor) -> None:
        self.parameter().data.copy_(weight)

    def base_snapshot(self) -> dict[str, Tensor]:
        return {"weight": self.parameter().detach().clone()}

    def restore_base(self, snapshot: dict[str, Tensor]) -> None:
        self.write_base_weight(snapshot["weight"])

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, " + super().extra_repr()


def parameter_added_params(shape: tuple[int, ...], r: int) -> int:
    """Parameters LoRA adds to a parameter of ``shape`` (2-D, or 3-D with the experts first): ``r · E · (d1 + d2)``."""
    experts = shape[0] if len(shape) == 3 else 1
    return r * experts * (shape[-1] + shape[-2])


__all__ = ["LoraParameter", "parameter_added_params"]
