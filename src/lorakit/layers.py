"""LoRA wrappers around existing layers, and the registry that picks one per layer type.

A wrapper keeps the original layer as ``base_layer`` (frozen) and any number of named adapters in
``ModuleDict``/``ParameterDict`` containers named as in PEFT (``lora_A``, ``lora_B``, ``lora_embedding_A``,
``lora_embedding_B``, ``lora_magnitude_vector``), so a state-dict key is PEFT's key plus the adapter name.

Forward (Hu et al. 2021, eq. 3): ``y = base_layer(x) + sum_active s · B A dropout(x)``.
DoRA (Liu et al. 2024, eq. 5): ``y = m / ||W + s B A||_row · (W + s B A) x + b`` with the norm detached
(their section 4.3), computed as PEFT does so outputs agree.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

_WEIGHT, _PARAMETERS, _VERSION = (operator.itemgetter("weight"), operator.attrgetter("_parameters"),
                                  operator.attrgetter("_version"))


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
                self._memo[key] = (used, None, None, keep)
            else:
                self._memo[key] = (used, torch.tensor(members, device=device), torch.tensor(place, device=device),
                                   keep)
        return self._memo[key]


class LoraLayer(nn.Module):
    """Base of the wrappers: adapter bookkeeping, merge/unmerge, and the forward loop.

    Subclasses define how A and B are created (`_create`), the delta of the output (`lora_output`) and of
    the weight (`delta_weight`), in the base layer's own weight layout.
    """

    #: Linear-like layers are the ones ``target_modules="all-linear"`` selects.
    linear_like: bool = False
    supports_dora: bool = False
    supports_pissa: bool = False

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
        return None

    @classmethod
    def max_rank(cls, base_layer: nn.Module) -> int:
        """Largest meaningful rank: the smaller side of the weight matrix the update lives in."""
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
            use_dora: bool) -> None:
        """Create adapter ``name`` with rank ``r``; B starts at zero so the output is unchanged."""
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = self.base_layer.weight
        with torch.no_grad():
            self._create(name, r, dtype=weight.dtype if weight.is_floating_point() else torch.float32,
                         device=weight.device)
            self.reset(name, init)
            if use_dora:
                self.lora_magnitude_vector[name] = nn.Parameter(self.row_norm(name), requires_grad=True)
        self.train(self.training)  # new sub-modules (dropout) follow the layer's train/eval mode

    def _create(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
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
        """``s · B A x`` (no dropout)."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> Tensor:
        """``s · B A`` in the base layer's weight layout and dtype."""
        raise NotImplementedError

    def weight_matrix(self) -> Tensor:
        """The base weight as ``(out, in)`` (DoRA's norm runs over ``in``)."""
        return self.base_layer.weight

    def _to_matrix(self, delta: Tensor) -> Tensor:
        """A weight-layout tensor as ``(out, in)``."""
        return delta

    def row_norm(self, name: str, weight: Tensor | None = None) -> Tensor:
        """``||W + s B A||`` per output row, shape ``(out,)`` (DoRA's column norm in the paper's notation)."""
        w = self.weight_matrix() if weight is None else weight
        return torch.linalg.norm(w + self._to_matrix(self.delta_weight(name)), dim=1).to(w.dtype)

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
                result = result + self.dora_output(x, name, base)
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
            base = base_result if bias is None else base_result - bias
        return (scale - 1) * base + scale * self.lora_path(x, name)

    def _base_no_bias(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def routed_output(self, x: Tensor, routing: Routing, base_result: Tensor, out: Tensor | None = None) -> Tensor:
        """Mixed batch: each row gets its own adapter's addition; with ``out`` (no autograd) it is added into
        ``out``, which is returned. Generic version: one pass per distinct adapter over its rows (never per
        row); Linear-like layers override it with one batched matmul."""
        if out is not None:
            return out.add_(self.routed_output(x, routing, base_result))
        runs = routing.runs()
        if runs is not None:  # each adapter's rows are one slice: views in, one concatenation out
            # split (not narrow): its backward is one concatenation, not a zero-filled full-size tensor per slice
            sizes = [stop - start for _, start, stop in runs]
            parts = []
            for (j, _, _), xr, br in zip(runs, x.split(sizes), base_result.split(sizes)):
                name = routing.names[j] if j >= 0 else None
                if name is None or name not in self.r or name in self.merged_adapters:
                    parts.append(torch.zeros_like(br))
                elif name in self.lora_magnitude_vector:
                    parts.append(self.dora_output(xr, name, br).to(base_result.dtype))
                else:
                    parts.append(self.lora_output(xr, name).to(base_result.dtype))
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        out = torch.zeros_like(base_result)
        for j, name in enumerate(routing.names):
            if name not in self.r or name in self.merged_adapters:
                continue
            rows = (routing.index == j).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            xr = x.index_select(0, rows)
            if name in self.lora_magnitude_vector:
                part = self.dora_output(xr, name, base_result.index_select(0, rows))
            else:
                part = self.lora_output(xr, name)
            out = out.index_add(0, rows, part.to(out.dtype))
        return out

    # -- merge ---------------------------------------------------------------------------------------------
    def merged_weight(self, name: str) -> Tensor:
        """The base weight with adapter ``name`` folded in (not written anywhere)."""
        weight = self.base_layer.weight
        if name in self.lora_magnitude_vector:
            matrix = self.weight_matrix()
            norm = self.row_norm(name)
            merged = (self.lora_magnitude_vector[name] / norm).unsqueeze(1) * (
                matrix + self._to_matrix(self.delta_weight(name)))
            return self._from_matrix(merged).to(weight.dtype)
        return weight + self.delta_weight(name).to(weight.dtype)

    def _from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix

    def base_snapshot(self) -> dict[str, Tensor]:
        """A copy of the base layer's tensors, for `restore_base` (safe merge)."""
        return {k: v.detach().clone() for k, v in self.base_layer.state_dict().items()}

    def restore_base(self, snapshot: dict[str, Tensor]) -> None:
        self.base_layer.load_state_dict(snapshot)

    def commit_merge(self, name: str, new_weight: Tensor) -> None:
        if name in self.lora_magnitude_vector:
            self._dora_norm_at_merge[name] = self.row_norm(name).detach()
        self.base_layer.weight.data.copy_(new_weight)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo merges in reverse order, restoring the base weight."""
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight = self.base_layer.weight
                if name in self.lora_magnitude_vector:
                    factor = self.lora_magnitude_vector[name] / self._dora_norm_at_merge.pop(name)
                    matrix = self.weight_matrix() / factor.unsqueeze(1) - self._to_matrix(self.delta_weight(name))
                    weight.data.copy_(self._from_matrix(matrix))
                else:
                    weight.data -= self.delta_weight(name).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"adapters={self.r}, active={self.active_adapters}, merged={self.merged_adapters}"


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` (weight ``(out, in)``): A is ``Linear(in, r)``, B is ``Linear(r, out)``."""

    linear_like = True
    supports_dora = True
    supports_pissa = True

    @classmethod
    def max_rank(cls, base_layer: nn.Module) -> int:
        return min(base_layer.weight.shape)

    @classmethod
    def added_params(cls, base_layer: nn.Module, r: int, use_dora: bool) -> int:
        out_f, in_f = cls.matrix_shape(base_layer)
        return r * (in_f + out_f) + (out_f if use_dora else 0)

    @classmethod
    def matrix_shape(cls, base_layer: nn.Module) -> tuple[int, int]:
        out_f, in_f = base_layer.weight.shape
        return out_f, in_f

    def _create(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        out_f, in_f = self.matrix_shape(self.base_layer)
        self.lora_A[name] = nn.Linear(in_f, r, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(r, out_f, bias=False, dtype=dtype, device=device)

    def lora_path(self, x: Tensor, name: str) -> Tensor:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        # scaling on the rank-r intermediate: r multiplies per token instead of out
        h = F.linear(x, A) * self.scaling[name]
        return h @ _row_major_t(B)  # = F.linear(h, B), see _row_major_t

    def add_lora_output(self, result: Tensor, x: Tensor, name: str, inplace: bool = False) -> Tensor:
        """``result + s · B (A dropout(x))`` as one ``addmm`` over ``(tokens, out)``: no separate tensor for the
        adapter's output, its scaling or the sum (PEFT allocates all three)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if result.dtype != B.dtype or not result.is_contiguous() or result.shape[-1] != B.shape[0]:
            return super().add_lora_output(result, x, name, inplace)
        dropout = self.lora_dropout[name]
        if (isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0 and torch.is_grad_enabled()
                and x.dtype == A.dtype and not inplace):
            # keep only the mask for backward, not a dropped-out copy of the input per adapted layer
            return _DropoutLora.apply(result, x, A, B, self.scaling[name], dropout.p)
        x = dropout(x)
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        h = F.linear(x, A).reshape(-1, A.shape[0])  # (tokens, r)
        flat = result.view(-1, B.shape[0])  # (tokens, out)
        if inplace:
            flat.addmm_(h, B.t(), alpha=self.scaling[name])
            return result
        return torch.addmm(flat, h, _row_major_t(B), alpha=self.scaling[name]).view(result.shape)

    def delta_weight(self, name: str) -> Tensor:
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def _base_no_bias(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_matrix())

    def _pissa_init(self, name: str) -> None:
        # W = U S V^T; A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), so s B A is the top-r part of W.
        # (Meng et al. 2024, "PiSSA", eq. 2-3.)
        weight = self.weight_matrix()
        r, s = self.r[name], self.scaling[name]
        U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = torch.sqrt(S[:r] / s)
        A = root.unsqueeze(1) * Vh[:r]
        B = U[:, :r] * root.unsqueeze(0)
        self.lora_A[name].weight.data.copy_(A)
        self.lora_B[name].weight.data.copy_(B)
        residual = weight.float() - s * (B @ A)
        self.base_layer.weight.data.copy_(self._from_matrix(residual).to(weight.dtype))

    def routed_output(self, x: Tensor, routing: Routing, base_result: Tensor, out: Tensor | None = None) -> Tensor:
        """Each row gets its own adapter's ``s · B A x``: two batched matmuls over groups of rows that share an
        adapter (ranks zero-padded to the largest). With ``out`` (no autograd) the update is added into it; when
        the groups are the batch's rows in order, the second matmul accumulates straight into it (baddbmm).

        Without autograd (serving) the stacks of all adapters are built once and reused until an adapter is
        added, removed or changed in place (tensor version counters), instead of being rebuilt every forward.
        """
        # this runs in every adapted layer of every mixed forward: keep the per-adapter Python work small
        if not self.merged_adapters and routing.name_set() <= self.r.keys():
            present = routing.names
        else:
            present = [n for n in routing.names if n in self.r and n not in self.merged_adapters]
        if not present:
            return torch.zeros_like(base_result) if out is None else out
        magnitudes, dropouts = self.lora_magnitude_vector, self.lora_dropout
        if (magnitudes and any(n in magnitudes for n in present)) or self.training and any(
                isinstance(dropouts[n], nn.Dropout) for n in present):
            return super().routed_output(x, routing, base_result, out)
        if torch.is_grad_enabled():
            names, (A_stack, B_stack) = present, self._stacks(present)
        else:
            names, A_stack, B_stack = self._inference_stacks()
        batch = x.shape[0]
        if routing.index.shape[0] != batch:
            raise ValueError(f"mixed batch: {routing.index.shape[0]} adapter names for a batch of {batch} rows")
        # rows are grouped by adapter and each group meets its adapter's A and B once: copying activations
        # (rows x in) instead of each row's weights (rows x r x (in + out)), which dominated decoding steps
        used, members, place, keep = routing.groups_in(names)
        if used is not None:
            A_stack, B_stack = A_stack.index_select(0, used), B_stack.index_select(0, used)
        x3 = x.reshape(batch, -1, x.shape[-1]).to(A_stack.dtype)
        tokens, groups = x3.shape[1], A_stack.shape[0]
        if members is not None:
            x3 = x3.index_select(0, members)
        grouped = x3.reshape(groups, -1, x3.shape[-1])  # (groups, size * tokens, in)
        # A (r, in) and B (out, r) used transposed, as F.linear uses them: same rounding as one adapter alone
        h = torch.bmm(grouped, A_stack.transpose(1, 2))  # (groups, size * tokens, r)
        if out is not None and place is None and keep is None and out.dtype == h.dtype and out.is_contiguous():
            out.view(groups, -1, B_stack.shape[1]).baddbmm_(h, B_stack.transpose(1, 2))
            return out
        delta = torch.bmm(h, B_stack.transpose(1, 2)).reshape(-1, tokens, B_stack.shape[1])
        if place is not None:
            delta = delta.index_select(0, place)  # (batch, tokens, out)
        if keep is not None:
            delta = delta * keep.to(delta.dtype).view(-1, 1, 1)
        delta = delta.reshape(base_result.shape).to(base_result.dtype)
        return delta if out is None else out.add_(delta)

    def _stacks(self, names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """A stacked ``(len(names), r_max, in)`` and ``s · B`` stacked ``(len(names), out, r_max)``, ranks
        zero-padded to the largest."""
        r_max = max(self.r[n] for n in names)
        A_stack = torch.stack([F.pad(self.lora_A[n].weight, (0, 0, 0, r_max - self.r[n])) for n in names])
        B_stack = torch.stack([F.pad(self.lora_B[n].weight * self.scaling[n], (0, r_max - self.r[n]))
                               for n in names])
        return A_stack, B_stack

    def _inference_stacks(self) -> tuple[list[str], Tensor, Tensor]:
        """`_stacks` of every unmerged adapter, cached while names, scalings and tensors stay the same."""
        # checked in every layer of every forward, so the loops over adapters run in C (map): the names, merges
        # and scalings, then every A and B weight's identity, version counter (bumped by in-place updates:
        # optimizer steps, copy_) and storage (``.data =`` swaps it without a version bump)
        A_mods, B_mods = self.lora_A._modules, self.lora_B._modules
        flat = [*map(_WEIGHT, map(_PARAMETERS, A_mods.values())), *map(_WEIGHT, map(_PARAMETERS, B_mods.values()))]
        key = (tuple(self.r), tuple(self.merged_adapters), tuple(self.scaling.items()), tuple(map(id, flat)),
               tuple(map(_VERSION, flat)), tuple(map(Tensor.data_ptr, flat)))
        cached = self.__dict__.get("_routing_cache")
        if cached is not None and cached[0] == key:
            return cached[2], cached[3], cached[4]
        names = [n for n in self.r if n not in self.merged_adapters]
        A_stack, B_stack = self._stacks(names)
        # the cache keeps the weights it was built from alive, so their ids cannot be reused meanwhile
        self.__dict__["_routing_cache"] = (key, flat, names, A_stack, B_stack)
        return names, A_stack, B_stack


def _row_major_t(B: Tensor) -> Tensor:
    """``B.t()`` (``(r, out)``) as a contiguous copy when B is trained. Autograd computes the gradient of a matmul
    operand in that operand's memory layout: for the transposed view ``B.t()`` that is ``gᵀ h``, a
    ``(out, tokens) @ (tokens, r)`` product that runs at a fraction of the rate of ``hᵀ g``,
    ``(r, tokens) @ (tokens, out)``, on CPU BLAS (MiniLM, 1,024 tokens, out 1,536: 2.6 vs 1.0 ms). Copying the
    ``r x out`` weight costs microseconds. Not on GPUs, where cuBLAS takes either layout and the copy would be
    two more kernel launches per layer and step (unmeasured there: kept as it was)."""
    if B.requires_grad and B.device.type == "cpu" and torch.is_grad_enabled():
        return B.t().contiguous()
    return B.t()


class _DropoutLora(torch.autograd.Function):
    """``result + s · B A dropout(x)`` for training with dropout. Saves the input itself (one tensor shared by
    every layer reading it, e.g. q/k/v, and often kept by the layer before anyway) and a boolean mask, instead of
    one dropped-out fp32 copy per adapted layer; the dropped input is recomputed in backward. Same values and
    gradients as ``dropout`` followed by the two products. SmolLM2, all linear layers, 8 x 192 tokens, dropout
    0.05: peak RSS 4,860 -> 4,261 MB."""

    @staticmethod
    def forward(ctx: Any, result: Tensor, x: Tensor, A: Tensor, B: Tensor, scaling: float, p: float) -> Tensor:
        # uniform draws compared with 1 - p: Bernoulli(1 - p) like nn.Dropout's bernoulli_, at half its CPU cost
        # (8 x 128 x 384: 1.7 vs 3.2 ms), in float32 whatever x's dtype so the probability is not rounded
        keep = torch.rand(x.shape, device=x.device) < 1 - p
        x2 = x.reshape(-1, x.shape[-1])
        dropped = x2 * keep.reshape(x2.shape) * (1.0 / (1 - p))
        h = dropped @ A.t()  # (tokens, r)
        out = torch.addmm(result.reshape(-1, B.shape[0]), h, B.t(), alpha=scaling)
        ctx.save_for_backward(x, keep, A, B, h)
        ctx.scaling, ctx.p = scaling, p
        return out.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, keep, A, B, h = ctx.saved_tensors
        s, factor = ctx.scaling, 1.0 / (1 - ctx.p)
        g = grad.reshape(-1, B.shape[0])  # (tokens, out)
        grad_h = (g @ B) * s  # (tokens, r)
        # (r, tokens) @ (tokens, out), transposed: the fast orientation on CPU BLAS (see _row_major_t)
        grad_B = (h.t() @ g).t() * s if ctx.needs_input_grad[3] else None
        grad_A = grad_x = None
        if ctx.needs_input_grad[2]:
            x2 = x.reshape(-1, x.shape[-1])
            grad_A = grad_h.t() @ (x2 * keep.reshape(x2.shape) * factor)
        if ctx.needs_input_grad[1]:
            grad_x = ((grad_h @ A) * keep.reshape(-1, x.shape[-1]) * factor).view(x.shape)
        return grad if ctx.needs_input_grad[0] else None, grad_x, grad_A, grad_B, None, None


class LoraConv1D(LoraLinear):
    """LoRA on transformers' GPT-2 ``Conv1D``, whose weight is stored transposed: ``(in, out)``."""

    @classmethod
    def max_rank(cls, base_layer: nn.Module) -> int:
        return min(base_layer.weight.shape)

    @classmethod
    def matrix_shape(cls, base_layer: nn.Module) -> tuple[int, int]:
        in_f, out_f = base_layer.weight.shape
        return out_f, in_f

    def weight_matrix(self) -> Tensor:
        return self.base_layer.weight.T

    def _to_matrix(self, delta: Tensor) -> Tensor:
        return delta.T

    def _from_matrix(self, matrix: Tensor) -> Tensor:
        return matrix.T

    def delta_weight(self, name: str) -> Tensor:
        return super().delta_weight(name).T


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding`` (weight ``(num, dim)``): ``lora_embedding_A (r, num)``, ``lora_embedding_B
    (dim, r)``; the row lookup replaces the first matmul. As in PEFT, A starts at zero and B random."""

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
        return r * (num + dim)

    def _create(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
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

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.lora_embedding_A[name], self.lora_embedding_B[name]]

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

    def delta_weight(self, name: str) -> Tensor:
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]


class LoraConv2d(LoraLayer):
    """LoRA on ``nn.Conv2d``: A is a conv with the base kernel, stride and padding to ``r`` channels,
    B a 1x1 conv to the output channels (as PEFT). Grouped/dilated convolutions are skipped."""

    @classmethod
    def skip_reason(cls, base_layer: nn.Module) -> str | None:
        if base_layer.groups != 1:
            kind = "depthwise" if base_layer.groups == base_layer.in_channels else "grouped"
            return (f"{kind} convolution (groups={base_layer.groups}): its update is block-diagonal, "
                    "not a low-rank matrix; adapt the pointwise convolutions around it instead")
        if base_layer.dilation != (1, 1):
            return f"dilated convolution (dilation={base_layer.dilation}) is not supported"
        if base_layer.padding_mode != "zeros":
            return f"padding_mode={base_layer.padding_mode!r} is not supported"
        return None

    @classmethod
    def max_rank(cls, base_layer: nn.Module) -> int:
        kh, kw = base_layer.kernel_size
        return min(base_layer.out_channels, base_layer.in_channels * kh * kw)

    @classmethod
    def added_params(cls, base_layer: nn.Module, r: int, use_dora: bool) -> int:
        kh, kw = base_layer.kernel_size
        return r * (base_layer.in_channels * kh * kw + base_layer.out_channels)

    def _create(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        base = self.base_layer
        self.lora_A[name] = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                      bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, 1, 1, bias=False, dtype=dtype, device=device)

    def lora_path(self, x: Tensor, name: str) -> Tensor:
        return self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]

    def delta_weight(self, name: str) -> Tensor:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in, kh, kw), (out, r, 1, 1)
        return torch.einsum("or,rihw->oihw", B[:, :, 0, 0], A) * self.scaling[name]


#: layer type -> LoRA wrapper. Lookup walks the type's MRO, so subclasses of ``nn.Linear`` work too.
LAYER_REGISTRY: dict[type[nn.Module], type[LoraLayer]] = {
    nn.Linear: LoraLinear,
    nn.Embedding: LoraEmbedding,
    nn.Conv2d: LoraConv2d,
}


def register_layer(layer_type: type[nn.Module], wrapper: type[LoraLayer]) -> None:
    """Teach lorakit a new layer type: ``register_layer(MyLinear, MyLoraLinear)``."""
    if not (isinstance(wrapper, type) and issubclass(wrapper, LoraLayer)):
        raise TypeError(f"wrapper must be a subclass of lorakit.layers.LoraLayer, got {wrapper!r}")
    LAYER_REGISTRY[layer_type] = wrapper


def wrapper_for(module: nn.Module) -> type[LoraLayer] | None:
    """The registered wrapper for ``module``'s type (or a base class of it), else None."""
    _register_transformers_layers()
    for cls in type(module).__mro__:
        if cls in LAYER_REGISTRY:
            return LAYER_REGISTRY[cls]
    return None


def _register_transformers_layers() -> None:
    # transformers is imported only if the user's model already did; GPT-2 style Conv1D lives there.
    import sys

    if "transformers" not in sys.modules or getattr(_register_transformers_layers, "done", False):
        return
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old/new transformers
        return
    LAYER_REGISTRY.setdefault(Conv1D, LoraConv1D)
    _register_transformers_layers.done = True  # type: ignore[attr-defined]


class ModulesToSave(nn.Module):
    """A module trained in full for each adapter (e.g. a classifier head), as PEFT's ``ModulesToSaveWrapper``:
    ``original_module`` stays frozen, ``modules_to_save[name]`` is adapter ``name``'s trainable copy."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.routing: Routing | None = None

    def add(self, name: str) -> None:
        import copy

        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(True)
        self.modules_to_save[name] = clone

    def remove(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters())

    def active_module(self) -> nn.Module:
        """The first active adapter's copy (PEFT's rule), or the original when none/disabled."""
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.routing is None or self.disabled:
            return self.active_module()(x, *args, **kwargs)
        # mixed batch: the original on every row, then each adapter's copy on its own rows
        runs = self.routing.runs()
        if runs is not None:  # contiguous rows per adapter: each row runs only through its own module
            parts = []
            for (j, _, _), xr in zip(runs, x.split([stop - start for _, start, stop in runs])):
                name = self.routing.names[j] if j >= 0 else None
                module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
                parts.append(module(xr, *args, **kwargs))
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        out = self.original_module(x, *args, **kwargs)
        for j, name in enumerate(self.routing.names):
            rows = (self.routing.index == j).nonzero().squeeze(1)
            if name in self.modules_to_save and rows.numel():
                part = self.modules_to_save[name](x.index_select(0, rows), *args, **kwargs)
                out = out.index_copy(0, rows, part)
        return out
