"""The serve benchmark runs end to end in --quick mode (a real ``gpufleet serve`` and worker)
and writes the agreed JSON shape. Its figures are not asserted: on a shared CI machine they
say nothing; bench/README.md keeps the full-size table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {
    "throughput_ratio_vs_bare",
    "added_latency_p50_ms",
    "added_latency_p99_ms",
    "interactive_p95_ratio_under_backlog",
}


@pytest.mark.slow
def test_serve_bench_quick_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "serve_bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve_bench.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "serve_bench: targets" in proc.stdout
    result = json.loads(out.read_text())
    assert result["bench"] == "serve_bench"
    assert set(result["metrics"]) >= FIGURES
    assert set(result["targets"]) == {
        "throughput_ratio_vs_bare",
        "interactive_p95_ratio_under_backlog",
    }
    assert result["metrics"]["backlog_queued_before"] > 0
