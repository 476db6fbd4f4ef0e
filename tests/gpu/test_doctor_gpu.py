"""``gpufleet doctor`` on the real GPU machine: it finds the GPU, the driver and torch's CUDA,
and sees nothing wrong with serving the built-in model there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs an NVIDIA GPU"),
]


def _doctor(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GPUFLEET_NVML_RECORDING"}
    env["GPUFLEET_DATA_DIR"] = str(tmp_path / "data")
    return subprocess.run(
        [sys.executable, "-c", "from gpufleet.cli.main import main; main()", "doctor", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_doctor_finds_the_gpu_and_no_errors(tmp_path: Path) -> None:
    done = _doctor(tmp_path, "--json", "builtin:digits", "--save-facts", str(tmp_path / "f.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["errors"] == 0, report
    gpus = [f for f in report["findings"] if f["check"] == "host.gpu"]
    assert gpus and "compute capability" in gpus[0]["found"]
    driver = next(f for f in report["findings"] if f["check"] == "host.driver")
    assert "torch" in driver["found"] and "no CUDA" not in driver["found"]
    assert any(f["check"] == "model.ok" and f["subject"] == "digits@1" for f in report["findings"])
    facts = json.loads((tmp_path / "f.json").read_text())
    assert facts["host"]["gpus"] and facts["runtimes"][0]["cuda"]
    print("\n" + json.dumps(report, indent=1))


def test_facts_saved_here_diagnose_the_same_elsewhere(tmp_path: Path) -> None:
    here = _doctor(tmp_path, "--json", "builtin:digits", "--save-facts", str(tmp_path / "f.json"))
    offline = _doctor(tmp_path, "--json", "builtin:digits", "--facts", str(tmp_path / "f.json"))
    assert offline.returncode == here.returncode == 0
    assert json.loads(offline.stdout) == json.loads(here.stdout)
