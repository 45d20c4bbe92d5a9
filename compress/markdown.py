"""Markdown for report.md: value formatting and tables, shared by the report and stage sections."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def fmt(value: Any, kind: str = "str") -> str:
    """A value as a table cell: pct, count, bytes, ms, sci or s; `–` when missing."""
    if value is None:
        return "–"
    if kind == "pct":
        return f"{value:.2f}"
    if kind == "count":
        return f"{value / 1e6:.3f} M" if value >= 1e5 else f"{value:,}"
    if kind == "bytes":
        return f"{value / 2**20:.2f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"
    if kind == "ms":
        return f"{value:.3f}"
    if kind == "sci":
        return f"{value:.2g}"
    if kind == "s":
        return f"{value:.1f}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table's lines; cells are used as given (format them with `fmt`)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines
