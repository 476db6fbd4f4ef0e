"""The serve benchmark runs end to end in --quick mode (a real ``gpufleet serve`` and worker)
and writes the agreed JSON shape. Its figures are not asserted: on a shared CI machine they
say nothing; bench/README.md keeps the full-size table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import BENCH_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {
    "noop_p50_ms",
    "served_vs_litserve_min",
    "p99_over_p50_c16",
    "interactive_p95_ratio_under_backlog",
    "bulk_submit_per_s",
    "noop_gpufleet-sqlite_c16_per_s",
    "noop_litserve_c16_per_s",
    "echo_echo_c16_per_s",
}


@pytest.mark.slow
def test_serve_bench_quick_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "serve_bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "serve_bench.py"),
            "--quick",
            "--models",
            "noop",
            "--clients",
            "1,16",
            "--seconds",  # a point: 1 s, not --quick's 2 (answers inside it count, whenever sent)
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "serve_bench: targets" in proc.stdout
    result = json.loads(out.read_text())
    assert result["bench"] == "serve_bench"
    assert set(result["metrics"]) >= FIGURES
    assert set(result["targets"]) >= {
        "noop_p50_ms",
        "served_vs_litserve_min",
        "interactive_p95_ratio_under_backlog",
        "bulk_submit_per_s",
    }
    assert result["metrics"]["sqlite_backlog_queued_before"] > 0
