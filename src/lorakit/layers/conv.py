"""LoRA on convolutions: one wrapper for ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``, grouped ones included.

As in PEFT, A is a convolution with the base kernel, stride and padding from all input channels to ``r``
channels, and B a 1x1 (1, 1x1x1) convolution from ``r`` to the output channels with the base's ``groups``; the
update ``s · B A`` is then a kernel shaped like the base weight (merging is possible) when ``groups == 1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import AdapterStateError
from .base import LoraLayer

#: spatial dimensions -> convolution class / function
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoraConv(LoraLayer):
    """LoRA on an n-d convolution (weight ``(out, in / groups, *kernel)``): ``lora_A`` is ``ConvNd(in, r, kernel,
    stride, padding)``, ``lora_B`` is ``ConvNd(r, out, 1, groups=groups)``.

    A subclass that overrides ``forward`` (e.g. "same" padding computed from the input size, as TF-ported vision
    models do) keeps it: A's product runs through the base layer's own ``forward`` with A's kernel, so it sees the
    same padded input as the base kernel."""

    supports_dora = True
    supports_lora_bias = True
    follows_own_forward = True

    @classmethod
    def skip_reason(cls, base_layer: nn.Module) -> str | None:
        if any(d != 1 for d in base_layer.dilation):
            return (f"dilated convolution (dilation={base_layer.dilation}): PEFT's A convolution ignores dilation, "
                    "so its output would not line up with the base output")
        if base_layer.padding_mode != "zeros":
            return f"padding_mode={base_layer.padding_mode!r} is not supported (A pads with zeros, as in PEFT)"
        if base_layer.groups != 1 and _overrides_forward(base_layer):
            return (f"grouped convolution (groups={base_layer.groups}) whose class {type(base_layer).__name__} "
                    "overrides forward: A (all input channels) cannot run through that forward")
        return super().skip_reason(base_layer)

    @classmethod
    def config_problem(cls, base_layer: nn.Module, r: int, use_dora: bool) -> str | None:
        if r % base_layer.groups:
            return (f"rank {r} is not a multiple of groups={base_layer.groups} (B is grouped like the base, as in "
                    "PEFT); use a multiple of the groups, or rank_pattern for this module")
        if use_dora and base_layer.groups != 1:
            return (f"DoRA on a grouped convolution (groups={base_layer.groups}) is not supported: the update "
                    "spans every input channel, the grouped weight does not; exclude it or turn DoRA off")
        return None

    @classmethod
    def max_rank(cls, base_layer: nn.Module) -> int:
        return min(base_layer.out_channels, base_layer.in_channels * math.prod(base_layer.kernel_size))

    @classmethod
    def added_params(cls, base_layer: nn.Module, r: int, use_dora: bool) -> int:
        a = r * base_layer.in_channels * math.prod(base_layer.kernel_size)
        b = base_layer.out_channels * (r // base_layer.groups)
        return a + b + (base_layer.out_channels if use_dora else 0)

    @property
    def dims(self) -> int:
        """Spatial dimensions (1, 2 or 3)."""
        return self.base_layer.weight.dim() - 2

    def _create(self, name: str, r: int, dtype: torch.dtype, device: torch.device, bias: bool = False) -> None:
        base, conv = self.base_layer, _CONV[self.dims]
        self.lora_A[name] = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False,
                                 dtype=dtype, device=device)
        self.lora_B[name] = conv(r, base.out_channels, 1, 1, groups=base.groups, bias=bias, dtype=dtype,
                                 device=device)

    def _own_conv(self, x: Tensor, kernel: Tensor, module: nn.Module | None = None) -> Tensor:
        """``x`` convolved with ``kernel`` (no bias) the way the base layer convolves: through its own ``forward``
        when its class overrides it, else with ``module`` (A) or the base's settings."""
        base = self.base_layer
        if _overrides_forward(base):
            return functional_call(base, {"weight": kernel, "bias": None}, (x,))
        if module is not None:
            return module(x)
        return _CONV_FN[self.dims](x, kernel, None, base.stride, base.padding, base.dilation, base.groups)

    def lora_path(self, x: Tensor, name: str) -> Tensor:
        A = self.lora_A[name]
        if x.dtype != A.weight.dtype:
            x = x.to(A.weight.dtype)
        return self.lora_B[name](self._own_conv(x, A.weight, A)) * self.scaling[name]

    def _base_no_bias(self, x: Tensor) -> Tensor:
        return self._own_conv(x, self.base_layer.weight)

    def _bias_view(self, bias: Tensor) -> Tensor:
        return bias.view(-1, *(1,) * self.dims)

    def delta_weight(self, name: str) -> Tensor:
        """``s · B A`` as a kernel ``(out, in, *kernel)``; for a grouped convolution a dense kernel over all input
        channels (B block-diagonal), which the grouped base weight cannot hold."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in, *k), (out, r / groups, 1...)
        r, groups = A.shape[0], self.base_layer.groups
        B2 = B.reshape(B.shape[0], -1)
        if groups > 1:  # each group of outputs reads its own r / groups channels of A
            B2 = torch.block_diag(*B2.split(B.shape[0] // groups))
        return (B2 @ A.reshape(r, -1)).reshape(B.shape[0], *A.shape[1:]) * self.scaling[name]

    def weight_matrix(self) -> Tensor:
        """The kernel as ``(out, in · kernel)``; a grouped one expanded to every input channel (zeros outside each
        group's block), the space its LoRA update lives in (merging a grouped update is refused)."""
        weight, groups = self.base_layer.weight, self.base_layer.groups
        if groups > 1:
            out_g, in_g = weight.shape[0] // groups, weight.shape[1]
            dense = weight.new_zeros(weight.shape[0], in_g * groups, *weight.shape[2:])
            for g in range(groups):
                dense[g * out_g:(g + 1) * out_g, g * in_g:(g + 1) * in_g] = weight[g * out_g:(g + 1) * out_g]
            weight = dense
        return weight.reshape(weight.shape[0], -1)

    def to_matrix(self, weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1)

    def from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix.reshape(self.base_layer.weight.shape)

    def magnitude_shape(self) -> tuple[int, ...]:
        return (1, -1, *(1,) * self.dims)  # PEFT's: the norm with keepdim, transposed

    def check_mergeable(self, name: str) -> None:
        if self.base_layer.groups != 1:
            raise AdapterStateError(f"adapter {name!r} cannot be merged into a grouped convolution (groups="
                                    f"{self.base_layer.groups}): its update spans every input channel; use it "
                                    "unmerged (PEFT refuses this merge too)")
        super().check_mergeable(name)


def _overrides_forward(base_layer: nn.Module) -> bool:
    """True when ``base_layer``'s class replaces ``forward`` of the convolution class it derives from."""
    owner = next((cls for cls in type(base_layer).__mro__ if cls in _CONV.values()), None)
    return owner is not None and type(base_layer).forward is not owner.forward


#: the name this wrapper had when it handled 2-d convolutions only
LoraConv2d = LoraConv
