"""The queue benchmark runs end to end in --quick mode and writes the agreed JSON shape.

Its figures are not asserted here: on a shared CI machine they say nothing. bench/README.md
keeps the full-size table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import BENCH_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {
    "pg_claim_complete_per_s",
    "sqlite_claim_complete_per_s",
    "ratio_vs_pgqueuer",
    "ratio_vs_procrastinate",
    "pg_wakeup_p50_ms",
    "sqlite_wakeup_p50_ms",
}


@pytest.mark.slow
def test_queue_bench_quick_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "queue_bench.json"
    # --quick at a fifth of its tasks: the same runs and figures, each over fewer tasks.
    cmd = [sys.executable, str(ROOT / "bench" / "queue_bench.py"), "--quick", "--tasks", "400",
           "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "queue_bench: targets" in proc.stdout
    result = json.loads(out.read_text())
    assert result["bench"] == "queue_bench"
    assert result["machine"]["quick"] is True
    assert result["machine"]["tasks"] == 400
    assert set(result["metrics"]) >= FIGURES
    assert {k: v for k, v in result["metrics"].items() if not v > 0} == {}
    for name, target in result["targets"].items():
        assert set(target) == {"value", "op", "target", "met"}, name
        assert target["op"] in (">=", "<=")
        assert target["met"] == (
            target["value"] >= target["target"]
            if target["op"] == ">="
            else target["value"] <= target["target"]
        )
