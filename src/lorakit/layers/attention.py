"""LoRA on ``nn.MultiheadAttention`` (CLIP/OpenCLIP-style models), as PEFT does it.

``nn.MultiheadAttention`` has no ``nn.Linear`` for its in-projection (one packed ``in_proj_weight`` of shape
``(3·embed, embed)`` for query, key and value) and never calls its ``out_proj``'s ``forward`` (it reads
``out_proj.weight``). So both updates are weight updates: ``in_proj_weight + s · B A`` (``A (r, embed)``,
``B (r, 3·embed)``) and ``out_proj.weight + s · B' A'``, applied by running the module's own ``forward`` with the
two weights replaced. PEFT's file keys: ``attn.lora_A.weight`` and ``attn.base_layer.out_proj.lora_A.weight``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import LoraLayer
from .parameter import LoraParameter


class LoraMultiheadAttention(LoraParameter):
    """LoRA on the packed in-projection of ``nn.MultiheadAttention`` plus (a nested `LoraParameter`) its
    out-projection. No dropout, DoRA or ``lora_bias`` (PEFT has none there); no mixed batches."""

    #: the base parameter this wrapper adapts (the fingerprint of an unwrapped layer reads it)
    wrapped_parameter = "in_proj_weight"
    #: ``{parameter under the base: path of its nested wrapper under this one}``
    nested_parameters = {"out_proj.weight": "base_layer.out_proj"}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, self.wrapped_parameter)
        # out_proj's wrapper: installed in the attention layer by `attach`, not before (a shape probe stays apart)
        object.__setattr__(self, "_pending_out", None)

    @classmethod
    def skip_reason(cls, base_layer: nn.Module) -> str | None:
        if not getattr(base_layer, "_qkv_same_embed_dim", False):
            return "separate query/key/value projections (kdim/vdim != embed_dim): PEFT adapts the packed one only"
        if not isinstance(base_layer.out_proj, (nn.Linear, LoraParameter)):
            return f"out_proj is a {type(base_layer.out_proj).__name__}, not a Linear"
        return super().skip_reason(base_layer)

    @classmethod
    def max_rank(cls, base_layer: nn.Module) -> int:
        return base_layer.embed_dim

    @classmethod
    def added_params(cls, base_layer: nn.Module, r: int, use_dora: bool) -> int:
        return 6 * r * base_layer.embed_dim  # in: r (E + 3E), out: r (E + E)

    def out_proj_lora(self) -> LoraParameter:
        """The wrapper of ``out_proj.weight``: the installed one, else one waiting for `attach`."""
        out = self.base_layer.out_proj
        if isinstance(out, LoraParameter):
            return out
        if self._pending_out is None or self._pending_out.base_layer is not out:
            object.__setattr__(self, "_pending_out", LoraParameter(out, "weight").train(self.training))
        return self._pending_out

    def add(self, name: str, r: int, alpha: float, dropout: float, init: str, use_rslora: bool,
            use_dora: bool, lora_bias: bool = False) -> None:
        super().add(name, r, alpha, dropout, init, use_rslora, use_dora, lora_bias)
        self.out_proj_lora().add(name, r, alpha, dropout, init, use_rslora, use_dora, lora_bias)

    def attach(self) -> None:
        if not isinstance(self.base_layer.out_proj, LoraParameter):
            self.base_layer.out_proj = self.out_proj_lora()
            object.__setattr__(self, "_pending_out", None)

    def nested_layers(self) -> list[tuple[str, LoraLayer]]:
        out = self.base_layer.out_proj
        return [("base_layer.out_proj", out)] if isinstance(out, LoraParameter) else []

    def remove(self, name: str) -> None:
        super().remove(name)
        out = self.out_proj_lora()
        if name in out.r:
            out.remove(name)

    def substitutions(self) -> dict[str, Tensor]:
        subs = super().substitutions()
        out = self.base_layer.out_proj
        if isinstance(out, LoraParameter):  # its forward never runs: MultiheadAttention reads out_proj.weight
            subs.update({f"out_proj.base_layer.{path}": w for path, w in out.substitutions().items()})
        return subs


__all__ = ["LoraMultiheadAttention"]
