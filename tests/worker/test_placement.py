"""From allocations to worker slots: the environment each worker gets, CUDA_VISIBLE_DEVICES,
and the limits a worker applies to itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet.errors import MpsUnavailable
from gpufleet.gpu.allocation import GpuRequest
from gpufleet.gpu.discovery import HostInfo, discover
from gpufleet.worker.limits import WorkerLimits
from gpufleet.worker.placement import plan_workers, visible
from gpufleet.worker.supervisor import Deployment
from tests.gpu.test_allocation import gpu, host
from tests.gpu.test_mps import stand_in  # noqa: F401  (a fixture)

H100 = Path(__file__).parents[1] / "gpu" / "fixtures" / "h100.nvml.json"


def _dep(name: str) -> Deployment:
    return Deployment(f"builtin:{name}", name, "1")


@pytest.mark.usefixtures("stand_in")
def test_mps_workers_get_the_daemon_pipe_and_their_limits(tmp_path: Path) -> None:
    h = host(gpu(0), gpu(1))
    req = GpuRequest("s", "1", "mps", memory_gb=6, compute_percent=30, replicas=3)
    plan = plan_workers(h, [(_dep("s"), req)], run_dir=tmp_path, policy="spread")
    envs = [dict(slot.env) for _, slot, _ in plan.workers]
    assert [slot.visible_gpu for _, slot, _ in plan.workers] == [
        "GPU-00000000-0000", "GPU-00000001-0000", "GPU-00000000-0000",
    ]  # fmt: skip
    assert envs[1]["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "mps" / "gpu1" / "pipe")
    assert envs[1]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    assert envs[1]["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=6144M"
    assert WorkerLimits.from_env(envs[1]) == WorkerLimits("mps", 6144, 30, tuple(range(8)))
    assert plan.mps_gpus == {"GPU-00000000-0000": 0, "GPU-00000001-0000": 1}
    # Every worker has its own slot: a standby started for one carries that one's limits.
    assert len(plan.slots) == 3
    assert [name for _, _, name in plan.workers] == ["s@1/gpu0.0", "s@1/gpu1.0", "s@1/gpu0.1"]


def test_fraction_workers_carry_a_memory_cap_and_no_mps(tmp_path: Path) -> None:
    req = GpuRequest("f", "1", "fraction", memory_gb=2, compute_percent=50)
    plan = plan_workers(host(gpu(0)), [(_dep("f"), req)], run_dir=tmp_path, workers_per_gpu=2)
    envs = [dict(slot.env) for _, slot, _ in plan.workers]
    assert all(e["GPUFLEET_GPU_MEMORY_LIMIT_MIB"] == "2048" for e in envs)
    assert not any(k.startswith("CUDA_MPS") for e in envs for k in e)
    assert plan.mps_gpus == {}


def test_whole_gpu_workers_share_one_slot_and_cpu_models_get_cpu(tmp_path: Path) -> None:
    models = [
        (_dep("w"), GpuRequest("w", "1", "whole", count=2)),
        (_dep("c"), GpuRequest("c", "1", "none")),
    ]
    plan = plan_workers(host(gpu(0), gpu(1)), models, run_dir=tmp_path, workers_per_gpu=2)
    slots = {name: slot for _, slot, name in plan.workers}
    assert slots["w@1/gpu0+1.0"] == slots["w@1/gpu0+1.1"]
    assert slots["w@1/gpu0+1.0"].visible_gpu == "GPU-00000000-0000,GPU-00000001-0000"
    assert slots["c@1/cpu0.0"].device == "cpu" and slots["c@1/cpu0.0"].visible_gpu is None


def test_cuda_visible_devices_restricts_serve_to_those_gpus() -> None:
    h = host(gpu(0), gpu(1), gpu(2))
    assert [g.index for g in visible(h, {"CUDA_VISIBLE_DEVICES": "2,0"}).gpus] == [2, 0]
    assert [g.index for g in visible(h, {"CUDA_VISIBLE_DEVICES": "GPU-00000001"}).gpus] == [1]
    assert [g.index for g in visible(h, {"CUDA_VISIBLE_DEVICES": "1,-1,2"}).gpus] == [1]
    hidden = visible(h, {"CUDA_VISIBLE_DEVICES": ""})
    assert hidden.gpus == [] and "hides every GPU" in (hidden.error or "")
    assert visible(h, {}).gpus == h.gpus


def test_a_worker_pins_itself_to_its_gpus_cpus() -> None:
    """In a real process: the affinity the allocator chose is the one the worker runs with."""
    code = (
        "import os; from gpufleet.worker.limits import WorkerLimits;"
        "WorkerLimits.from_env().apply('cpu'); print(sorted(os.sched_getaffinity(0)))"
    )
    env = {**os.environ, **WorkerLimits("whole", cpus=(0,)).to_env()}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [0]
    # CPUs this process may not use are ignored, with a warning, not an error.
    env = {**os.environ, **WorkerLimits("whole", cpus=(4095,)).to_env()}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "outside this process's CPUs" in out.stderr
    assert json.loads(out.stdout) == sorted(os.sched_getaffinity(0))


def test_the_recorded_h100_plans_two_fraction_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUFLEET_NVML_RECORDING", str(H100))
    h: HostInfo = discover()
    req = GpuRequest("f", "1", "fraction", memory_gb=30, compute_percent=50)
    plan = plan_workers(h, [(_dep("f"), req)], run_dir=tmp_path, workers_per_gpu=2)
    assert len(plan.workers) == 2
    assert {s.visible_gpu for _, s, _ in plan.workers} == {h.gpus[0].uuid}


def test_mps_without_the_daemon_binary_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    req = GpuRequest("s", "1", "mps", memory_gb=6, compute_percent=30)
    with pytest.raises(MpsUnavailable, match="mode mps needs nvidia-cuda-mps-control"):
        plan_workers(host(gpu(0)), [(_dep("s"), req)], run_dir=tmp_path)
