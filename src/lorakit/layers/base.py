"""`LoraLayer`: what every wrapper shares — adapter bookkeeping, the forward loop, DoRA, merge and unmerge.

Forward (Hu et al. 2021, eq. 3): ``y = base_layer(x) + sum_active s · B A dropout(x)``.
DoRA (Liu et al. 2024, eq. 5): ``y = m / ||W + s B A||_row · (W + s B A) x + b`` with the norm detached
(their section 4.3), computed as PEFT does so outputs agree.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..config import lora_scaling
from ..errors import ConfigError
from ..routing import Routing, per_adapter

#: PEFT's names of the per-adapter tensor containers in a LoRA layer (one source: file keys, state-dict filters)
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


class LoraLayer(nn.Module):
    """Base of the wrappers: adapter bookkeeping, merge/unmerge, and the forward loop.

    A subclass says how A and B are created (`_create`), the update's output ``s · B A x`` (`lora_path`), the
    update as a weight in the base layer's own layout (`delta_weight`), and how that layout reads as an
    ``(out, in)`` matrix (`weight_matrix`, `to_matrix`, `from_matrix`), which DoRA and merging work on.
    """

    #: Linear-like layers are the ones ``target_modules="all-linear"`` selects.
    linear_like: bool = False
    supports_dora: bool = False
    supports_pissa: bool = False
    #: ``lora_bias`` (a trained bias on B, PEFT's option): where PEFT has it
    supports_lora_bias: bool = False
    #: dropout on the LoRA path's input (a parameter target has no input of its own)
    supports_dropout: bool = True
    #: the wrapper runs the LoRA path through the base layer's own ``forward`` (so a subclass overriding it,
    #: e.g. to pad, is honoured); wrappers without it skip such subclasses with the reason
    follows_own_forward: bool = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.routing: Routing | None = None
        self._dora_norm_at_merge: dict[str, Tensor] = {}

    # -- what can be wrapped -------------------------------------------------------------------------------
    @classmethod
    def skip_reason(cls, base_layer: nn.Module) -> str | None:
        """Why this layer cannot get LoRA (shown in the targeting report), or None."""
        from .registry import registered_type

        owner = registered_type(base_layer)
        if not cls.follows_own_forward and owner is not None and type(base_layer).forward is not owner.forward:
            kind = type(base_layer).__name__
            return (f"{kind} overrides {owner.__name__}.forward, so a plain {owner.__name__} update may not fit "
                    f"its output; lorakit.register_layer({kind}, wrapper) to adapt it")
        return None

    @classmethod
    def config_problem(cls, base_layer: nn.Module, r: int, use_dora: bool) -> str | None:
        """Why rank ``r`` (and DoRA, where `supports_dora`) cannot be used on this layer, with the fix, or None."""
        return None

    @classmethod
    def max_rank(cls, base_layer: nn.Module) -> int:
        """Largest rank that adds a direction: the smaller side of the weight matrix the update lives in. Higher
        ranks are accepted (as in PEFT) but only waste parameters."""
        raise NotImplementedError

    @classmethod
    def added_params(cls, base_layer: nn.Module, r: int, use_dora: bool) -> int:
        raise NotImplementedError

    # -- adapters ------------------------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The base layer's weight, so code reading ``module.weight`` keeps working after wrapping."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add(self, name: str, r: int, alpha: float, dropout: float, init: str, use_rslora: bool,
            use_dora: bool, lora_bias: bool = False) -> None:
        """Create adapter ``name`` with rank ``r``; B (and its bias with ``lora_bias``) starts at zero so the
        output is unchanged."""
        if lora_bias and not self.supports_lora_bias:
            raise ConfigError(f"lora_bias is not supported on {type(self.base_layer).__name__} layers (PEFT has it on "
                              "Linear, Conv1D and convolutions only)")
        if lora_bias and self.bias is None:
            warnings.warn(f"lora_bias on a {type(self.base_layer).__name__} without a bias: this adapter cannot be "
                          "merged", stacklevel=2)
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = lora_scaling(r, alpha, use_rslora)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = self.weight_matrix()
        with torch.no_grad():
            self._create(name, r, dtype=weight.dtype if weight.is_floating_point() else torch.float32,
                         device=weight.device, bias=lora_bias)
            self.reset(name, init)
            if use_dora:
                self.lora_magnitude_vector[name] = nn.Parameter(self.row_norm(name), requires_grad=True)
        self.train(self.training)  # new sub-modules (dropout) follow the layer's train/eval mode

    def nested_layers(self) -> list[tuple[str, LoraLayer]]:
        """LoRA wrappers inside this one, with their paths under it (`lora_modules` walks into them)."""
        return [("base_layer", self.base_layer)] if isinstance(self.base_layer, LoraLayer) else []

    def attach(self) -> None:
        """Called once the wrapper stands in the model, after `add`: wrappers that adapt a sub-layer of their base
        too (MultiheadAttention's ``out_proj``) install it here, so a throwaway wrapper never changes the model."""

    def _create(self, name: str, r: int, dtype: torch.dtype, device: torch.device, bias: bool = False) -> None:
        raise NotImplementedError

    def reset(self, name: str, init: str) -> None:
        """(Re)initialise A and B: Kaiming-uniform A and zero B (``default``), N(0, 1/r) A (``gaussian``),
        or PiSSA (top-r singular vectors; the base weight becomes the residual)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if init == "pissa":
            self._pissa_init(name)
            return
        if init == "gaussian":
            nn.init.normal_(A, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)
        if self.lora_B[name].bias is not None:
            nn.init.zeros_(self.lora_B[name].bias)

    def remove(self, name: str) -> None:
        for container in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in container:
                del container[name]
        for table in (self.r, self.lora_alpha, self.scaling, self._dora_norm_at_merge):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_names(self) -> list[str]:
        return list(self.r)

    def ab_weights(self, name: str) -> tuple[Tensor, Tensor]:
        """Adapter ``name``'s A and B tensors (rank along A's dim 0 and B's dim 1)."""
        return self.lora_A[name].weight, self.lora_B[name].weight

    def lora_bias(self, name: str) -> Tensor | None:
        """Adapter ``name``'s trained bias on B (``lora_bias``), unscaled, or None."""
        module = self.lora_B[name] if name in self.lora_B else None
        return None if module is None else getattr(module, "bias", None)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = list(self.lora_A[name].parameters()) + list(self.lora_B[name].parameters())
        if name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[name])
        return params

    # -- math ----------------------------------------------------------------------------------------------
    def lora_output(self, x: Tensor, name: str) -> Tensor:
        """``s · B A dropout(x)``, shaped like the base layer's output."""
        return self.lora_path(self.lora_dropout[name](x), name)

    def lora_path(self, x: Tensor, name: str) -> Tensor:
        """``s · B A x`` (no dropout; with ``lora_bias``, ``s · (B A x + b_B)``)."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> Tensor:
        """``s · B A`` in the base layer's weight layout and dtype."""
        raise NotImplementedError

    def weight_matrix(self) -> Tensor:
        """The base weight as ``(out, in)`` (DoRA's norm runs over ``in``)."""
        return self.base_layer.weight

    def to_matrix(self, weight: Tensor) -> Tensor:
        """A tensor in the base weight's layout as ``(out, in)``, as `weight_matrix` reads the base weight."""
        return weight

    def from_matrix(self, matrix: Tensor) -> Tensor:
        """Inverse of `to_matrix`: ``(out, in)`` back to the base weight's layout."""
        return matrix

    def delta_matrix(self, name: str) -> Tensor:
        """``s · B A`` of adapter ``name`` as ``(out, in)``, the orientation of `weight_matrix` (`delta_weight`
        keeps the base layer's layout: ``(in, out)`` for HF ``Conv1D``, a kernel for convolutions)."""
        return self.to_matrix(self.delta_weight(name))

    def magnitude_shape(self) -> tuple[int, ...]:
        """Shape of DoRA's magnitude as PEFT stores it, ``-1`` standing for the outputs (``(out,)`` here)."""
        return (-1,)

    def row_norm(self, name: str, weight: Tensor | None = None) -> Tensor:
        """``||W + s B A||`` per output row, shaped as `magnitude_shape` (DoRA's column norm in the paper's
        notation). ``weight``: the ``(out, in)`` base matrix to use instead of `weight_matrix`."""
        w = self.weight_matrix() if weight is None else weight
        return torch.linalg.norm(w + self.delta_matrix(name), dim=1).to(w.dtype).reshape(self.magnitude_shape())

    def _pissa_init(self, name: str) -> None:
        raise ConfigError(f"init='pissa' is not supported for {type(self.base_layer).__name__} layers")

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        base = result
        names = self.active_adapters if self.routing is None else self.routing.shared
        # without autograd the additions go into the output in place, unless a DoRA adapter still reads it
        inplace = not torch.is_grad_enabled() and not any(n in self.lora_magnitude_vector for n in names)
        if self.routing is not None:
            if inplace:
                result = self.routed_output(x, self.routing, base, out=result)
            else:
                result = result + self.routed_output(x, self.routing, base)
        for name in names:
            if name in self.merged_adapters or name not in self.r:
                continue
            if name in self.lora_magnitude_vector:
                result = result + self.dora_output(x, name, base).to(result.dtype)  # fp32 magnitude, bf16 base
            else:
                result = self.add_lora_output(result, x, name, inplace)
        return result

    def add_lora_output(self, result: Tensor, x: Tensor, name: str, inplace: bool = False) -> Tensor:
        """``result + s · B A dropout(x)``; ``inplace``: written into ``result`` (no autograd, result not shared).
        Linear-like layers fuse the last matmul, the scaling and the addition into one ``addmm``."""
        delta = self.lora_output(x, name).to(result.dtype)
        return result.add_(delta) if inplace else result + delta

    def dora_output(self, x: Tensor, name: str, base_result: Tensor) -> Tensor:
        """DoRA's addition to the base output: ``(m/n - 1) · W x + (m/n) · s B A x`` with n detached."""
        scale = self.lora_magnitude_vector[name] / self.row_norm(name).detach()
        dropout = self.lora_dropout[name]
        if isinstance(dropout, nn.Dropout) and self.training:
            x = dropout(x)
            base = self._base_no_bias(x)  # as PEFT: W x recomputed on the dropped-out input
        else:
            bias = self.bias
            base = base_result if bias is None else base_result - self._bias_view(bias)
        return (scale - 1) * base + scale * self.lora_path(x, name)

    def _bias_view(self, bias: Tensor) -> Tensor:
        """The base bias shaped to broadcast over the output (channels last here)."""
        return bias

    def _base_no_bias(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def routed_output(self, x: Tensor, routing: Routing, base_result: Tensor, out: Tensor | None = None) -> Tensor:
        """Mixed batch: each row gets its own adapter's addition; with ``out`` (no autograd) it is added into
        ``out``, which is returned. Generic version: one pass per distinct adapter over its rows (`per_adapter`);
        Linear-like layers override it with one batched matmul."""
        delta = per_adapter(x, routing, base_result, self._row_part)
        return delta if out is None else out.add_(delta)

    def _row_part(self, x: Tensor, name: str, base_rows: Tensor) -> Tensor | None:
        if name not in self.r or name in self.merged_adapters:
            return None
        if name in self.lora_magnitude_vector:
            return self.dora_output(x, name, base_rows)
        return self.lora_output(x, name)

    # -- merge ---------------------------------------------------------------------------------------------
    def merged_weight(self, name: str) -> Tensor:
        """The base weight with adapter ``name`` folded in (not written anywhere), in the base layout."""
        self.check_mergeable(name)
        matrix = self.weight_matrix()
        if name in self.lora_magnitude_vector:
            merged = dora_merge(matrix, self.delta_matrix(name), self.lora_magnitude_vector[name], self.row_norm(name))
            return self.from_matrix(merged).to(matrix.dtype)
        return self.from_matrix(matrix + self.delta_matrix(name).to(matrix.dtype))

    def check_mergeable(self, name: str) -> None:
        """Raise `AdapterStateError` when adapter ``name`` cannot be folded into this layer's weights."""
        if self.lora_bias(name) is not None and self.bias is None:
            from ..errors import AdapterStateError

            raise AdapterStateError(f"adapter {name!r} has lora_bias but this {type(self.base_layer).__name__} has "
                                    "no bias to fold it into (PEFT refuses this merge too)")

    def write_base_weight(self, weight: Tensor) -> None:
        """Store ``weight`` (base layout) as the base layer's weight (quantized bases re-quantize it)."""
        self.base_layer.weight.data.copy_(weight)

    def base_snapshot(self) -> dict[str, Tensor]:
        """A copy of the base layer's tensors, for `restore_base` (safe merge)."""
        return {k: v.detach().clone() for k, v in self.base_layer.state_dict().items()}

    def restore_base(self, snapshot: dict[str, Tensor]) -> None:
        self.base_layer.load_state_dict(snapshot)

    def commit_merge(self, name: str, new_weight: Tensor) -> None:
        """Write `merged_weight`'s result and fold adapter ``name``'s ``lora_bias`` into the base bias."""
        if name in self.lora_magnitude_vector:
            self._dora_norm_at_merge[name] = self.row_norm(name).detach()
        self.write_base_weight(new_weight)
        if (extra := self.lora_bias(name)) is not None:
            self.bias.data += (extra * self.scaling[name]).to(self.bias.dtype)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo merges in reverse order, restoring the base weight (and bias)."""
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                matrix = self.weight_matrix()
                if name in self.lora_magnitude_vector:
                    magnitude, norm = self.lora_magnitude_vector[name], self._dora_norm_at_merge.pop(name)
                    matrix = dora_unmerge(matrix, self.delta_matrix(name), magnitude, norm)
                else:
                    matrix = matrix - self.delta_matrix(name).to(matrix.dtype)
                self.write_base_weight(self.from_matrix(matrix).to(matrix.dtype))
                if (extra := self.lora_bias(name)) is not None:
                    self.bias.data -= (extra * self.scaling[name]).to(self.bias.dtype)

    def extra_repr(self) -> str:
        return f"adapters={self.r}, active={self.active_adapters}, merged={self.merged_adapters}"


def dora_merge(matrix: Tensor, delta: Tensor, magnitude: Tensor, norm: Tensor) -> Tensor:
    """DoRA's merged weight (Liu et al. 2024, eq. 5): ``m / ||W + ΔW||_row · (W + ΔW)``, all ``(out, in)``;
    ``magnitude`` and ``norm`` hold one value per output row, in any shape."""
    return (magnitude / norm).reshape(-1, 1) * (matrix + delta)


def dora_unmerge(merged: Tensor, delta: Tensor, magnitude: Tensor, norm_at_merge: Tensor) -> Tensor:
    """Inverse of `dora_merge` given the norm it used: ``W = merged / (m / n) - ΔW``."""
    return merged / (magnitude / norm_at_merge).reshape(-1, 1) - delta


class TransposedWeight:
    """Mixin for wrappers whose base stores its weight as ``(in, out)`` (transformers' ``Conv1D``, and
    ``nn.Embedding`` read as ``(num_embeddings, dim)``): the ``(out, in)`` matrix LoRA works on is its transpose."""

    base_layer: nn.Module

    def weight_matrix(self) -> Tensor:
        return self.base_layer.weight.T

    def to_matrix(self, weight: Tensor) -> Tensor:
        return weight.T

    def from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix.T
