"""LoRA on linear layers: ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored ``(in, out)``).

A is ``Linear(in, r)``, B is ``Linear(r, out)`` (with a bias under ``lora_bias``); the last product, the scaling and
the addition to the base output run as one ``addmm``, and training with dropout keeps a mask instead of a
dropped-out copy of the input (`_DropoutLora`).
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from ..routing import Routing, grouped_lora, stack_adapters
from .base import LoraLayer, TransposedWeight

#: inference folds the adapters into a temporary weight once the activations hold this many times as many values
#: as the weight (`LoraLinear._folded_weight`)
FOLD_RATIO = 1
#: a mixed batch folds each adapter's run of rows (`LoraLinear._folded_runs`) only when every run has this many tokens
#: (and folding pays as above): the base product split into one matmul per run runs slower on short runs. In-process
#: A/B against the same runs unfolded, all linear layers: SmolLM2 2 runs x 2,048 tokens 3.5% faster, 4 runs x 1,024
#: with the attention layers folded 1.5-3% slower, MiniLM 4 runs x 1,024 4% faster; one 384 x 384 layer, 4 runs x 512
#: tokens 2% slower, x 2,048 4% faster (docs/performance.md)
RUN_FOLD_TOKENS = 2048

_WEIGHT, _BIAS, _VERSION = (operator.itemgetter("weight"), operator.methodcaller("get", "bias"),
                              operator.attrgetter("_version"))


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` (weight ``(out, in)``): A is ``Linear(in, r)``, B is ``Linear(r, out)``."""

    linear_like = True
    supports_dora = True
    supports_pissa = True
    supports_lora_bias = True

    @classmethod
    def max_rank(cls, base_layer: nn.Module) -> int:
        return min(cls.matrix_shape(base_layer))

    @classmethod
    def added_params(cls, base_layer: nn.Module, r: int, use_dora: bool) -> int:
        out_f, in_f = cls.matrix_shape(base_layer)
        return r * (in_f + out_f) + (out_f if use_dora else 0)

    @classmethod
    def matrix_shape(cls, base_layer: nn.Module) -> tuple[int, int]:
        out_f, in_f = base_layer.weight.shape
        return out_f, in_f

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not torch.is_grad_enabled() and not self.disabled and not args and not kwargs:
            routing = self.routing
            # a routed batch whose rows all use one adapter is that adapter's single-adapter batch
            names = self.active_adapters if routing is None else routing.sole_adapter()
            if names is not None:
                weight = self._folded_weight(x, names) if self._foldable(x) else None
                if weight is not None:
                    return F.linear(x, weight, self.base_layer.bias)
            elif x.numel() // x.shape[-1] >= RUN_FOLD_TOKENS and self._foldable(x):  # (never on decoding steps)
                result = self._folded_runs(x, routing)
                if result is not None:
                    return result
        return super().forward(x, *args, **kwargs)

    def _foldable(self, x: Tensor) -> bool:
        """Whether this forward may read a folded weight (`_folded_weight`) instead of calling the base layer: a plain
        ``nn.Linear`` on a CPU (unmeasured on GPUs), evaluation mode, no DoRA, one dtype, and the base layer's own call
        doing nothing else (no hooks of its own or global ones, no forward replaced on the instance as accelerate's
        offloading hooks do)."""
        base = self.base_layer
        weight = base.weight
        return not (type(base) is not nn.Linear or self.training or weight.device.type != "cpu"
                    or base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__
                    or _global_hooks() or self.lora_magnitude_vector or x.dtype != weight.dtype)

    def _folded_weight(self, x: Tensor, active: Sequence[str]) -> Tensor | None:
        """For inference on many tokens (`_foldable` layers): ``W + Σ s · B A`` over the ``active`` adapters, a
        temporary the base product then reads instead of ``W`` — or None where the usual ``W x + s · B (A x)`` is
        cheaper or an adapter cannot fold (lora_bias, another dtype).

        The two rank-r products run as skinny matmuls at a fraction of the rate of the base one (MKL, 2 cores:
        ``(1024 x 384) @ (384 x 8)`` at ~90 GFLOP/s against ~200), so once the activations hold as many values as
        the weight (``tokens · (in + out) ≥ in · out``, `FOLD_RATIO`), writing the folded weight costs less; the
        temporary is then no larger than the activations already held. Unmerged all-linear inference over base,
        in-process A/B of 16-40 alternated forwards: MiniLM (8 x 128 tokens) 1.084 -> 1.035-1.046, SmolLM2 (4 x 128)
        1.039 -> 1.015; a threshold of 3 left SmolLM2's 576 x 576 and 576 -> 1,536 layers unfolded (1.037).
        Results equal the unfolded path up to float rounding, as a merge does.
        """
        if not self._folding_pays(x.numel() // x.shape[-1]):
            return None
        parts = self._fold_parts(active)
        return None if parts is None else _fold(self.base_layer.weight, parts)

    def _folding_pays(self, tokens: int) -> bool:
        out_f, in_f = self.base_layer.weight.shape
        return tokens * (in_f + out_f) >= FOLD_RATIO * in_f * out_f

    def _fold_parts(self, active: Sequence[str]) -> list[tuple[Tensor, Tensor, float]] | None:
        """``(A, B, s)`` of the ``active`` adapters not merged yet, or None when there are none or one cannot fold."""
        names = [n for n in active if n in self.r and n not in self.merged_adapters]
        parts = [(self.lora_A[n].weight, self.lora_B[n], self.scaling[n]) for n in names]
        weight = self.base_layer.weight
        if not parts or any(B.bias is not None or A.dtype != weight.dtype for A, B, _ in parts):
            return None
        return [(A, B.weight, s) for A, B, s in parts]

    def _folded_runs(self, x: Tensor, routing: Routing) -> Tensor | None:
        """A mixed batch whose adapters' rows form one run each (`Routing.runs`: rows grouped by adapter, as the
        server lays out prefills), every run long enough to fold: each run's rows read their own adapter folded into
        the weight (`_folded_weight`), one base product per run written into its rows of the result — or None (the
        grouped products then serve the whole batch).

        Long prompts of different adapters in one prefill then cost what single-adapter batches cost; the folded
        weights are built one run at a time, so one is held at once, as in a single-adapter batch."""
        runs = routing.runs()
        if runs is None or routing.shared or routing.index.shape[0] != x.shape[0]:
            return None
        row_tokens = x.numel() // (x.shape[0] * x.shape[-1])
        plan: list[tuple[int, int, list[tuple[Tensor, Tensor, float]] | None]] = []
        for j, start, stop in runs:
            name = routing.names[j] if j >= 0 else None
            if name is None or name not in self.r:  # base rows, or an adapter this layer lacks: W alone
                plan.append((start, stop, None))
                continue
            tokens = (stop - start) * row_tokens
            parts = tokens >= RUN_FOLD_TOKENS and self._folding_pays(tokens) and self._fold_parts([name])
            if not parts:
                return None
            plan.append((start, stop, parts))
        weight, bias = self.base_layer.weight, self.base_layer.bias
        result = x.new_empty((*x.shape[:-1], weight.shape[0]))
        for start, stop, parts in plan:
            run_weight = weight if parts is None else _fold(weight, parts)
            rows, into = x[start:stop].reshape(-1, x.shape[-1]), result[start:stop].view(-1, weight.shape[0])
            if bias is None:
                torch.mm(rows, run_weight.t(), out=into)
            else:
                torch.addmm(bias, rows, run_weight.t(), out=into)
        return result

    def _create(self, name: str, r: int, dtype: torch.dtype, device: torch.device, bias: bool = False) -> None:
        out_f, in_f = self.matrix_shape(self.base_layer)
        self.lora_A[name] = nn.Linear(in_f, r, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(r, out_f, bias=bias, dtype=dtype, device=device)

    def lora_path(self, x: Tensor, name: str) -> Tensor:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if x.dtype in (torch.bfloat16, torch.float16) and A.dtype == torch.float32:
            # a bf16/fp16-stored base (train.dtype) with fp32 adapters: compute in the activations' dtype from
            # the fp32 weights (gradients reach them in fp32); an fp32 copy of x per adapted layer, kept for
            # backward, would cost as much memory as the whole bf16 block (SmolLM2: 1,167 vs 919 MiB)
            A, B = A.to(x.dtype), B.to(x.dtype)
        elif x.dtype != A.dtype:
            x = x.to(A.dtype)
        # scaling on the rank-r intermediate: r multiplies per token instead of out
        h = F.linear(x, A) * self.scaling[name]
        out = h @ _row_major_t(B)  # = F.linear(h, B), see _row_major_t
        bias = self.lora_B[name].bias
        return out if bias is None else out + bias * self.scaling[name]

    def add_lora_output(self, result: Tensor, x: Tensor, name: str, inplace: bool = False) -> Tensor:
        """``result + s · B (A dropout(x))`` as one ``addmm`` over ``(tokens, out)``: no separate tensor for the
        adapter's output, its scaling or the sum (PEFT allocates all three)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if x.dtype in (torch.bfloat16, torch.float16) and A.dtype == torch.float32:
            A, B = A.to(x.dtype), B.to(x.dtype)  # a bf16-stored base: as in `lora_path`, and dropout's mask path
        if (result.dtype != B.dtype or not result.is_contiguous() or result.shape[-1] != B.shape[0]
                or self.lora_B[name].bias is not None):
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
        self.write_base_weight(self.from_matrix(residual).to(weight.dtype))

    def routed_output(self, x: Tensor, routing: Routing, base_result: Tensor, out: Tensor | None = None) -> Tensor:
        """Each row gets its own adapter's ``s · B A x``: two batched matmuls over groups of rows that share an
        adapter (`grouped_lora`; ranks zero-padded to the largest). With ``out`` (no autograd) the update is added
        into it.

        Without autograd (serving) the stacks of all adapters are built once and reused until one of them changes
        (`_RoutedStacks`), instead of being rebuilt every forward.
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
            if any(self.lora_B[n].bias is not None for n in present):
                return super().routed_output(x, routing, base_result, out)
            names, (A_stack, B_stack) = present, self._stacks(present)
        else:
            stacks = self.__dict__.get("_routing_cache")
            if stacks is None or not stacks.holds(self, present, routing):
                stacks = self.__dict__["_routing_cache"] = _RoutedStacks(self)
            if stacks.biased and not stacks.biased.isdisjoint(present):
                return super().routed_output(x, routing, base_result, out)
            names, A_stack, B_stack = stacks.names, stacks.A_stack, stacks.B_stack
        return grouped_lora(x, routing, names, A_stack, B_stack, base_result, out)

    def train(self, mode: bool = True) -> LoraLinear:
        """Also forgets the stacks of mixed batches (`_RoutedStacks`): weights written where autograd's version
        counter does not see it (through ``.data``, or raw pointers as in bitsandbytes' 8-bit optimizers) are read
        again after the ``model.eval()`` that follows training."""
        self.__dict__.pop("_routing_cache", None)
        return super().train(mode)

    def _stacks(self, names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """`stack_adapters` over ``names``: A ``(n, r_max, in)`` and ``s · B`` ``(n, out, r_max)``."""
        return stack_adapters([(self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n]) for n in names])


class _RoutedStacks:
    """A layer's stacked A and ``s · B`` of every unmerged adapter, for mixed batches without autograd, and what
    they were built from, to tell when they no longer hold.

    Checked in every adapted layer of every mixed forward, so the check runs its loops in C (``map`` over lists
    of objects) and reads only the adapters in the batch: an adapter outside the batch may change unseen, since its
    rows of the stacks are not read, and is checked when a batch uses it. Per adapter in the batch it reads its A
    and B modules (replaced ones), their weights' identity (a replaced Parameter, also one written straight into
    ``_parameters``), version counter (bumped by in-place updates: optimizer steps, ``copy_``) and storage
    (``.data =`` swaps it without a version bump), B's bias (lora_bias adapters take the generic path) and the
    scaling. Reading all of that for every loaded adapter in every layer cost 3% of a MiniLM forward with 64
    adapters (the objects are cold after the big matmuls: ~0.5 µs each).

    A write that bypasses the version counter (``param.data.copy_(...)``, raw pointers) is not seen here; the stacks
    are dropped on every ``train()``/``eval()`` call (`LoraLinear.train`) so the usual train-then-eval order reads
    such writes. Reading the weights' contents instead would cost a copy of every adapter each forward (35 ms of a
    290 ms forward with 64 adapters), and aliasing the stacks with the parameters would hand every adapter weight
    a shared storage, which safetensors refuses to save.
    """

    def __init__(self, layer: LoraLinear) -> None:
        self.names = [n for n in layer.r if n not in layer.merged_adapters]
        # lists over every adapter's A then every adapter's B: adapter i at positions i and n + i
        self.modules = [layer.lora_A[n] for n in self.names] + [layer.lora_B[n] for n in self.names]
        self.dicts = [module._parameters for module in self.modules]
        self.weights = list(map(_WEIGHT, self.dicts))
        self.versions, self.storages = tuple(map(_VERSION, self.weights)), tuple(map(Tensor.data_ptr, self.weights))
        self.B_dicts = self.dicts[len(self.names):]
        self.biases = list(map(_BIAS, self.B_dicts))
        self.biased = frozenset(n for n, bias in zip(self.names, self.biases) if bias is not None)
        self.scalings = tuple(layer.scaling[n] for n in self.names)
        self.A_stack, self.B_stack = layer._stacks(self.names)

    def holds(self, layer: LoraLinear, present: Sequence[str], routing: Routing) -> bool:
        """Whether the stacks hold the layer's current weights of every adapter in ``present`` (the batch's
        adapters that the layer has, unmerged)."""
        used, pick_ab, pick = routing.pickers(self.names)
        if used != present:  # an adapter of the batch that the stacks lack, or one merged since
            return False
        modules = [*map(layer.lora_A._modules.get, used), *map(layer.lora_B._modules.get, used)]
        if not all(map(operator.is_, modules, pick_ab(self.modules))):
            return False
        weights = list(map(_WEIGHT, pick_ab(self.dicts)))
        return (all(map(operator.is_, weights, pick_ab(self.weights)))
                and tuple(map(_VERSION, weights)) == pick_ab(self.versions)
                and tuple(map(Tensor.data_ptr, weights)) == pick_ab(self.storages)
                and all(map(operator.is_, map(_BIAS, pick(self.B_dicts)), pick(self.biases)))
                and tuple(map(layer.scaling.get, used)) == pick(self.scalings))


def _fold(weight: Tensor, parts: Sequence[tuple[Tensor, Tensor, float]]) -> Tensor:
    """``W + Σ s · B A`` over ``(A, B, s)`` parts, built with ``addmm`` into one new weight-sized tensor (not ``B A``,
    its scaled copy and the sum apart, as `delta_weight` and a merge do: three temporaries per layer and forward)."""
    folded = torch.addmm(weight, parts[0][1], parts[0][0], alpha=parts[0][2])
    for A, B, scaling in parts[1:]:
        folded.addmm_(B, A, alpha=scaling)
    return folded


def _global_hooks() -> bool:
    """Whether forward hooks registered for every module (``torch.nn.modules.module.register_module_forward_hook``
    and its pre-hook twin) exist; torch keeps them in module-level registries without a public reader."""
    return bool(getattr(torch_module, "_global_forward_hooks", None)
                or getattr(torch_module, "_global_forward_pre_hooks", None))


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



class LoraConv1D(TransposedWeight, LoraLinear):
    """LoRA on transformers' GPT-2 ``Conv1D``, whose weight is stored transposed: ``(in, out)``."""

    @classmethod
    def matrix_shape(cls, base_layer: nn.Module) -> tuple[int, int]:
        in_f, out_f = base_layer.weight.shape
        return out_f, in_f

    def delta_weight(self, name: str) -> Tensor:
        return super().delta_weight(name).T
