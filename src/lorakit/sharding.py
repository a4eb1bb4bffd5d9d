"""Sharded LoRA training with FSDP2 (``torch.distributed.fsdp.fully_shard``): ``train.sharding: fsdp``.

Under DDP every process holds the whole frozen base, so a model larger than one device cannot train however many
devices there are. `shard` applies ``fully_shard`` to every transformer block (the classes the model names in
``_no_split_modules``, or those given) and then to the root: each parameter, frozen or trained, is split along
its first dimension over the processes, so each holds about 1/N of the base and of the adapters. A block is
gathered just before its forward (and again for backward) and freed after. Frozen and trained parameters may
share a block: FSDP2 shards per parameter, and only trained ones get gradients (reduce-scattered, averaged over
processes like DDP's all-reduce, so `lorakit.train.train_step`'s loss scaling holds unchanged). On a GPU with
``train.precision: bf16`` the blocks compute in bf16 and reduce gradients in fp32 (``MixedPrecisionPolicy``).

Saving: `gather_adapter` collects only the adapter's tensors (every process takes part; no process ever holds
the whole base), `check_adapter` compares what was gathered with the sharded model (tensor count, global
shapes, norms) so an empty or partial adapter is never written (peft #453, #2892), and the main process writes
it in PEFT format with `lorakit.io.save_adapter` (``tensors=``).

Checkpoints and ``--resume``: `lorakit.sharded_checkpoints` (each process writes its shard; any number of
processes resumes). Not supported (refused by `lorakit.recipes` with what to do instead): a quantized base
(packed integer buffers are not sharded), full fine-tuning.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError, LorakitError


class ShardedSaveError(LorakitError, RuntimeError):
    """Gathered adapter tensors do not match the sharded model: nothing is written."""


def block_modules(model: nn.Module, class_names: Sequence[str] | None = None) -> list[nn.Module]:
    """The modules sharded as units: instances of ``class_names`` (default: the model's ``_no_split_modules``,
    the blocks Hugging Face never splits across devices), outermost first, never one inside another."""
    names = list(class_names or getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ConfigError(f"{type(model).__name__} names no transformer blocks (_no_split_modules) (fix: "
                          "train.fsdp_blocks=[BlockClassName, ...], the classes of its repeated layers)")
    blocks: list[nn.Module] = []
    for module in model.modules():
        if type(module).__name__ in names and module is not model:
            if not any(module in set(outer.modules()) for outer in blocks):
                blocks.append(module)
    if not blocks:
        raise ConfigError(f"no module of class {names} in {type(model).__name__} (fix: train.fsdp_blocks names "
                          "the classes of its repeated layers)")
    return blocks


def shard(model: nn.Module, mesh_device: str, world_size: int, class_names: Sequence[str] | None = None,
          precision: str = "fp32", offload: bool = False) -> nn.Module:
    """``fully_shard`` every block of `block_modules` and then the root, in place; returns ``model``.

    ``precision="bf16"`` on ``cuda``: blocks compute in bf16, gradients are reduced in fp32. ``offload``: FSDP2's
    ``CPUOffloadPolicy``: every shard (frozen base and adapters) and its gradient live in CPU memory and are
    copied to the GPU per block; the optimizer steps on the CPU. Build the optimizer afterwards: sharding
    replaces the parameters with ``DTensor`` ones.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(mesh_device, (world_size,))
    kwargs: dict = {"mesh": mesh}
    if mesh_device == "cuda" and precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in block_modules(model, class_names):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_bytes(model: nn.Module, trainable: bool = False) -> tuple[int, int]:
    """(bytes this process holds, bytes of the whole tensors) of the frozen (or trained) parameters."""
    from torch.distributed.tensor import DTensor

    local = whole = 0
    for param in model.parameters():
        if param.requires_grad != trainable:
            continue
        size = param.element_size()
        whole += param.numel() * size
        local += (param.to_local() if isinstance(param, DTensor) else param).numel() * size
    return local, whole


def _full(tensor: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def reshard(model: nn.Module) -> None:
    """Put every FSDP unit back in its sharded state. After a forward without backward (evaluation) the root
    unit stays gathered and its parameters are plain tensors whose storage FSDP frees later: reading them
    then reads freed memory."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gather_adapter(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """Adapter ``adapter_name``'s whole tensors under PEFT's keys, on every process (a collective: all call it,
    in the same order). Only the adapter is gathered, never the frozen base."""
    from .peft_format import adapter_state_dict

    reshard(model)
    return {key: _full(value).detach().cpu().clone() for key, value in adapter_state_dict(model, adapter_name).items()}


def adapter_signature(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[tuple[int, ...], float]]:
    """Per PEFT key: the whole tensor's shape and its 2-norm, computed from the shards (a collective)."""
    from torch.distributed.tensor import DTensor

    from .peft_format import adapter_state_dict

    reshard(model)
    signature = {}
    for key, value in adapter_state_dict(model, adapter_name).items():
        squares = (value.double() ** 2).sum()
        total = squares.full_tensor() if isinstance(squares, DTensor) else squares
        signature[key] = (tuple(value.shape), float(total.sqrt()))
    return signature


def check_adapter(model: nn.Module, tensors: dict[str, Tensor], adapter_name: str = "default",
                  rtol: float = 1e-5) -> None:
    """Refuse (`ShardedSaveError`) gathered ``tensors`` that are not the sharded model's adapter: other keys or
    none at all, another shape (a local shard instead of the whole tensor), another norm (zeros, a shard
    repeated). A collective: every process calls it and raises the same error."""
    expected = adapter_signature(model, adapter_name)
    if not tensors or set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ShardedSaveError(f"gathered adapter has {len(tensors)} tensors, the model {len(expected)} "
                               f"(missing {missing[:3]}, unexpected {extra[:3]}); nothing written")
    for key, (shape, norm) in expected.items():
        got = tensors[key]
        if tuple(got.shape) != shape:
            raise ShardedSaveError(f"gathered {key} has shape {tuple(got.shape)}, the model's is {shape} (a shard, "
                                   "not the whole tensor); nothing written")
        got_norm = float(got.double().norm())
        if abs(got_norm - norm) > rtol * max(norm, 1e-12) + 1e-12:
            raise ShardedSaveError(f"gathered {key} has norm {got_norm:.6g}, the model's is {norm:.6g}; nothing "
                                   "written")
