"""Rendering of measured evidence: matplotlib figures (Agg) and Markdown + self-contained HTML reports.

Nothing here measures or decides: `lorakit.evidence` and `lorakit.analyze` compute the numbers and verdicts and
hand them over as tables and figures. A `Report` is a list of blocks written twice: ``report.md`` (PNGs beside
it) and ``report.html`` (the same PNGs inlined as base64, so the file stands alone).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

#: one colour per method / series, stable across figures
COLORS = {"full": "#d62728", "lora": "#1f77b4"}
CYCLE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf"]


@dataclass
class _Block:
    kind: str  # heading | text | table | figure
    content: Any


@dataclass
class Report:
    title: str
    blocks: list[_Block] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(_Block("heading", text))

    def text(self, text: str) -> None:
        self.blocks.append(_Block("text", text))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(_Block("table", ([str(h) for h in headers], [[str(c) for c in r] for r in rows])))

    def figure(self, fig: Figure, filename: str, caption: str = "") -> None:
        """Render ``fig`` to PNG bytes now (and close it) so figures do not pile up in memory."""
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.blocks.append(_Block("figure", (filename, buffer.getvalue(), caption)))

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for block in self.blocks:
            if block.kind == "heading":
                lines += [f"## {block.content}", ""]
            elif block.kind == "text":
                lines += [block.content, ""]
            elif block.kind == "table":
                lines += markdown_table(*block.content).splitlines() + [""]
            else:
                filename, _, caption = block.content
                lines += [f"![{caption or filename}]({filename})", ""]
                if caption:
                    lines += [f"*{caption}*", ""]
        return "\n".join(lines)

    def html(self) -> str:
        parts = [f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            if block.kind == "heading":
                parts.append(f"<h2>{html.escape(block.content)}</h2>")
            elif block.kind == "text":
                parts.append(f"<p>{html.escape(block.content)}</p>")
            elif block.kind == "table":
                headers, rows = block.content
                head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
                body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                filename, png, caption = block.content
                data = base64.b64encode(png).decode("ascii")
                parts.append(f'<figure><img alt="{html.escape(filename)}" src="data:image/png;base64,{data}">'
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
                 "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
                 "th{background:#f3f3f3}img{max-width:100%}figcaption{color:#555;font-size:13px}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")

    def write(self, folder: str | Path) -> Path:
        """Write ``report.md``, ``report.html`` and each figure's PNG into ``folder``, each file atomically (a
        reader sees the old report or the new one)."""
        from .files import write_bytes

        out = Path(folder)
        for block in self.blocks:
            if block.kind == "figure":
                filename, png, _ = block.content
                write_bytes(out / filename, png)
        write_bytes(out / "report.md", self.markdown().encode("utf-8"))
        write_bytes(out / "report.html", self.html().encode("utf-8"))
        return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(value: str) -> str:
        return value.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- figures ----------------------------------------------------------------------------------------------------
def _color(label: str, index: int) -> str:
    return COLORS.get(label, CYCLE[index % len(CYCLE)])


def learning_curve(fractions: Sequence[float], series: dict[str, Sequence[float]], metric: str,
                   examples: Sequence[int] | None = None, baseline: float | None = None) -> Figure:
    """Held-out metric against the share of training data, one line per method."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for i, (label, values) in enumerate(series.items()):
        ax.plot(fractions, values, marker="o", label=label, color=_color(label, i))
    if baseline is not None:
        ax.axhline(baseline, color="#777", linestyle="--", label="before training")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(list(fractions))
    ax.set_xticklabels([f"{f:g}" + (f"\n({n})" if examples else "") for f, n in
                        zip(fractions, examples or [0] * len(fractions))])
    ax.set_xlabel("fraction of the training budget" + (" (examples)" if examples else ""))
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title(f"Learning curve: held-out {metric} vs training data")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def grouped_bars(categories: Sequence[str], series: dict[str, Sequence[float]], ylabel: str, title: str,
                 log: bool = False, xlabel: str | None = None) -> Figure:
    """One group of bars per category, one bar per series (e.g. method), values printed on the bars. All the
    categories share one axis: give them one unit (`bar_panels` for several units)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(categories) + 2), 4.0), layout="constrained")
    _bars(ax, categories, series, ylabel, log)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_title(title)
    return fig


@dataclass
class BarPanel:
    """One panel of `bar_panels`: its own axis, so its own unit (in ``ylabel``)."""

    title: str
    ylabel: str  # names the unit: "seconds per step", "MB"
    categories: Sequence[str]
    series: dict[str, Sequence[float]]
    log: bool = False


def bar_panels(panels: Sequence[BarPanel], title: str) -> Figure:
    """Grouped bars side by side, one panel per unit (seconds per step next to minutes in total, never on one
    axis)."""
    widths = [max(2.4, 1.3 * len(p.categories) + 1.2) for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths) + 0.6, 4.0), squeeze=False,
                             gridspec_kw={"width_ratios": widths}, layout="constrained")
    for ax, panel in zip(axes[0], panels):
        _bars(ax, panel.categories, panel.series, panel.ylabel, panel.log, legend=ax is axes[0][0])
        ax.set_title(panel.title, fontsize=10)
    fig.suptitle(title)
    return fig


def _bars(ax: Any, categories: Sequence[str], series: dict[str, Sequence[float]], ylabel: str, log: bool,
          legend: bool = True) -> None:
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        bars = ax.bar(xs, values, width, label=label, color=_color(label, i))
        ax.bar_label(bars, labels=[_short(v) for v in values], fontsize=8, padding=2)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend(fontsize=8)
    ax.margins(y=0.15)


def _short(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    magnitude = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def loss_curves(histories: dict[str, Sequence[tuple[int, float]]], title: str = "Training loss") -> Figure:
    """Per-step training loss (moving average over 10 steps), one line per run."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for i, (label, points) in enumerate(histories.items()):
        if not points:
            continue
        steps = [s for s, _ in points]
        losses = [v for _, v in points]
        window = 10
        smooth = [sum(losses[max(0, k - window + 1):k + 1]) / len(losses[max(0, k - window + 1):k + 1])
                  for k in range(len(losses))]
        color = _color(label, i)
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth, color=color, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def rank_sweep(ranks: Sequence[int], by_lr: dict[str, Sequence[float]], params: Sequence[int], metric: str,
               full_metric: float | None = None) -> Figure:
    """Two panels: held-out metric vs rank (one line per learning rate) and vs trainable parameters."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for i, (label, values) in enumerate(by_lr.items()):
        color = CYCLE[i % len(CYCLE)]
        left.plot(ranks, values, marker="o", label=label, color=color)
        right.plot(params, values, marker="o", label=label, color=color)
    for ax in (left, right):
        if full_metric is not None:
            ax.axhline(full_metric, color=COLORS["full"], linestyle="--", label="full fine-tuning")
        ax.set_xscale("log", base=2 if ax is left else 10)
        ax.set_ylabel(f"held-out {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_xticks(list(ranks))
    left.set_xticklabels([str(r) for r in ranks])
    left.set_xlabel("LoRA rank r")
    left.set_title(f"Held-out {metric} vs rank")
    right.set_xlabel("trainable parameters")
    right.set_title(f"Held-out {metric} vs trainable parameters")
    return fig


def heatmap(values: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str], title: str,
            xlabel: str, ylabel: str, colorbar: str) -> Figure:
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(col_labels) + 3), max(2.6, 0.45 * len(row_labels) + 1.4)),
                           layout="constrained")
    image = ax.imshow(values, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(col_labels)
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(col_labels) * len(row_labels) <= 120:
        flat = [v for row in values for v in row if math.isfinite(v)]
        middle = (min(flat) + max(flat)) / 2 if flat else 0
        for r, row in enumerate(values):
            for c, v in enumerate(row):
                if math.isfinite(v):
                    ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=7,
                            color="white" if v < middle else "black")
    fig.colorbar(image, ax=ax, label=colorbar)
    return fig


def spectra(singular_values: dict[str, Sequence[float]], kinds: Sequence[str]) -> Figure:
    """σ_i / σ_1 of the layers' updates, summarised per module kind (log scale): one small panel per kind with
    the median over its layers and the band between the quartiles, so 210 layers read as 7 curves."""
    groups: dict[str, list[list[float]]] = {}
    for sigma, kind in zip(singular_values.values(), kinds):
        if sigma and sigma[0] > 0:
            groups.setdefault(kind, []).append([v / sigma[0] for v in sigma])
    fig, axes = panel_grid(len(groups), 3.3, 2.7, sharey=True)
    for k, (ax, (kind, curves)) in enumerate(zip(axes, groups.items())):
        index, low, mid, high = _quartiles(curves)
        color = CYCLE[k % len(CYCLE)]
        if len(curves) > 1:
            ax.fill_between(index, low, high, color=color, alpha=0.25, linewidth=0, label="quartiles")
        ax.plot(index, mid, marker=".", color=color, label="median" if len(curves) > 1 else "the layer")
        ax.set_yscale("log")
        ax.set_title(f"{_fit(kind, 34)} ({len(curves)} layer{'s' if len(curves) > 1 else ''})", fontsize=9)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, nbins=6))
        ax.grid(alpha=0.3)
        if k % PANEL_COLUMNS == 0:
            ax.set_ylabel("σ_i / σ_1")
        if k + PANEL_COLUMNS >= len(groups):  # nothing below it
            ax.set_xlabel("index i")
        if k == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Singular-value spectrum of ΔW per module kind (median, quartile band)")
    return fig


#: most panels in a row of `panel_grid`
PANEL_COLUMNS = 4


def panel_grid(n: int, width: float, height: float, sharey: bool = False) -> tuple[Figure, list[Any]]:
    """A figure of ``n`` panels of ``width`` x ``height`` inches, `PANEL_COLUMNS` to a row (many module kinds wrap
    instead of growing one row past a page); returns the figure and its ``n`` axes, the unused cells hidden."""
    cols = min(PANEL_COLUMNS, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig, grid = plt.subplots(rows, cols, figsize=(width * cols + 0.6, height * rows + 0.8), squeeze=False,
                             sharey=sharey, layout="constrained")
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _quartiles(curves: Sequence[Sequence[float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per index 1..longest: the 25th, 50th and 75th percentile over the curves that reach that index."""
    import statistics

    index, low, mid, high = [], [], [], []
    for i in range(max(len(c) for c in curves)):
        values = sorted(c[i] for c in curves if len(c) > i)
        q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
        index.append(i + 1)
        low.append(q[0])
        mid.append(statistics.median(values))
        high.append(q[2])
    return index, low, mid, high


def _fit(text: str, limit: int) -> str:
    """``text`` shortened from the left, marked with an ellipsis, never cut silently."""
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def similarity_grids(grids: dict[str, Sequence[Sequence[float]]]) -> Figure:
    """φ(i, j) heatmaps (LoRA paper Figure 3), one panel per module kind, `PANEL_COLUMNS` to a row."""
    fig, axes = panel_grid(len(grids), 3.6, 3.3)
    image = None
    for k, (ax, (kind, grid)) in enumerate(zip(axes, grids.items())):
        image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1, origin="upper",
                          extent=(0.5, len(grid[0]) + 0.5, len(grid) + 0.5, 0.5))
        ax.set_title(_fit(kind, 34), fontsize=10)
        if k + PANEL_COLUMNS >= len(grids):  # nothing below it
            ax.set_xlabel("j (top directions of b)")
        if k % PANEL_COLUMNS == 0:
            ax.set_ylabel("i (top directions of a)")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, nbins=8))
    if image is not None:
        fig.colorbar(image, ax=axes, label="φ(i, j)")
    fig.suptitle("Subspace similarity φ(i, j) = ‖U_aᵢᵀ U_bⱼ‖² / min(i, j)")
    return fig


def lr_range(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], chosen: float) -> Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    ax.plot(lrs, losses, color="#999", alpha=0.6, label="loss per step")
    ax.plot(lrs, smoothed, color=COLORS["lora"], label="smoothed")
    ax.axvline(chosen, color=COLORS["full"], linestyle="--", label=f"suggested lr {chosen:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (increased every step)")
    ax.set_ylabel("training loss")
    ax.set_title("Learning-rate range test (LoRA)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def rank_estimates(layers: Sequence[tuple[int | None, str]], ranks: Sequence[int], chosen: int,
                   energy: float) -> Figure:
    """The rank each layer's gradient needs. ``layers``: ``(block index or None, module kind)`` per layer, as
    `lorakit.analyze.split_name` gives. Up to `MAX_BARS` layers: one labelled bar each; more: one small panel
    per module kind with a bar per block (210 layers of a 30-block model read as 7 panels)."""
    title = "Rank needed per layer (accumulated-gradient spectrum)"
    if len(layers) <= MAX_BARS:
        fig = _rank_bars([_layer_label(b, k) for b, k in layers], ranks)
        fig.axes[0].set_title(title)
    else:
        fig = _rank_panels(layers, ranks)
        fig.suptitle(title)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    for ax in shown:
        ax.axhline(chosen, color=COLORS["full"], linestyle="--", label=f"suggested rank {chosen}")
        ax.set_yscale("log", base=2)
    shown[0].set_ylabel(f"rank holding {int(energy * 100)}% of gradient energy")
    shown[0].legend(fontsize=8)
    return fig


#: most layers `rank_estimates` draws as labelled bars
MAX_BARS = 64


def _layer_label(block: int | None, kind: str) -> str:
    return kind if block is None else f"{block}: {kind}"


def _rank_bars(labels: Sequence[str], ranks: Sequence[int]) -> Figure:
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(labels) + 2), 4.6), layout="constrained")
    ax.bar(range(len(labels)), ranks, color=COLORS["lora"])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_xlim(-0.7, len(labels) - 0.3)
    ax.set_xlabel("adapted layer (block: module)")
    return fig


def _rank_panels(layers: Sequence[tuple[int | None, str]], ranks: Sequence[int]) -> Figure:
    """One panel per module kind, a bar per block; layers outside the blocks (a pooler) after the last block."""
    after = 1 + max((b for b, _ in layers if b is not None), default=-1)
    by_kind: dict[str, list[tuple[int, int]]] = {}
    for (block, kind), rank in zip(layers, ranks):
        by_kind.setdefault(kind, []).append((after if block is None else block, rank))
    fig, axes = panel_grid(len(by_kind), 3.3, 2.5, sharey=True)
    for k, (ax, (kind, points)) in enumerate(zip(axes, by_kind.items())):
        ax.bar([b for b, _ in points], [r for _, r in points], color=CYCLE[k % len(CYCLE)])
        ax.set_title(f"{_fit(kind, 34)} ({len(points)} layer{'s' if len(points) > 1 else ''})", fontsize=9)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, nbins=6))
        if k + PANEL_COLUMNS >= len(by_kind):  # nothing below it
            ax.set_xlabel("block index")
    return fig
