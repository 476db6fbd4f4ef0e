"""The start-up benchmark runs in --quick mode, writes the agreed JSON shape, and finds none of
the server's packages in the processes it times. Its times are not asserted: on a shared
machine they say nothing (bench/README.md keeps the table)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cli_start_quick_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "cli_start.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cli_start.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cli_start: targets" in proc.stdout
    result = json.loads(out.read_text())
    assert result["bench"] == "cli_start"
    assert set(result["targets"]) == {"help_s", "import_client_s", "tasks_help_s"}
    assert all(v > 0 for v in result["metrics"].values())
    heavy = result["machine"]["heavy_modules"]
    assert set(heavy) >= {"help", "import_client", "tasks_help"}
    assert all(found == [] for found in heavy.values()), heavy
