"""Shared by the evidence and report tests: tiny recipe overrides, the check that a report folder is complete,
and which texts of a figure a PNG of it would cut."""

from __future__ import annotations

from pathlib import Path

import matplotlib.text
from matplotlib.figure import Figure

# one thread: on 2 shared cores, two OpenMP threads per process slow everything down several times
TINY = ["train.max_steps=2", "train.max_train_examples=32", "train.batch_size=8", "train.max_length=32",
        "eval.max_examples=16", "eval.batch_size=16", "train.num_threads=1"]
PNG = b"\x89PNG\r\n\x1a\n"


def check_report(folder: Path, figures: int) -> None:
    """``figures`` PNGs, each a real PNG, inlined in report.html and linked from report.md."""
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == figures
    for png in pngs:
        assert png.read_bytes()[:8] == PNG
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == figures and "<table>" in html
    markdown = (folder / "report.md").read_text()
    assert all(png.name in markdown for png in pngs)


def drawn_texts(fig: Figure) -> list[matplotlib.text.Text]:
    """Texts a PNG of ``fig`` shows: titles, axis labels, legends, value labels, and the tick labels of ticks
    inside the axes' view (matplotlib keeps, but does not draw, those outside)."""
    ticks = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if low - 1e-9 * abs(high - low) <= tick.get_loc() <= high + 1e-9 * abs(high - low):
                    ticks.update({id(tick.label1), id(tick.label2)})
    tick_labels = {id(t) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
                   for tick in axis.get_major_ticks() + axis.get_minor_ticks() for t in (tick.label1, tick.label2)}
    return [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()
            and (id(t) not in tick_labels or id(t) in ticks) and (t.axes is None or t.axes.get_visible())]


def texts_outside(fig: Figure) -> list[str]:
    """Drawn texts whose extent leaves the figure (what a PNG of the figure at its default size would cut)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    outside = []
    for text in drawn_texts(fig):
        ext = text.get_window_extent(renderer)
        if ext.x0 < box.x0 - 1 or ext.x1 > box.x1 + 1 or ext.y0 < box.y0 - 1 or ext.y1 > box.y1 + 1:
            outside.append(text.get_text())
    return outside
