"""`lorakit.report` figures readable at their default size: every label inside the figure, one unit per axis, many
layers summarised (lines and panels bounded), and the summaries equal to the numbers they summarise."""

from __future__ import annotations

from typing import Callable, Iterator

import matplotlib.pyplot as plt
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from evidence_helpers import texts_outside
from lorakit import report as rp
from lorakit.analyze import split_name

BERT = [f"bert.encoder.layer.{b}.{k}" for b in range(6)
        for k in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")]
BERT.append("bert.pooler.dense")
SMOLLM = [f"model.layers.{b}.{k}" for b in range(30)
          for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                    "mlp.up_proj", "mlp.down_proj")]


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    yield
    plt.close("all")


def test_rank_estimates_labels_every_layer_in_full_inside_the_figure() -> None:
    layers = [split_name(n) for n in BERT]
    fig = rp.rank_estimates(layers, [1 + i % 40 for i in range(len(layers))], 8, 0.9)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[0] == "0: attention.self.query" and labels[-1] == "bert.pooler.dense"
    assert len(set(labels)) == len(BERT)  # every layer named, none cut to a common tail
    assert texts_outside(fig) == []


def test_rank_estimates_of_210_layers_is_one_panel_per_kind() -> None:
    layers = [split_name(n) for n in SMOLLM]
    ranks = [2 ** (i % 6) for i in range(len(layers))]
    fig = rp.rank_estimates(layers, ranks, 16, 0.9)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown][:2] == ["self_attn.q_proj (30 layers)", "self_attn.k_proj (30 layers)"]
    assert len(shown) == 7
    for k, ax in enumerate(shown):
        assert [round(p.get_height()) for p in ax.patches] == [ranks[7 * b + k] for b in range(30)]
        assert [line.get_ydata()[0] for line in ax.get_lines()] == [16]  # the suggestion, nothing else
        assert len([t for t in ax.get_xticklabels() if t.get_text()]) <= 10
    assert texts_outside(fig) == []


def test_spectra_of_210_layers_summarised_per_kind() -> None:
    sigma = {}
    kinds = []
    for i, name in enumerate(SMOLLM):
        block, kind = split_name(name)
        tail = 0.1 * (1 + block % 4)  # σ_2/σ_1 over a kind's 30 layers: 0.1, 0.2, 0.3, 0.4 repeating (8, 8, 7, 7)
        sigma[name] = [2.0, 2.0 * tail]
        kinds.append(kind)
    fig = rp.spectra(sigma, kinds)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 7
    for ax in shown:
        [median] = ax.get_lines()
        assert list(median.get_ydata()) == pytest.approx([1.0, 0.2])  # 15th and 16th of 30 sorted: 0.2
        [band] = [c for c in ax.collections if isinstance(c, PolyCollection)]  # the quartile band
        at_two = [y for x, y in band.get_paths()[0].vertices if x == 2]
        assert (min(at_two), max(at_two)) == pytest.approx((0.125, 0.3))  # inclusive quartiles of the 30
    assert texts_outside(fig) == []


def test_spectra_of_one_layer_per_kind_draws_the_layer() -> None:
    fig = rp.spectra({"a.0.q": [4.0, 2.0, 1.0], "b": [3.0, 0.3]}, ["q", "b"])
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [list(ax.get_lines()[0].get_ydata()) for ax in shown] == [[1.0, 0.5, 0.25], pytest.approx([1.0, 0.1])]
    assert all(not ax.collections for ax in shown)


def test_similarity_grids_of_seven_kinds_wrap_into_rows() -> None:
    grid = [[1.0, 0.5], [0.5, 0.25]]
    fig = rp.similarity_grids({kind: grid for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj")})
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.get_images()]
    assert len(shown) == 7 and fig.get_figwidth() <= 16  # was one row of 7 panels, 26.4 inches wide
    assert texts_outside(fig) == []


def _every_other_figure() -> dict[str, Callable[[], Figure]]:
    kinds = [split_name(n)[1] for n in SMOLLM[:7]]
    grid = [[0.01 * (k + b) for b in range(30)] for k in range(7)]
    history = {"full": [(s, 2.0 / (s + 1)) for s in range(50)], "lora": [(s, 2.5 / (s + 1)) for s in range(50)]}
    return {
        "heatmap": lambda: rp.heatmap(grid, kinds, [str(b) for b in range(30)], "‖ΔW‖_F / ‖W‖_F per layer", "block", "module",
                              "relative norm"),
        "learning_curve": lambda: rp.learning_curve([0.1, 0.25, 0.5, 1.0], {"full": [0.6, 0.7, 0.75, 0.8],
                                            "lora": [0.6, 0.72, 0.74, 0.8]}, "accuracy", [320, 800, 1600, 3200], 0.5),
        "grouped_bars": lambda: rp.grouped_bars(["1", "10", "100"], {"full": [90.0, 900.0, 9000.0], "lora": [91.0, 96.0, 153.0]},
                                        "MB on disk (log scale)", "Disk for N tasks", log=True, xlabel="tasks"),
        "loss_curves": lambda: rp.loss_curves(history),
        "lr_range": lambda: rp.lr_range([1e-5 * 1.3 ** k for k in range(40)], [2.0 - 0.01 * k for k in range(40)],
                                [2.0 - 0.01 * k for k in range(40)], 1e-3),
        "rank_sweep": lambda: rp.rank_sweep([1, 2, 4, 8, 16, 32, 64], {"lr 0.002": [0.6, 0.7, 0.75, 0.8, 0.81, 0.83, 0.5]},
                                    [20_000 * 2 ** k for k in range(7)], "accuracy", 0.82),
    }


@pytest.mark.parametrize("name", ["heatmap", "learning_curve", "grouped_bars", "loss_curves", "lr_range",
                                  "rank_sweep"])
def test_every_figure_keeps_its_labels_inside(name: str) -> None:
    assert texts_outside(_every_other_figure()[name]()) == []
