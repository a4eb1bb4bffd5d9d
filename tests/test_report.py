"""`lorakit.report` figures readable at their default size: every label inside the figure, one unit per axis, many
layers summarised (lines and panels bounded), and the summaries equal to the numbers they summarise."""

from __future__ import annotations

import pytest
from matplotlib.collections import PolyCollection

from evidence_helpers import texts_outside
from lorakit import report as rp
from lorakit.analyze import split_name

BERT = [f"bert.encoder.layer.{b}.{k}" for b in range(6)
        for k in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")]
BERT.append("bert.pooler.dense")
SMOLLM = [f"model.layers.{b}.{k}" for b in range(30)
          for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                    "mlp.up_proj", "mlp.down_proj")]


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
