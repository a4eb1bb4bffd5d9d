"""A quantized frozen base (the QLoRA idea, Dettmers et al. 2023) in plain torch, so it runs on CPU.

`quantize_model(model, "int8" | "nf4")` swaps ``nn.Linear`` layers for `QuantizedLinear`, which stores the
weight as

- ``int8``: one signed byte per weight and an fp32 scale per output row (absmax / 127): ~0.25x of fp32;
- ``nf4``: 4-bit NormalFloat codes (QLoRA section 3, the 16 quantiles of N(0, 1) scaled to [-1, 1]) packed two
  per byte, one absmax per block of 64 weights, and those absmax values themselves quantized to int8 per block
  of 256 after removing their mean ("double quantization", QLoRA section 3): ~0.13x of fp32.

The weight is dequantized on the fly in ``forward``; LoRA wraps a `QuantizedLinear` like any Linear
(`LoraQuantizedLinear`), so ``y = dequant(Wq) x + s B A x``. Merging into a quantized base re-quantizes
``W + s B A``, which is lossy: `merge_drift` reports how far the merged weights moved from the exact sum.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .layers import LoraLinear, register_layer

Scheme = Literal["int8", "nf4"]

# QLoRA's NF4 code book (Appendix E of the paper; the values bitsandbytes uses)
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
NF4_BLOCK = 64
ABSMAX_BLOCK = 256


def quantize(weight: Tensor, scheme: Scheme) -> dict[str, Tensor]:
    """Quantized storage of ``weight`` ``(out, in)``: named tensors (codes and scales)."""
    weight = weight.detach().float()
    if scheme == "int8":
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        return {"qweight": torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), "scale": scale}
    flat = weight.reshape(-1)
    blocks = F.pad(flat, (0, (-flat.numel()) % NF4_BLOCK)).reshape(-1, NF4_BLOCK)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
    levels = NF4_LEVELS.to(weight.device)
    codes = torch.bucketize((blocks / absmax[:, None]).reshape(-1), (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
    # double quantization: the absmax values -> int8 per block of 256, after removing their mean
    offset = absmax.mean()
    centred = absmax - offset
    groups = F.pad(centred, (0, (-centred.numel()) % ABSMAX_BLOCK)).reshape(-1, ABSMAX_BLOCK)
    absmax_scale = groups.abs().amax(dim=1).clamp_min(1e-12) / 127
    return {"qweight": codes[0::2] | (codes[1::2] << 4),  # two 4-bit codes per byte
            "absmax_q": torch.round(groups / absmax_scale[:, None]).clamp(-127, 127).to(torch.int8),
            "absmax_scale": absmax_scale, "absmax_offset": offset.reshape(1)}


def dequantize(stored: dict[str, Tensor], scheme: Scheme, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """Inverse of `quantize` (up to the quantization error): the weight as ``shape`` in ``dtype``."""
    if scheme == "int8":
        return (stored["qweight"].float() * stored["scale"][:, None]).to(dtype)
    n_blocks = -(-shape[0] * shape[1] // NF4_BLOCK)
    absmax = (stored["absmax_q"].float() * stored["absmax_scale"][:, None]).reshape(-1)[:n_blocks]
    absmax = absmax + stored["absmax_offset"]
    packed = stored["qweight"]
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1).long()
    values = NF4_LEVELS.to(absmax.device)[codes].reshape(-1, NF4_BLOCK) * absmax[:, None]
    return values.reshape(-1)[:shape[0] * shape[1]].reshape(shape).to(dtype)


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight ``(out, in)`` is stored quantized; forward dequantizes it."""

    def __init__(self, linear: nn.Linear, scheme: Scheme, *, quantize_weight: bool = True) -> None:
        super().__init__()
        if scheme not in ("int8", "nf4"):
            raise ConfigError(f"quantization scheme must be 'int8' or 'nf4', got {scheme!r}")
        self.scheme = scheme
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if quantize_weight:
            self.quantize_(linear.weight)

    @classmethod
    def empty(cls, linear: nn.Linear, scheme: Scheme) -> QuantizedLinear:
        """A layer shaped like ``linear`` (typically on the meta device, `lorakit.quant_load`) with no stored
        weight yet: `quantize_` stores it when it is read; the bias (if any) is replaced the same way."""
        return cls(linear, scheme, quantize_weight=False)

    def quantize_(self, weight: Tensor) -> None:
        """(Re)store ``weight`` ``(out, in)`` in quantized form."""
        for name, tensor in quantize(weight, self.scheme).items():
            self.register_buffer(name, tensor)

    def dequantize(self) -> Tensor:
        """The weight as ``(out, in)`` in the layer's compute dtype."""
        return dequantize(dict(self.named_buffers()), self.scheme, (self.out_features, self.in_features),
                          self.compute_dtype)

    @property
    def weight(self) -> Tensor:
        """A dequantized copy, for code that reads ``.weight`` (writing to it changes nothing)."""
        return self.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        return _QuantizedMatmul.apply(x, self, None if self.bias is None else self.bias.to(x.dtype))

    def storage_bytes(self) -> int:
        """Bytes of the stored weight (codes and scales; bias excluded)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


class _QuantizedMatmul(torch.autograd.Function):
    """``x W^T + b`` with ``W`` dequantized in forward and again in backward, never kept between them: plain
    ``F.linear`` would save the dequantized weight for the input's gradient, so training would hold every
    layer's full-precision weight, as much memory as an unquantized base (measured on SmolLM2: 1,616 MiB
    int8 vs 1,516 MiB fp32; see docs/scaling.md)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: QuantizedLinear, bias: Tensor | None) -> Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize().to(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        grad_x = grad @ ctx.layer.dequantize().to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


class LoraQuantizedLinear(LoraLinear):
    """LoRA over a `QuantizedLinear`: the base stays quantized and frozen; A, B are full precision."""

    supports_pissa = False  # the residual W - sBA would have to be re-quantized: use init="default"

    @classmethod
    def max_rank(cls, base_layer: nn.Module) -> int:
        return min(base_layer.in_features, base_layer.out_features)

    @classmethod
    def matrix_shape(cls, base_layer: nn.Module) -> tuple[int, int]:
        return base_layer.out_features, base_layer.in_features

    def weight_matrix(self) -> Tensor:
        return self.base_layer.dequantize()

    def write_base_weight(self, weight: Tensor) -> None:
        """Merging and unmerging re-quantize ``W``: the DoRA/LoRA merge formulas are the layers' own."""
        self.base_layer.quantize_(weight)


register_layer(QuantizedLinear, LoraQuantizedLinear)


def quantized_linear_names(model: nn.Module, skip: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Names of the layers `quantize_model` replaces: every ``nn.Linear`` except the output layer
    (``get_output_embeddings``) and names ending in one of ``skip``."""
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    return [name for name, module in model.named_modules() if type(module) is nn.Linear and module is not output
            and not any(name == s or name.endswith("." + s) for s in skip)]


def quantize_model(model: nn.Module, scheme: Scheme, skip: list[str] | tuple[str, ...] = ()) -> nn.Module:
    """Replace every ``nn.Linear`` (except names ending in one of ``skip`` and the output layer) by a frozen
    `QuantizedLinear`, in place; returns the model."""
    # names only: a list of the modules would keep every replaced full-precision weight alive until the end, so
    # the whole fp32 model and the whole quantized one would sit in memory together (SmolLM2: 975 MB)
    for name in quantized_linear_names(model, skip):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, QuantizedLinear(linear, scheme).to(linear.weight.device))
        del linear  # freed now, not at the end of the loop
    return model


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(stored bytes of quantized weights, fp32 bytes the same weights take unquantized)."""
    stored = full = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            stored += module.storage_bytes()
            full += module.in_features * module.out_features * 4
    return stored, full


@torch.no_grad()
def merge_drift(layer: LoraQuantizedLinear, name: str) -> dict[str, float]:
    """How far merging adapter ``name`` into the quantized base moves the weight away from the exact
    ``W + s B A`` once re-quantized: max absolute and relative (Frobenius) error."""
    base = layer.base_layer
    exact = layer.merged_weight(name).float()
    shape = (base.out_features, base.in_features)
    requantized = dequantize(quantize(exact, base.scheme), base.scheme, shape, torch.float32)
    return {"max_abs": float((requantized - exact).abs().max()),
            "relative": float((requantized - exact).norm() / exact.norm().clamp_min(1e-12))}
