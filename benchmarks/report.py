"""Writers shared by every benchmark: JSON lines in and out, Markdown table helpers, plots."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .models import LABELS, MODELS, STYLES

MiB = 2**20
_WRITE_LOCK = threading.Lock()  # runners in threads (depth_quality --jobs) append to one file


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file ([] when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace `path` with one JSON object per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append whole lines, one writer at a time."""
    with _WRITE_LOCK, open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MiB:.1f}"


def ok_memory(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Memory records that ran and fit."""
    return [r for r in records if r.get("mode") == "memory" and r.get("ok") and not r.get("over_budget")]


def ok_time(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("mode") == "time" and r.get("ok")]


def by_model_and(records: list[dict[str, Any]], key: str) -> dict[str, dict[int, dict[str, Any]]]:
    """{model: {spec[key]: record}} (the last record wins)."""
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        table.setdefault(r["spec"]["model"], {})[r["spec"][key]] = r
    return table


def pivot(rows: list[int], table: dict[str, dict[int, dict[str, Any]]], cell: Callable[[dict[str, Any]], str],
          first: str) -> list[str]:
    """A Markdown table: one row per value of `rows`, one column per model of `table`."""
    models = [m for m in MODELS if m in table]
    lines = [f"| {first} | " + " | ".join(LABELS[m] for m in models) + " |", "|---" * (len(models) + 1) + "|"]
    for row in rows:
        cells = [cell(table[m][row]) if row in table[m] else "–" for m in models]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def model_style(model: str) -> dict[str, Any]:
    """Plot keywords of one model: its colour, marker, line and label."""
    color, marker, line = STYLES[model]
    return {"color": color, "marker": marker, "linestyle": line, "label": LABELS[model], "markerfacecolor": "none"}
