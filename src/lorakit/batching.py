"""Which rows each optimizer step trains on, as `MicroBatch`es: the seeded order of an epoch (optionally grouped
by length), cut into micro-batches, cycled through epochs; the number of steps of a run. Used by every loop
(`lorakit.train.run_training` callers: `lorakit train`, multi-task, continual)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from . import distributed
from .errors import ConfigError
from .data import pad_multiple
from .evaluate import encode, to_device
from .precision import torch_dtype
from .recipes import TrainArgs


@dataclass
class MicroBatch:
    """The rows of one forward and backward pass of a step.

    ``inputs``: model inputs and ``labels`` as `lorakit.evaluate.encode` makes them (classification labels
    ``(rows,)``, causal-LM labels ``(rows, seq)`` with -100 where nothing is learned), on the model's device.
    ``groups``: contiguous row segments ``(name, rows)`` whose losses are averaged separately (the tasks of a
    mixed batch); None is one group over all rows. ``adapters``: each row's adapter for a mixed batch
    (`lorakit.route`), with ``shared`` adapters on every row; None runs the active adapters on every row.
    """

    inputs: dict[str, Tensor]
    groups: tuple[tuple[str, int], ...] | None = None
    adapters: Sequence[str | None] | None = None
    shared: Sequence[str] = ()

    def segments(self) -> tuple[tuple[str, int], ...]:
        return self.groups if self.groups is not None else (("", int(self.inputs["labels"].shape[0])),)


def run_steps(n_rows: int, args: TrainArgs) -> tuple[int, int]:
    """``(optimizer steps per epoch, optimizer steps of the run)`` for ``n_rows`` training rows: ``max_steps``
    when set (the data is cycled through as many epochs as it takes), else ``epochs`` passes."""
    steps_per_epoch = n_rows // args.batch_size // args.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"{n_rows} training rows are fewer than one step needs "
                          f"(batch_size {args.batch_size} x grad_accum {args.grad_accum}); lower them")
    if args.max_steps is not None:
        return steps_per_epoch, args.max_steps
    return steps_per_epoch, math.ceil(args.epochs * steps_per_epoch)


@dataclass
class DataOrder:
    """Which rows each optimizer step trains on: epoch ``e`` visits the rows in ``randperm(n, seed + e)``
    (sorted by length within chunks of 50 batches when ``lengths`` are given: `group_by_length`), cut into
    micro-batches of ``batch_size`` rows, ``grad_accum`` per step; steps run on through the epochs."""

    n_rows: int
    args: TrainArgs
    lengths: Tensor | None = None
    _orders: dict[int, Tensor] = field(default_factory=dict, repr=False)

    @property
    def steps_per_epoch(self) -> int:
        return run_steps(self.n_rows, self.args)[0]

    def micro_batches(self, step: int) -> list[Tensor]:
        """Row indices of optimizer step ``step`` (counted from 0 over all epochs), one tensor per micro-batch."""
        args = self.args
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._orders:
            order = torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(args.seed + epoch))
            if self.lengths is not None:
                order = group_by_length(order, self.lengths, chunk=50 * args.batch_size)
            self._orders = {epoch: order}
        order, first = self._orders[epoch], k * args.grad_accum
        return [order[(first + i) * args.batch_size:(first + i + 1) * args.batch_size] for i in range(args.grad_accum)]


def encode_rows(task: str, rows: Any, micro: Sequence[Tensor], tokenizer: Any, args: TrainArgs,
                image_size: int | None, world: distributed.World) -> list[MicroBatch]:
    """`MicroBatch`es of global row indices ``micro``: this process takes every ``world.size``-th row; text
    padded to ``args.max_length`` at most, in steps of `lorakit.data.pad_multiple` for the run's compute dtype."""
    compute = "bf16" if args.dtype == "fp32" and args.precision == "bf16" else args.dtype  # autocast, or as stored
    multiple = pad_multiple(torch_dtype(compute), world.device)
    out = []
    for indices in micro:
        mine = indices[world.rank::world.size].tolist()
        inputs = encode(task, [rows[i] for i in mine], tokenizer, args.max_length, image_size, multiple=multiple)
        out.append(MicroBatch(to_device(inputs, world.device)))
    return out


def row_lengths(task: str, rows: Any, tokenizer: Any) -> Tensor | None:
    """Token count per row (text tasks), to group rows of similar length; None for images."""
    if task == "sequence-classification":
        texts = [row["text"] for row in rows]
    elif task == "causal-lm":
        texts = [row.get("prompt", "") + row.get("completion", "") if "messages" not in row
                 else " ".join(m["content"] for m in row["messages"]) for row in rows]
    else:
        return None
    return torch.tensor([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])


def group_by_length(order: Tensor, lengths: Tensor, chunk: int) -> Tensor:
    """Within each chunk of the shuffled order, sort rows by length (longest first): batches then hold rows
    of similar length while the epoch still visits every row once, in an order fixed by the seed."""
    parts = []
    for part in order.split(chunk):
        parts.append(part[torch.argsort(lengths[part], descending=True, stable=True)])
    return torch.cat(parts)
