"""Mixed-adapter batches: which rows use which adapter (`Routing`), and the products that apply each row's
adapter to its rows (`grouped_lora`, `per_adapter`).

`adapters.route` builds one `Routing` per batch and hands it to every LoRA layer; a layer then adds each row's
own update in one pass over the batch, rows grouped by adapter (never one pass per row).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Routing:
    """Per-row adapter choice for a mixed batch: ``names[index[i]]`` is row i's adapter (-1: base model);
    the ``shared`` adapters are added on every row, on top of the row's own."""

    names: list[str]
    index: Tensor  # (batch,) long
    shared: list[str] = field(default_factory=list)
    _memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def host_index(self) -> list[int]:
        """``index`` as a Python list, read from the device once per routing (a GPU sync), then memoized."""
        if "host" not in self._memo:
            self._memo["host"] = self.index.tolist()
        return self._memo["host"]

    @classmethod
    def for_rows(cls, adapter_names: Sequence[str | None], device: torch.device | str,
                 shared: Sequence[str] = ()) -> Routing:
        """The routing of a batch whose row ``i`` uses ``adapter_names[i]`` (None: the base model), its index on
        ``device`` (the model's: the layers index activations with it) and its host copy memoized, so planning
        the groups never reads the index back from a GPU."""
        distinct = list(dict.fromkeys(n for n in adapter_names if n is not None))
        position = {name: i for i, name in enumerate(distinct)}
        rows = [-1 if n is None else position[n] for n in adapter_names]
        routing = cls(distinct, torch.tensor(rows, dtype=torch.long, device=device), list(shared))
        routing._memo["host"] = rows
        return routing

    def name_set(self) -> frozenset[str]:
        if "names" not in self._memo:
            self._memo["names"] = frozenset(self.names)
        return self._memo["names"]

    def sole_adapter(self) -> list[str] | None:
        """``[name]`` when every row uses adapter ``name`` and no adapter is shared (the batch is then that
        adapter's single-adapter batch), else None. Memoized."""
        if "sole" not in self._memo:
            sole = len(self.names) == 1 and not self.shared and -1 not in self.host_index()
            self._memo["sole"] = list(self.names) if sole else None
        return self._memo["sole"]

    def runs(self) -> list[tuple[int, int, int]] | None:
        """``(adapter position or -1, start, stop)`` for each run of rows sharing an adapter, in row order, when
        every adapter's rows form one contiguous run (as in multi-task batches, one task after another);
        None otherwise. Contiguous rows are views (``split``) instead of gathered copies. Memoized."""
        if "runs" not in self._memo:
            values = self.host_index()
            runs: list[tuple[int, int, int]] = []
            for row, v in enumerate(values):
                if runs and runs[-1][0] == v:
                    runs[-1] = (v, runs[-1][1], row + 1)
                else:
                    runs.append((v, row, row + 1))
            contiguous = len({v for v, _, _ in runs}) == len(runs)
            self._memo["runs"] = runs if contiguous else None  # type: ignore[assignment]
        return self._memo["runs"]  # type: ignore[return-value]

    def groups_in(self, order: Sequence[str]) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """Rows grouped by their adapter's position in ``order``, for one batched matmul over adapter groups.

        Returns ``used`` (the positions the groups stand for; None: all of ``order``, in order), ``members``
        (flattened ``(groups, size)``: each group's rows, padded with row 0, whose results are never read),
        ``place`` (``(batch,)``: each row's index in the flattened groups) and ``keep`` (``(batch,)``: 0 for
        rows whose adapter is not in ``order``; None when there are none). ``members`` and ``place`` are None
        when the groups are the batch's rows in order (equal contiguous groups). Memoized per ``order``.
        """
        key = ("groups", *order)
        if key not in self._memo:
            self._memo[key] = self._plan_groups(order)
        return self._memo[key]

    def rows_in(self, order: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """Each row's adapter as a position in ``order``: ``slot`` (``(batch,)`` long; 0 for rows whose adapter is not
        in ``order``) and ``keep`` (``(batch,)``: 0 for those rows; None when there are none), for products that
        read each row's own A and B. Memoized per ``order``: every layer with the same adapters shares it."""
        key = ("rows", *order)
        if key not in self._memo:
            position = {name: i for i, name in enumerate(order)}
            lookup = [position.get(n, -1) for n in self.names] + [-1]
            slot = [lookup[i] for i in self.host_index()]  # index -1 (base row) reads the trailing entry
            device = self.index.device
            keep = None if min(slot, default=0) >= 0 else torch.tensor([float(s >= 0) for s in slot], device=device)
            self._memo[key] = (torch.tensor([max(s, 0) for s in slot], device=device), keep)
        return self._memo[key]

    def pickers(self, order: Sequence[str]) -> tuple[list[str], Callable[[Sequence[Any]], Sequence[Any]],
                                                     Callable[[Sequence[Any]], Sequence[Any]]]:
        """The adapters of this batch that are in ``order`` (in this routing's order) and two functions that select
        their entries from per-adapter lists laid out over ``order``: ``pick_ab`` from a list holding each adapter's
        A then each adapter's B (``2 · len(order)`` entries), ``pick`` from a list with one entry per adapter. Each
        returns a tuple (the list itself when that is all of it). Memoized per ``order``: every layer with the
        same adapters shares them."""
        key = ("pickers", *order)
        if key not in self._memo:
            where = {name: i for i, name in enumerate(order)}
            used = [name for name in self.names if name in where]
            positions = [where[name] for name in used]
            n = len(order)
            self._memo[key] = (used, _picker(positions + [n + i for i in positions], 2 * n), _picker(positions, n))
        return self._memo[key]

    def _plan_groups(self, order: Sequence[str]) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        position = {name: i for i, name in enumerate(order)}
        lookup = [position.get(n, len(order)) for n in self.names] + [len(order)]
        slot = [lookup[i] for i in self.host_index()]  # index -1 (base row) reads the trailing entry
        rows_of: dict[int, list[int]] = {}
        for row, s in enumerate(slot):
            if s < len(order):
                rows_of.setdefault(s, []).append(row)
        # most adapters in use: read the whole stack (empty groups cost little); else copy the used ones
        groups = list(range(len(order))) if 2 * len(rows_of) >= len(order) else sorted(rows_of)
        size = max((len(rows) for rows in rows_of.values()), default=1)
        members, place = [], [0] * len(slot)
        for g in groups:
            rows = rows_of.get(g, [])
            for k in range(size):
                if k < len(rows):
                    place[rows[k]] = len(members)
                members.append(rows[k] if k < len(rows) else 0)
        device = self.index.device
        used = None if len(groups) == len(order) else torch.tensor(groups, device=device)
        keep = None if all(s < len(order) for s in slot) else \
            torch.tensor([float(s < len(order)) for s in slot], device=device)
        if members == place == list(range(len(slot))):  # equal contiguous groups in order: plain reshapes
            return used, None, None, keep
        return used, torch.tensor(members, device=device), torch.tensor(place, device=device), keep


def _picker(positions: list[int], length: int) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """A function returning the entries at ``positions`` of a sequence of ``length`` as a tuple (the sequence itself
    when that is all of it), gathered in C (`operator.itemgetter`)."""
    if positions == list(range(length)):
        return _whole
    if len(positions) <= 1:
        return lambda seq: tuple(seq[i] for i in positions)
    return operator.itemgetter(*positions)


def _whole(seq: Sequence[Any]) -> Sequence[Any]:
    return seq


def stack_adapters(parts: Sequence[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """``(A, B, s)`` per adapter -> A stacked ``(n, r_max, in)`` and ``s · B`` stacked ``(n, out, r_max)``, ranks
    zero-padded to the largest (the padded rows and columns add zeros)."""
    r_max = max(A.shape[0] for A, _, _ in parts)
    A_stack = torch.stack([F.pad(A, (0, 0, 0, r_max - A.shape[0])) for A, _, _ in parts])
    B_stack = torch.stack([F.pad(B * s, (0, r_max - B.shape[1])) for _, B, s in parts])
    return A_stack, B_stack


def grouped_lora(x: Tensor, routing: Routing, names: Sequence[str], A_stack: Tensor, B_stack: Tensor,
                 base_result: Tensor, out: Tensor | None = None) -> Tensor:
    """Each row's ``s · B A x`` for linear-like layers, as two batched matmuls.

    ``x``: ``(batch, ..., in)``; ``A_stack``/``B_stack`` from `stack_adapters` over ``names``; ``base_result``:
    ``(batch, ..., out)`` (its shape and dtype are the result's). With ``out`` (no autograd) the update is added
    into it and it is returned.

    Two layouts, chosen by which moves fewer bytes. Rows with at least ``r_max`` tokens each (prefill, training)
    meet their own adapter's A and B, gathered per row (`_per_row`): ``r x (in + out)`` weights per row, no more
    than the row's activations, and the update accumulates straight into ``out``. Shorter rows (decoding: one token
    each) are grouped by adapter instead (`_per_group`): their activations are gathered, not each row's weights.
    """
    batch = x.shape[0]
    if routing.index.shape[0] != batch:
        raise ValueError(f"mixed batch: {routing.index.shape[0]} adapter names for a batch of {batch} rows")
    x3 = x.reshape(batch, -1, x.shape[-1]).to(A_stack.dtype)
    groups = routing.groups_in(names)
    # every adapter used, equal contiguous groups in order: plain views, nothing to gather
    in_order = groups[0] is None and groups[1] is None and groups[3] is None
    if x3.shape[1] >= A_stack.shape[1] and not in_order:
        return _per_row(x3, routing, names, A_stack, B_stack, base_result, out)
    return _per_group(x3, groups, A_stack, B_stack, base_result, out)


def _per_row(x3: Tensor, routing: Routing, names: Sequence[str], A_stack: Tensor, B_stack: Tensor,
             base_result: Tensor, out: Tensor | None) -> Tensor:
    """`grouped_lora` with each row's own A ``(batch, r, in)`` and B ``(batch, out, r)`` gathered from the stacks:
    ``x3`` ``(batch, tokens, in)`` is read in place (no gathered copy of the activations, no update-sized
    temporaries: the second product accumulates into ``out``)."""
    slot, keep = routing.rows_in(names)
    h = torch.bmm(x3, A_stack.index_select(0, slot).transpose(1, 2))  # (batch, tokens, r)
    if keep is not None:  # rows whose adapter is not in this layer add nothing (h is small: rank-wide)
        h = h * keep.to(h.dtype).view(-1, 1, 1)
    B_rows = B_stack.index_select(0, slot).transpose(1, 2).to(h.dtype)  # (batch, r, out)
    if out is not None and out.dtype == h.dtype and out.is_contiguous():
        out.view(x3.shape[0], -1, B_rows.shape[2]).baddbmm_(h, B_rows)
        return out
    delta = torch.bmm(h, B_rows).reshape(base_result.shape).to(base_result.dtype)
    return delta if out is None else out.add_(delta)


def _per_group(x3: Tensor, groups: tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None],
               A_stack: Tensor, B_stack: Tensor, base_result: Tensor, out: Tensor | None) -> Tensor:
    """`grouped_lora` over groups of rows sharing an adapter (`Routing.groups_in`): each group meets its adapter's
    A and B once, copying activations (rows x in) instead of each row's weights (rows x r x (in + out)), which
    dominated decoding steps; when the groups are the batch's rows in order, the second matmul accumulates
    straight into ``out`` (baddbmm)."""
    used, members, place, keep = groups
    if used is not None:
        A_stack, B_stack = A_stack.index_select(0, used), B_stack.index_select(0, used)
    tokens, groups_n = x3.shape[1], A_stack.shape[0]
    if members is not None:
        x3 = x3.index_select(0, members)
    grouped = x3.reshape(groups_n, -1, x3.shape[-1])  # (groups, size * tokens, in)
    # A (r, in) and B (out, r) used transposed, as F.linear uses them: same rounding as one adapter alone
    h = torch.bmm(grouped, A_stack.transpose(1, 2))  # (groups, size * tokens, r)
    if out is not None and place is None and keep is None and out.dtype == h.dtype and out.is_contiguous():
        out.view(groups_n, -1, B_stack.shape[1]).baddbmm_(h, B_stack.transpose(1, 2).to(h.dtype))
        return out
    delta = torch.bmm(h, B_stack.transpose(1, 2).to(h.dtype)).reshape(-1, tokens, B_stack.shape[1])
    if place is not None:
        delta = delta.index_select(0, place)  # (batch, tokens, out)
    if keep is not None:
        delta = delta * keep.to(delta.dtype).view(-1, 1, 1)
    delta = delta.reshape(base_result.shape).to(base_result.dtype)
    return delta if out is None else out.add_(delta)


#: ``part(rows of x, adapter name, rows of the base result)`` -> that adapter's addition on those rows, or None
#: when the adapter adds nothing there
RowPart = Callable[[Tensor, str, Tensor], "Tensor | None"]


def per_adapter(x: Tensor, routing: Routing, base_result: Tensor, part: RowPart) -> Tensor:
    """Each row's addition, ``(batch, ...)`` like ``base_result``, computed by ``part`` once per distinct adapter
    over its rows (never per row). Any layer type; linear-like layers use `grouped_lora` instead."""
    runs = routing.runs()
    if runs is not None:  # each adapter's rows are one slice: views in, one concatenation out
        # split (not narrow): its backward is one concatenation, not a zero-filled full-size tensor per slice
        sizes = [stop - start for _, start, stop in runs]
        parts = []
        for (j, _, _), xr, br in zip(runs, x.split(sizes), base_result.split(sizes)):
            delta = part(xr, routing.names[j], br) if j >= 0 else None
            parts.append(torch.zeros_like(br) if delta is None else delta.to(base_result.dtype))
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    out = torch.zeros_like(base_result)
    for j, name in enumerate(routing.names):
        rows = (routing.index == j).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        delta = part(x.index_select(0, rows), name, base_result.index_select(0, rows))
        if delta is not None:
            out = out.index_add(0, rows, delta.to(out.dtype))
    return out


__all__ = ["Routing", "RowPart", "grouped_lora", "per_adapter", "stack_adapters"]
