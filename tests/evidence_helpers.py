"""Shared by the evidence tests: tiny recipe overrides and the check that a report folder is complete."""

from __future__ import annotations

from pathlib import Path

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
