"""Markdown tables, the one format every recipe prints (demo, benchmarks, pareto, bench)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """``a | b`` lines: the header, a ``--- | ---`` rule, then one line per row of cells."""
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    lines += [" | ".join(cells) for cells in rows]
    return "\n".join(lines)
