"""`lorakit.evidence.claims`: the verdict words and the sizes quoted in the claim rows."""

from __future__ import annotations

from lorakit.evidence.claims import format_bytes, format_mb, verdict


def test_verdict_words() -> None:
    assert [verdict(True), verdict(False), verdict(None)] == ["holds", "does not hold", "not measured"]


def test_sizes_in_decimal_units() -> None:
    assert [format_bytes(n) for n in (999, 1000, 627_000, 90_870_000, 5.38e9, 2e15)] == \
        ["999 B", "1.00 KB", "627.00 KB", "90.87 MB", "5.38 GB", "2000.00 TB"]
    assert format_mb(None) == "-" and format_mb(1594.6) == "1595 MB"
