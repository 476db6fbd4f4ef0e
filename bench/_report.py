"""What every benchmark shares (the convention in DESIGN.md): percentiles, the result JSON
with its machine and targets, and the two tables printed last."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

Row = tuple[str, str, str]  # measurement, result, target
console = Console()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def result(
    bench: str,
    metrics: dict[str, float],
    targets: dict[str, tuple[str, float]],
    **machine: Any,
) -> dict[str, Any]:
    """The JSON a benchmark writes: ``targets`` maps a figure to (">=" | "<=", target)."""
    return {
        "bench": bench,
        "machine": {
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            **machine,
        },
        "metrics": {k: round(v, 3) for k, v in metrics.items()},
        "targets": {
            name: {
                "value": round(metrics[name], 3),
                "op": op,
                "target": target,
                "met": metrics[name] >= target if op == ">=" else metrics[name] <= target,
            }
            for name, (op, target) in targets.items()
        },
    }


def report(result: dict[str, Any], rows: list[Row], json_path: Path | None) -> None:
    """Write the JSON (if asked) and print the measurements, then the targets."""
    name = result["bench"]
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    detail = Table("measurement", "result", "target", title=f"{name}: all measurements")
    for r in rows:
        detail.add_row(*r)
    console.print(detail)
    table = Table("figure", "value", "target", "met", title=f"{name}: targets")
    for figure, t in result["targets"].items():
        table.add_row(figure, f"{t['value']:.2f}", f"{t['op']} {t['target']}", str(t["met"]))
    console.print(table)
