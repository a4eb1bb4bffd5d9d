"""How a claim is judged: the tolerances and one verdict row per claim. The metric a recipe is judged by and its
direction come from the task table (`lorakit.tasks.primary_metric`)."""

from __future__ import annotations

from dataclasses import dataclass

#: "1 point": 0.01 of accuracy, or 0.01 nats of loss (about 1% of perplexity)
TOLERANCE = 0.01
#: relative margin a cost (memory, time) must beat to count as "less"
COST_MARGIN = 0.05


@dataclass
class ClaimRow:
    claim: str
    measure: str
    full: str
    lora: str
    verdict: str  # holds | does not hold | not measured | not judged
    rule: str


def verdict(ok: bool | None) -> str:
    """``None``: not measured; else holds / does not hold."""
    return "not measured" if ok is None else ("holds" if ok else "does not hold")


def format_mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MB"


def format_bytes(n: float) -> str:
    """Decimal units, as file managers show sizes: ``1.23 MB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
