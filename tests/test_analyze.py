"""Adapter analysis: spectra, effective rank, relative norm, subspace similarity and amplification on hand-built
matrices with known answers, then on real adapters of a tiny model, and the report files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit import LoraConfig, inject
from lorakit.analyze import (Inspection, amplification, effective_rank, energy_rank, inspect_model, layer_stats,
                             numerical_rank, relative_norm, similarity_grid, singular_values, split_name,
                             subspace_similarity, top_directions, write_inspection_report)

from conftest import randomize_lora


def _orthonormal(d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _matrix(sigma: list[float], d: int = 12, seed: int = 0, v_seed: int = 1) -> torch.Tensor:
    """U diag(sigma) Vᵀ with random orthonormal U, V: singular values known exactly."""
    U, V = _orthonormal(d, seed), _orthonormal(d, v_seed)
    s = torch.zeros(d, dtype=torch.float64)
    s[:len(sigma)] = torch.tensor(sigma, dtype=torch.float64)
    return U @ torch.diag(s) @ V.T


def test_spectrum_effective_and_energy_rank_of_known_matrices() -> None:
    delta = _matrix([4.0, 2.0, 1.0])
    sigma = singular_values(delta)
    assert sigma[:3].tolist() == pytest.approx([4.0, 2.0, 1.0])
    assert numerical_rank(sigma) == 3
    # four equal singular values: effective rank exactly 4, 90% of the energy needs all 4
    flat = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    assert effective_rank(flat) == pytest.approx(4.0)
    assert energy_rank(flat) == 4
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    # 3² / (3² + 1²) = 0.9 exactly: one direction holds 90%
    assert energy_rank(torch.tensor([3.0, 1.0])) == 1
    assert energy_rank(torch.tensor([3.0, 1.0]), energy=0.95) == 2
    assert energy_rank(torch.zeros(3)) == 0 and effective_rank(torch.zeros(3)) == 0.0


def test_relative_norm_exact_on_a_hand_built_case() -> None:
    W = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # ‖W‖_F = 5
    delta = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # ‖ΔW‖_F = 1
    assert relative_norm(delta, W) == 0.2
    conv = torch.ones(2, 3, 2, 2)  # conv kernels are flattened to (out, in·kh·kw)
    assert relative_norm(0.5 * conv, conv) == pytest.approx(0.5)


def test_subspace_similarity_identical_nested_and_orthogonal() -> None:
    basis = _orthonormal(16, 3)
    a, b = basis[:, :4], basis[:, 4:8]
    assert subspace_similarity(a, a) == pytest.approx(1.0)
    assert subspace_similarity(a, b) == pytest.approx(0.0, abs=1e-12)
    assert subspace_similarity(a, basis[:, :8]) == pytest.approx(1.0)  # a lies inside the larger one
    assert subspace_similarity(basis[:, :2], basis[:, 1:3]) == pytest.approx(0.5)  # one shared direction of two
    # updates built from the same right singular vectors (different left ones, different scales): φ = 1 everywhere
    d_a = _matrix([8.0, 4.0, 2.0, 1.0], d=16, seed=5, v_seed=9)
    d_b = _matrix([9.0, 7.0, 5.0, 3.0, 2.0, 1.5, 1.2, 1.0], d=16, seed=6, v_seed=9)
    grid = similarity_grid(d_a, d_b, 4, 8)
    assert grid.shape == (4, 8)
    assert torch.allclose(grid, torch.ones(4, 8, dtype=grid.dtype), atol=1e-9)
    # an update living in the orthogonal complement: φ ≈ 0
    V = _orthonormal(16, 9)
    d_c = _orthonormal(16, 2)[:, :4] @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) \
        @ V[:, 8:12].T
    assert similarity_grid(d_a, d_c, 4, 4).abs().max() < 1e-9
    # random subspaces of a large space are nearly orthogonal: φ ≈ max(i, j) / d
    big_a, big_b = _orthonormal(256, 1)[:, :4], _orthonormal(256, 2)[:, :4]
    assert subspace_similarity(big_a, big_b) < 0.1
    assert top_directions(d_a, 3, side="left").shape == (16, 3)


def test_amplification_of_a_weak_direction() -> None:
    W = torch.diag(torch.tensor([10.0, 1.0, 0.1], dtype=torch.float64))
    delta = torch.zeros(3, 3, dtype=torch.float64)
    delta[1, 1] = 5.0  # ΔW boosts W's second direction, whose gain is 1
    amp = amplification(delta, W)
    assert amp.r == 1
    assert amp.projected_norm == pytest.approx(1.0)
    assert amp.factor == pytest.approx(5.0)
    assert amp.top_w_norm == pytest.approx(10.0)
    assert amp.delta_norm == pytest.approx(5.0)


def test_layer_stats_and_names() -> None:
    W = _matrix([5.0, 4.0, 3.0, 2.0, 1.0], seed=7, v_seed=8)
    delta = _matrix([2.0, 1.0], seed=7, v_seed=8)
    stats = layer_stats("bert.encoder.layer.3.attention.self.query", W, delta)
    assert (stats.block, stats.kind, stats.r) == (3, "attention.self.query", 2)
    assert stats.singular_values == pytest.approx([2.0, 1.0])
    assert stats.relative_norm == pytest.approx(math.sqrt(5) / math.sqrt(55))
    assert stats.energy_rank == 2 and 1 < stats.effective_rank < 2
    assert split_name("pooler.dense") == (None, "pooler.dense")


def test_inspect_real_adapters_on_a_tiny_model(tiny, tmp_path: Path) -> None:
    inject(tiny, LoraConfig(r=2, alpha=4, target_modules=["q", "v", "conv", "pointwise"]))
    lorakit.add_adapter(tiny, "same", LoraConfig(r=2, alpha=4, target_modules=["q", "v", "conv", "pointwise"]))
    randomize_lora(tiny, std=0.3)
    with torch.no_grad():  # "same" gets default's A (input directions) and a different B
        for _, layer in lorakit.adapters.lora_layers(tiny):
            layer.lora_A["same"].weight.copy_(layer.lora_A["default"].weight)
    result = inspect_model(tiny, "default", against="same")
    names = [x.name for x in result.layers]
    assert names == ["layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v", "conv", "pointwise"]
    q = tiny.layers[0]["q"]
    with torch.no_grad():
        expected = float(q.delta_weight("default").norm() / q.base_layer.weight.norm())
    assert result.layers[0].relative_norm == pytest.approx(expected, rel=1e-5)
    assert all(x.r == 2 and 0 < x.effective_rank <= 2 + 1e-9 for x in result.layers)
    assert result.layers[-2].shape == (4, 9)  # conv 1->4, 3x3 kernel flattened
    # same row space (A): right-side similarity is 1 on every layer
    assert all(s.full == pytest.approx(1.0, abs=1e-6) for s in result.similarity)
    summary = result.summary()
    assert summary["mean_similarity_full"] == pytest.approx(1.0, abs=1e-6)

    out = write_inspection_report(result, tmp_path / "inspect")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["effective_rank.png", "relative_norm.png", "spectra.png", "subspace_similarity.png"]
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs)
    assert "layers.0.q" in (out / "report.md").read_text()
    saved = json.loads((out / "inspect.json").read_text())
    assert json.loads(json.dumps(Inspection.from_dict(saved).to_dict())) == saved  # read back whole


def test_conv1d_update_is_read_as_out_by_in() -> None:
    """HF ``Conv1D`` stores its weight ``(in, out)``: the update analyze reads must be ``(out, in)`` like W, and be the
    map the layer really adds (x ↦ x ΔWᵀ)."""
    from transformers.pytorch_utils import Conv1D

    from lorakit.analyze import adapter_matrices

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("proj", Conv1D(6, 4))  # nf=6 outputs, nx=4 inputs: weight (4, 6)
    inject(model, LoraConfig(r=2, alpha=4, target_modules=["proj"]))
    randomize_lora(model, std=0.3)
    [(name, W, delta, r)] = list(adapter_matrices(model, "default"))
    assert (name, r) == ("proj", 2) and W.shape == delta.shape == (6, 4)
    x = torch.randn(3, 4)
    with torch.no_grad():
        added = model(x) - model.proj.base_layer(x)
    torch.testing.assert_close(added, x @ delta.T)
