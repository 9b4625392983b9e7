"""The markdown tables the bench scripts print (docs/BENCHMARKS.md takes them as they are)."""

from __future__ import annotations


def markdown(rows: list[dict], columns: list[str], digits: int = 3) -> str:
    """`rows` as a markdown table of `columns`, floats with `digits` decimals."""

    def cell(value) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
