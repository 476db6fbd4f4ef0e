"""``gpufleet serve`` reads each model's ``resources.gpu`` and refuses, before starting
anything, a set of models the GPUs cannot hold (here the recorded H100, replayed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.gpu.share_model import make_share_model

H100 = Path(__file__).parents[1] / "gpu" / "fixtures" / "h100.nvml.json"


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "GPUFLEET_DATA_DIR": str(tmp_path / "d"),
        "GPUFLEET_NVML_RECORDING": str(H100),
    }
    env.pop("GPUFLEET_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "gpufleet", "serve", "--port", "0", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_over_committed_gpu_is_refused_before_anything_starts(tmp_path: Path) -> None:
    model = make_share_model(
        tmp_path / "m", "big", "{mode: fraction, memory_gb: 50, compute_percent: 40}"
    )
    done = _serve(tmp_path, "--model", str(model), "--workers-per-gpu", "2")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "insufficient_gpu: big@1 asks for 50 GB and 40% of a GPU (fraction) per worker; "
        "worker 2 does not fit: GPU 0 (NVIDIA H100 80GB HBM3): 24.1 GB of memory short "
        "(26.7 GB left; a worker takes 50.75 GB with its CUDA context)"
    ]
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "d" / "run" / "allocations.json").exists()


def test_two_whole_gpu_models_on_one_gpu_are_refused(tmp_path: Path) -> None:
    a = make_share_model(tmp_path / "a", "a", "{mode: whole}")
    b = make_share_model(tmp_path / "b", "b", "{mode: whole}")
    done = _serve(tmp_path, "--model", str(a), "--model", str(b))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "insufficient_gpu: b@1 asks for 1 whole GPU; 0 of 1 GPUs free; GPU 0 is held whole by a@1"
    )


def test_a_bad_placement_policy_is_one_line(tmp_path: Path) -> None:
    done = _serve(tmp_path, "--placement", "random")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "invalid_input: --placement must be binpack or spread, got 'random'"
    )
