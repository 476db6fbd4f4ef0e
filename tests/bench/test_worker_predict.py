"""The worker-predict probe serves the demo model, reads the worker's own inference histogram
and compares it with the bare loop of the same run. Its times are not asserted: on a shared
machine they say nothing; the shape and that it measured something are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_worker_predict_reads_the_workers_predict_time(tmp_path: Path) -> None:
    out = tmp_path / "worker_predict.json"
    cmd = [sys.executable, str(ROOT / "bench" / "worker_predict.py"), "--model", "digits",
           "--clients", "4", "--seconds", "1", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker_predict: all measurements" in proc.stdout
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert result["bench"] == "worker_predict" and result["machine"]["clients"] == [4]
    assert m["c4_per_s"] > 0 and m["c4_predict_ms"] > 0 and m["bare_batch_ms"] > 0
    assert 1 <= m["c4_batch_mean"] <= 4  # four closed-loop clients: at most four a batch
    assert m["c4_predict_vs_bare"] == pytest.approx(m["c4_predict_ms"] / m["bare_batch_ms"],
                                                    rel=0.01)  # fmt: skip
