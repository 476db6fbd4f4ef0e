"""The cold-start benchmark runs end to end in --quick mode on CPU (real probe processes,
real page-cache eviction) and writes the agreed JSON shape. Its figures are not asserted:
on a shared 2-core machine they say nothing; bench/README.md keeps the full-size table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import BENCH_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("interpreter", "imports", "device", "weights", "warm", "first_result")


@pytest.mark.slow
def test_cold_start_quick_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "cold_start.json"
    cmd = [sys.executable, str(ROOT / "bench" / "cold_start.py"), "--quick", "--sizes", "0.02",
           "--workdir", str(tmp_path / "models"), "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cold_start: targets" in proc.stdout
    result = json.loads(out.read_text())
    assert result["bench"] == "cold_start"
    assert result["machine"]["device"] == "cpu"
    assert result["machine"]["sizes_gb"] == [0.02]
    assert set(result["targets"]) == {
        "ready_vs_cat_warm_0.02gb",
        "process_vs_cat_warm_prefetch_0.02gb",
        "process_vs_cat_warm_standby_0.02gb",
    }
    for target in result["targets"].values():
        assert set(target) == {"value", "op", "target", "met"}
    m = result["metrics"]
    assert 0.015 < m["file_gb_0.02gb"] < 0.025
    assert m["cat_warm_s_0.02gb"] > 0 and m["cat_cold_s_0.02gb"] > 0
    assert -1 <= m["resident_after_evict_0.02gb"] <= 1
    for cache in ("warm", "cold"):
        for variant in ("plain", "prefetch", "standby"):
            ends = [m[f"{cache}_{variant}_{phase}_s_0.02gb"] for phase in PHASES]
            assert ends == sorted(ends) and ends[0] >= 0 and ends[-1] > 0
            assert m[f"process_vs_cat_{cache}_{variant}_0.02gb"] > 0
    # Generated once, reused: a second run finds the model directory and its digests.
    assert (tmp_path / "models" / "tiny-lm-0.02gb-bf16" / "digests.json").is_file()
