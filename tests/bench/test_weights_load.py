"""The weights-load sweep runs end to end in --quick mode on CPU and writes the agreed JSON
shape; its figures are not asserted (bench/README.md keeps the device's table)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import BENCH_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_weights_load_quick_writes_results(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "weights_load.json"
    cmd = [sys.executable, str(ROOT / "bench" / "weights_load.py"), "--quick",
           "--workdir", str(tmp_path / "models"), "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "weights_load: targets" in proc.stdout
    result = json.loads(out.read_text())
    assert result["bench"] == "weights_load"
    assert result["machine"]["device"] == "cpu"
    m = result["metrics"]
    assert 0.04 < m["file_gb"] < 0.06
    for block in (1, 8):
        for kind in ("checked", "unchecked"):
            assert m[f"t2_b{block}_{kind}_s"] > 0
    assert result["targets"]["best_checked_vs_cat"]["op"] == "<="
