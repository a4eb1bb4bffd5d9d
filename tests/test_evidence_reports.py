"""`lorakit.evidence.reports`: the compare report's cost and time figures put one unit on each axis, with the
numbers they were given, every label inside the figure."""

from __future__ import annotations

from evidence_helpers import texts_outside
from lorakit.evidence.reports import costs_figure, time_figure


def _method(step: float, cpu_step: float, total: float, cpu_total: float) -> dict:
    return {"step_time_s": step, "step_cpu_s": cpu_step, "train_time_s": total, "cpu_time_s": cpu_total,
            "trainable_params": 1000, "checkpoint_bytes": 4e6, "train_peak_mb": 900.0, "peak_memory_mb": 1200.0}


def test_time_chart_has_one_unit_per_axis() -> None:
    fig = time_figure(_method(1.5, 1.2, 600.0, 540.0), _method(0.5, 0.4, 300.0, 240.0))
    step_ax, total_ax = fig.axes
    assert step_ax.get_ylabel() == "seconds per step" and total_ax.get_ylabel() == "minutes"
    heights = lambda ax: sorted(round(p.get_height(), 6) for p in ax.patches)  # noqa: E731
    assert heights(step_ax) == [0.4, 0.5, 1.2, 1.5]
    assert heights(total_ax) == [4.0, 5.0, 9.0, 10.0]  # minutes, not seconds
    assert texts_outside(fig) == []


def test_costs_chart_has_one_unit_per_axis() -> None:
    full, lora = _method(1, 1, 1, 1), _method(1, 1, 1, 1)
    lora.update(trainable_params=10, checkpoint_bytes=4e4, train_peak_mb=450.0)
    fig = costs_figure(full, lora)
    params_ax, checkpoint_ax, memory_ax = fig.axes
    assert [ax.get_ylabel() for ax in fig.axes] == ["parameters (log scale)", "MB on disk (log scale)", "MB"]
    heights = lambda ax: sorted(round(p.get_height(), 6) for p in ax.patches)  # noqa: E731
    assert heights(params_ax) == [10, 1000] and heights(checkpoint_ax) == [0.04, 4.0]  # bytes shown as MB
    assert heights(memory_ax) == [450.0, 900.0, 1200.0, 1200.0]
    assert texts_outside(fig) == []
