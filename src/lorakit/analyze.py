"""What a trained adapter changed: size, spectrum and direction of every update ``ΔW = s·B·A``.

Per adapted layer (weights seen as ``(out, in)`` matrices; conv kernels flattened to ``(out, in·kh·kw)``):

- ``‖ΔW‖_F / ‖W‖_F``: how large the update is next to the pretrained weight;
- the singular values of ``ΔW``, its *energy rank* (fewest singular values holding 90% of ``Σσ²``) and its
  *effective rank* ``exp(H(σ/Σσ))`` (Roy & Vetterli 2007), which is ``r`` for ``r`` equal singular values;
- the amplification factor ``‖ΔW‖_F / ‖Uᵀ W V‖_F`` with ``U``, ``V`` the top-r left/right singular vectors of
  ``ΔW`` (Hu et al. 2021, "LoRA", §7.3): how strongly ΔW amplifies directions W already has but does not
  emphasise, beside the same projection onto W's own top-r directions and onto random ones;
- against a second adapter, the subspace similarity of §7.2 (eq. 4) between the top-i singular directions of
  one and the top-j of the other: ``φ(i, j) = ‖U_aᵢᵀ U_bⱼ‖_F² / min(i, j)``, 1 when one subspace contains the
  other and about ``max(i, j) / d`` for random subspaces of a d-dimensional space.

`lorakit inspect ADAPTER [--against OTHER]` writes the table, heatmaps and ``inspect.json``. The math works on
plain tensors (`layer_stats`, `similarity_grid`), so it is tested on hand-built matrices.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .files import write_json

#: share of ``Σσ²`` the energy rank must hold
ENERGY = 0.9


# -- matrix math ------------------------------------------------------------------------------------------------
def as_matrix(tensor: Tensor) -> Tensor:
    """A weight or update as a float64 ``(out, rest)`` matrix (conv kernels ``(out, in, kh, kw)`` flattened)."""
    return tensor.detach().to("cpu", torch.float64).reshape(tensor.shape[0], -1)


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values, largest first, shape ``(min(out, in),)``."""
    return torch.linalg.svdvals(as_matrix(matrix))


def energy_rank(sigma: Tensor, energy: float = ENERGY) -> int:
    """Fewest leading singular values whose squares hold ``energy`` of ``Σσ²`` (0 for a zero matrix)."""
    power = sigma.double().pow(2)
    total = float(power.sum())
    if total == 0.0:
        return 0
    cumulative = power.cumsum(0) / total
    return int((cumulative < energy - 1e-12).sum()) + 1


def effective_rank(sigma: Tensor) -> float:
    """``exp`` of the entropy of ``σ / Σσ`` (Roy & Vetterli 2007): r for r equal values, 1 for one (0 if all 0)."""
    sigma = sigma.double()
    total = float(sigma.sum())
    if total == 0.0:
        return 0.0
    p = sigma[sigma > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def numerical_rank(sigma: Tensor, rtol: float = 1e-6) -> int:
    """Singular values above ``rtol·σ₁``: the rank of ΔW, at most the adapter's r."""
    if sigma.numel() == 0 or float(sigma[0]) == 0.0:
        return 0
    return int((sigma > rtol * sigma[0]).sum())


def relative_norm(delta: Tensor, weight: Tensor) -> float:
    """``‖ΔW‖_F / ‖W‖_F``."""
    return float(as_matrix(delta).norm() / as_matrix(weight).norm())


def top_directions(matrix: Tensor, k: int, side: str = "right") -> Tensor:
    """Orthonormal top-k singular directions as columns: ``(in, k)`` for ``side="right"`` (the row space, the
    input side, as §7.2 uses for A), ``(out, k)`` for ``"left"``."""
    U, _, Vh = torch.linalg.svd(as_matrix(matrix), full_matrices=False)
    if side == "right":
        return Vh[:k].T
    if side == "left":
        return U[:, :k]
    raise ValueError(f"side must be 'right' or 'left', got {side!r}")


def subspace_similarity(basis_a: Tensor, basis_b: Tensor, i: int | None = None, j: int | None = None) -> float:
    """LoRA §7.2, eq. 4: ``‖A[:, :i]ᵀ B[:, :j]‖_F² / min(i, j)`` for orthonormal columns; in [0, 1]."""
    i = basis_a.shape[1] if i is None else i
    j = basis_b.shape[1] if j is None else j
    overlap = basis_a[:, :i].T.double() @ basis_b[:, :j].double()
    return float(overlap.pow(2).sum() / min(i, j))


def similarity_grid(delta_a: Tensor, delta_b: Tensor, max_i: int, max_j: int, side: str = "right") -> Tensor:
    """``φ(i, j)`` for ``i = 1..max_i``, ``j = 1..max_j`` between the updates' top singular directions:
    shape ``(max_i, max_j)``, as Figure 3 of the LoRA paper."""
    a = top_directions(delta_a, max_i, side)
    b = top_directions(delta_b, max_j, side)
    overlap = (a.T @ b).pow(2)  # (max_i, max_j): squared cosines of every pair of directions
    prefix = overlap.cumsum(0).cumsum(1)  # prefix[i-1, j-1] = ‖a_iᵀ b_j‖_F²
    i = torch.arange(1, max_i + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, max_j + 1, dtype=torch.float64)[None, :]
    return prefix / torch.minimum(i, j)


def _random_orthonormal(rows: int, k: int, generator: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))
    return q


@dataclass
class Amplification:
    """LoRA §7.3 / Table 7 for one layer, with ``r`` directions."""

    r: int
    delta_norm: float  # ‖ΔW‖_F
    projected_norm: float  # ‖Uᵀ W V‖_F, U/V: top-r singular vectors of ΔW
    top_w_norm: float  # the same with W's own top-r singular vectors (= sqrt(Σ top-r σ_W²))
    random_norm: float  # the same with random orthonormal U/V
    factor: float  # delta_norm / projected_norm


def amplification(delta: Tensor, weight: Tensor, r: int | None = None, seed: int = 0) -> Amplification:
    """How strongly ΔW amplifies directions of W (LoRA §7.3): ``‖ΔW‖_F / ‖Uᵀ W V‖_F``. A large factor means ΔW
    boosts directions that W holds only weakly (task-specific features), not W's dominant ones."""
    D, W = as_matrix(delta), as_matrix(weight)
    if r is None:
        r = max(1, numerical_rank(torch.linalg.svdvals(D)))
    U, _, Vh = torch.linalg.svd(D, full_matrices=False)
    projected = float((U[:, :r].T @ W @ Vh[:r].T).norm())
    sigma_w = torch.linalg.svdvals(W)
    gen = torch.Generator().manual_seed(seed)
    rand_u, rand_v = _random_orthonormal(W.shape[0], r, gen), _random_orthonormal(W.shape[1], r, gen)
    random_norm = float((rand_u.T @ W @ rand_v).norm())
    delta_norm = float(D.norm())
    return Amplification(r=r, delta_norm=delta_norm, projected_norm=projected,
                         top_w_norm=float(sigma_w[:r].pow(2).sum().sqrt()), random_norm=random_norm,
                         factor=delta_norm / projected if projected > 0 else math.inf)


# -- per layer --------------------------------------------------------------------------------------------------
@dataclass
class LayerStats:
    name: str
    kind: str  # module name after the block index ("attention.self.query"), or the whole name
    block: int | None  # transformer block / stage index, when the name has one
    shape: tuple[int, int]  # (out, in) of the matrix form
    r: int  # the adapter's rank here
    weight_norm: float
    delta_norm: float
    relative_norm: float  # ‖ΔW‖_F / ‖W‖_F
    energy_rank: int  # singular values holding ENERGY of ‖ΔW‖_F²
    effective_rank: float
    singular_values: list[float]  # the first r (the rest are 0 for s·B·A)
    amplification: Amplification

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_BLOCK = re.compile(r"\.(\d+)\.")


def split_name(name: str) -> tuple[int | None, str]:
    """``"bert.encoder.layer.3.attention.self.query"`` -> ``(3, "attention.self.query")``."""
    match = _BLOCK.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), name[match.end():]


def layer_stats(name: str, weight: Tensor, delta: Tensor, r: int | None = None) -> LayerStats:
    """Every per-layer number of the module docstring for one ``(W, ΔW)`` pair."""
    sigma = singular_values(delta)
    rank = r if r is not None else max(1, numerical_rank(sigma))
    block, kind = split_name(name)
    W = as_matrix(weight)
    return LayerStats(name=name, kind=kind, block=block, shape=(W.shape[0], W.shape[1]), r=rank,
                      weight_norm=float(W.norm()), delta_norm=float(as_matrix(delta).norm()),
                      relative_norm=relative_norm(delta, weight), energy_rank=energy_rank(sigma),
                      effective_rank=effective_rank(sigma), singular_values=sigma[:rank].tolist(),
                      amplification=amplification(delta, weight, r=min(rank, sigma.numel())))


def adapter_matrices(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, Tensor, Tensor, int]]:
    """``(layer name, W, ΔW, r)`` for every LoRA layer holding ``adapter_name``, both ``(out, in)``."""
    from .adapters import lora_layers

    with torch.no_grad():
        for name, layer in lora_layers(model):
            if adapter_name not in layer.r:
                continue
            yield name, layer.weight_matrix(), layer.delta_matrix(adapter_name), layer.r[adapter_name]


@dataclass
class Similarity:
    """Subspace similarity of adapter a's and b's updates on one layer."""

    name: str
    kind: str
    block: int | None
    r_a: int
    r_b: int
    top1: float  # φ(1, 1): do the two strongest directions agree?
    full: float  # φ(r_a, r_b): share of the smaller subspace inside the larger one
    random: float  # expected φ(r_a, r_b) for random subspaces: max(r_a, r_b) / d
    grid: list[list[float]] = field(repr=False)


@dataclass
class Inspection:
    adapter: str
    against: str | None
    side: str
    layers: list[LayerStats]
    similarity: list[Similarity]

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "against": self.against, "side": self.side, "energy": ENERGY,
                "layers": [layer.to_dict() for layer in self.layers],
                "similarity": [asdict(s) for s in self.similarity]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Inspection":
        """The inverse of `to_dict` (an ``inspect.json`` read back, e.g. to render its report again)."""
        layers = [LayerStats(**{**x, "shape": tuple(x["shape"]), "amplification": Amplification(**x["amplification"])})
                  for x in data["layers"]]
        return cls(data["adapter"], data["against"], data["side"], layers,
                   [Similarity(**s) for s in data["similarity"]])

    def summary(self) -> dict[str, float]:
        """Means over layers (what `lorakit compare`/`sweep` reports quote)."""
        n = max(1, len(self.layers))
        out = {"layers": len(self.layers),
               "mean_relative_norm": sum(x.relative_norm for x in self.layers) / n,
               "mean_effective_rank": sum(x.effective_rank for x in self.layers) / n,
               "mean_energy_rank": sum(x.energy_rank for x in self.layers) / n,
               "median_amplification": _median([x.amplification.factor for x in self.layers])}
        if self.similarity:
            m = len(self.similarity)
            out["mean_similarity_top1"] = sum(s.top1 for s in self.similarity) / m
            out["mean_similarity_full"] = sum(s.full for s in self.similarity) / m
            out["mean_similarity_random"] = sum(s.random for s in self.similarity) / m
        return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def inspect_model(model: nn.Module, adapter_name: str = "default", against: str | None = None,
                  side: str = "right") -> Inspection:
    """Per-layer statistics of one adapter on ``model`` and, with ``against``, its subspace similarity to
    another adapter loaded on the same model."""
    layers = [layer_stats(name, W, D, r) for name, W, D, r in adapter_matrices(model, adapter_name)]
    similarity: list[Similarity] = []
    if against is not None:
        others = {name: (D, r) for name, _, D, r in adapter_matrices(model, against)}
        for name, W, D, r in adapter_matrices(model, adapter_name):
            if name not in others:
                continue
            D_b, r_b = others[name]
            grid = similarity_grid(D, D_b, r, r_b, side)
            d = as_matrix(W).shape[1 if side == "right" else 0]
            block, kind = split_name(name)
            similarity.append(Similarity(name=name, kind=kind, block=block, r_a=r, r_b=r_b,
                                         top1=float(grid[0, 0]), full=float(grid[-1, -1]),
                                         random=max(r, r_b) / d, grid=grid.tolist()))
    return Inspection(adapter=adapter_name, against=against, side=side, layers=layers, similarity=similarity)


# -- adapter folders --------------------------------------------------------------------------------------------
def _num_labels(tensors: dict[str, Tensor]) -> int | None:
    """Classes of a saved classification head: the smallest first dimension of a non-LoRA 2-D weight."""
    rows = [t.shape[0] for k, t in tensors.items() if ".lora_" not in k and k.endswith(".weight") and t.dim() == 2]
    return min(rows) if rows else None


def load_for_inspection(adapter: str | Path, base: str | None = None, task: str | None = None,
                        against: str | Path | None = None) -> tuple[nn.Module, str, str | None]:
    """The base model with ``adapter`` (and ``against``) loaded; returns ``(model, name_a, name_b)``.

    The base and task come from the adapter's provenance (lorakit runs) or its ``adapter_config.json``.
    """
    from .errors import ConfigError
    from .io import load_adapter, read_adapter
    from .models import load_model
    from .tasks import TASKS, task_from_peft

    files = read_adapter(adapter)
    recipe = files.provenance.get("recipe") if isinstance(files.provenance.get("recipe"), dict) else {}
    model_name = base or recipe.get("model") or files.config.base_model_name_or_path
    if not model_name:
        raise ConfigError(f"{adapter}: the base model is not recorded; pass --base")
    task = task or recipe.get("task") or task_from_peft(files.config.task_type)
    num_labels = _num_labels(files.tensors) if task in TASKS and TASKS[task].classification else None
    model = load_model(model_name, task=task, num_labels=num_labels).model
    name_a = load_adapter(model, adapter, adapter_name="a")
    name_b = load_adapter(model, against, adapter_name="b") if against is not None else None
    return model, name_a, name_b


def inspect_adapter(adapter: str | Path, against: str | Path | None = None, base: str | None = None,
                    task: str | None = None, side: str = "right") -> Inspection:
    """`inspect_model` on adapter folders (see `load_for_inspection`)."""
    model, name_a, name_b = load_for_inspection(adapter, base, task, against)
    result = inspect_model(model, name_a, name_b, side)
    result.adapter, result.against = str(adapter), (str(against) if against is not None else None)
    return result


# -- report -----------------------------------------------------------------------------------------------------
def write_inspection_report(result: Inspection, output: str | Path) -> Path:
    """``report.md``, ``report.html`` (images inlined), PNG heatmaps and ``inspect.json`` in ``output``."""
    from . import report as rp

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "inspect.json", result.to_dict())
    doc = rp.Report(f"Adapter inspection: {result.adapter}")
    summary = result.summary()
    doc.text(f"{summary['layers']} adapted layers. Mean ‖ΔW‖/‖W‖ {summary['mean_relative_norm']:.4f}; "
             f"mean effective rank {summary['mean_effective_rank']:.2f}; mean energy rank "
             f"({int(ENERGY * 100)}% of ‖ΔW‖²) {summary['mean_energy_rank']:.2f}; median amplification factor "
             f"{summary['median_amplification']:.2f}.")
    doc.heading("Per layer")
    doc.text("ΔW = s·B·A as an (out, in) matrix. Effective rank: exp of the entropy of the normalized singular "
             f"values. Energy rank: fewest singular values holding {int(ENERGY * 100)}% of ‖ΔW‖_F². Amplification "
             "(LoRA §7.3): ‖ΔW‖_F / ‖UᵀWV‖_F with U, V the top-r singular vectors of ΔW; the next three columns "
             "are ‖UᵀWV‖_F for ΔW's directions, W's own top-r directions and random ones.")
    doc.table(["layer", "r", "‖W‖", "‖ΔW‖", "‖ΔW‖/‖W‖", "eff. rank", "energy rank", "amplification",
               "‖UᵀWV‖ (ΔW)", "(W top-r)", "(random)"],
              [[x.name, x.r, f"{x.weight_norm:.2f}", f"{x.delta_norm:.4f}", f"{x.relative_norm:.4f}",
                f"{x.effective_rank:.2f}", x.energy_rank, f"{x.amplification.factor:.2f}",
                f"{x.amplification.projected_norm:.3f}", f"{x.amplification.top_w_norm:.3f}",
                f"{x.amplification.random_norm:.3f}"] for x in result.layers])
    kinds, blocks = _grid_axes(result.layers)
    if blocks:
        doc.figure(rp.heatmap([[_cell(result.layers, k, b, "relative_norm") for b in blocks] for k in kinds],
                              kinds, [str(b) for b in blocks], "‖ΔW‖_F / ‖W‖_F per layer", "block", "module",
                              "relative norm"), "relative_norm.png", "Size of the update next to the weight.")
        doc.figure(rp.heatmap([[_cell(result.layers, k, b, "effective_rank") for b in blocks] for k in kinds],
                              kinds, [str(b) for b in blocks], "Effective rank of ΔW per layer", "block", "module",
                              "effective rank"), "effective_rank.png", "How many directions each update uses.")
    doc.figure(rp.spectra({x.name: x.singular_values for x in result.layers}, [x.kind for x in result.layers]),
               "spectra.png", "Singular values of each ΔW, normalized by the largest.")
    if result.similarity:
        doc.heading(f"Subspace similarity against {result.against}")
        doc.text(f"φ(i, j) = ‖U_aᵢᵀ U_bⱼ‖_F² / min(i, j) over the {result.side} singular vectors of the two "
                 "updates (LoRA §7.2): 1 when the top-i directions of one lie inside the top-j of the other; "
                 "'random' is the expectation for random subspaces, max(i, j)/d.")
        doc.table(["layer", "r_a", "r_b", "φ(1,1)", "φ(r_a,r_b)", "random"],
                  [[s.name, s.r_a, s.r_b, f"{s.top1:.3f}", f"{s.full:.3f}", f"{s.random:.3f}"]
                   for s in result.similarity])
        doc.figure(rp.similarity_grids(_mean_grids(result.similarity)), "subspace_similarity.png",
                   "φ(i, j) between the adapters' top directions, mean over blocks per module kind.")
    doc.write(out)
    return out


def _grid_axes(layers: list[LayerStats]) -> tuple[list[str], list[int]]:
    kinds = list(dict.fromkeys(x.kind for x in layers if x.block is not None))
    blocks = sorted({x.block for x in layers if x.block is not None})
    return kinds, blocks


def _cell(layers: list[LayerStats], kind: str, block: int, attr: str) -> float:
    for x in layers:
        if x.kind == kind and x.block == block:
            return float(getattr(x, attr))
    return math.nan


def _mean_grids(similarity: list[Similarity]) -> dict[str, list[list[float]]]:
    """Mean φ grid per module kind (over blocks with equal ranks)."""
    groups: dict[str, list[Tensor]] = {}
    for s in similarity:
        groups.setdefault(s.kind, []).append(torch.tensor(s.grid))
    out = {}
    for kind, grids in groups.items():
        shape = grids[0].shape
        same = [g for g in grids if g.shape == shape]
        out[kind] = torch.stack(same).mean(0).tolist()
    return out


def format_table(result: Inspection) -> str:
    lines = [f"{'layer':<48} {'r':>3} {'|dW|/|W|':>9} {'eff.rank':>8} {'E90':>4} {'amplif.':>8}"]
    for x in result.layers:
        lines.append(f"{x.name[-48:]:<48} {x.r:>3} {x.relative_norm:>9.4f} {x.effective_rank:>8.2f} "
                     f"{x.energy_rank:>4} {x.amplification.factor:>8.2f}")
    if result.similarity:
        lines.append(f"\nsubspace similarity vs {result.against} ({result.side} singular vectors)")
        lines.append(f"{'layer':<48} {'phi(1,1)':>8} {'phi(ra,rb)':>10} {'random':>7}")
        for s in result.similarity:
            lines.append(f"{s.name[-48:]:<48} {s.top1:>8.3f} {s.full:>10.3f} {s.random:>7.3f}")
    summary = result.summary()
    lines.append("\n" + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return "\n".join(lines)
