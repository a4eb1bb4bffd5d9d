"""One training loop for 1..N processes: torchrun is detected from the environment (``RANK``/``WORLD_SIZE``).

Multi-node: run the same command on every node with
``torchrun --nnodes=2 --node_rank=K --nproc_per_node=G --rdzv_backend=c10d --rdzv_endpoint=HOST:29500
-m lorakit.cli train RECIPE``; gloo is used on CPU, nccl on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


#: a GPU process group that can also run collectives on CPU tensors: FSDP's CPU offload keeps shards and
#: gradients in CPU memory, and gathering them (clipping's norm, saving the adapter) runs there (gloo)
GPU_AND_CPU_BACKEND = "cuda:nccl,cpu:gloo"


def setup(device: str | None = None, cpu_collectives: bool = False) -> World:
    """Join the process group when launched by torchrun; otherwise a world of one. ``cpu_collectives``: on a
    GPU also a gloo backend for CPU tensors (``train.fsdp_cpu_offload``); the first call decides."""
    want_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        chosen = device if want_cuda and device and device.startswith("cuda:") else "cuda" if want_cuda else "cpu"
        return World(device=torch.device(chosen))  # train.device=cuda:N is honoured, not run on cuda:0
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend=(GPU_AND_CPU_BACKEND if cpu_collectives else "nccl") if want_cuda
                                else "gloo")
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    return World(rank, size, local_rank, dev)


def all_reduce_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    """Sum over processes (a no-op in a world of one); ``value`` must be on the process group's device."""
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_ints(values: Sequence[int], world: World) -> list[int]:
    """The main process's ``values`` (int64) on every process: e.g. a name every process must agree on."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.int64, device=world.device)  # nccl: on the GPU
    dist.broadcast(tensor, src=0)
    return [int(v) for v in tensor.cpu()]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def teardown(world: World) -> None:
    if dist.is_initialized():  # also the group of one `single_process_group` made
        dist.destroy_process_group()


def single_process_group(device: torch.device) -> None:
    """A process group of this process alone (an in-memory store: no port, no network), for FSDP over one
    device: a world of one that offloads its weights to CPU memory (`wrap` with ``offload=True``)."""
    if not dist.is_initialized():
        dist.init_process_group(GPU_AND_CPU_BACKEND if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


def is_sharded(sharding: str, world: World, offload: bool = False) -> bool:
    """Whether `wrap` shards the model with FSDP2: ``sharding="fsdp"`` under torchrun, or in one process that
    offloads its shards to CPU memory (``offload``, ``train.fsdp_cpu_offload``)."""
    return sharding == "fsdp" and (world.distributed or offload)


def wrap(model: torch.nn.Module, world: World, sharding: str = "ddp", blocks: Sequence[str] | None = None,
         precision: str = "fp32", offload: bool = False) -> torch.nn.Module:
    """The module a training step runs: ``DistributedDataParallel`` over the processes of ``world`` (gradients
    averaged in backward), or with ``sharding="fsdp"`` the model itself sharded in place by FSDP2 per block
    (`lorakit.sharding.shard`; ``blocks``: class names of the units, default the model's ``_no_split_modules``;
    ``offload``: the shards kept in CPU memory, also for one process); the model itself in a world of one. The
    one place a model is wrapped for training, so every loop (`lorakit.train.run_training`) shards or
    replicates it the same way. Call it before building the optimizer: FSDP replaces the parameters."""
    if sharding == "fsdp" and offload and not world.distributed:
        single_process_group(world.device)  # one GPU whose model does not fit it: FSDP offloads over a group of 1
    elif not world.distributed:
        return model
    if sharding == "fsdp":
        from .sharding import shard

        return shard(model, world.device.type, world.size, blocks, precision, offload)
    return torch.nn.parallel.DistributedDataParallel(model)
