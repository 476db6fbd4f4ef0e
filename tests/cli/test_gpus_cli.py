"""``gpufleet gpus`` and ``gpufleet node-labels`` on replayed NVML recordings (the lent H100,
synthetic hosts) and on this machine, which has no NVIDIA driver."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from gpufleet.cli.main import app
from gpufleet.gpu.discovery import HostInfo, discover
from gpufleet.gpu.nvml import RECORDING_ENV
from tests.gpu.fake_hosts import gpu, recording, write_recording
from tests.gpu.test_labels import H100_LABELS

H100 = Path(__file__).parents[1] / "gpu" / "fixtures" / "h100.nvml.json"
WRITTEN_AT = "2026-11-23T17:00:00+00:00"
runner = CliRunner()


def nvml_here() -> bool:
    """Whether this machine has a GPU NVML sees (not a replay)."""
    saved = os.environ.pop(RECORDING_ENV, None)
    try:
        return bool(discover().gpus)
    finally:
        if saved is not None:
            os.environ[RECORDING_ENV] = saved


no_driver = pytest.mark.skipif(nvml_here(), reason="this machine has a GPU")


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv(RECORDING_ENV, raising=False)
    monkeypatch.delenv("NODE_NAME", raising=False)
    base = {"GPUFLEET_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200", "NO_COLOR": "1"}

    def invoke(*args: str, recording: Path | None = None, **env: str) -> Result:
        extra = {RECORDING_ENV: str(recording)} if recording else {}
        return runner.invoke(app, list(args), env=base | extra | env)

    return invoke


@pytest.fixture
def four_gpus(tmp_path: Path) -> Path:
    gpus = [gpu(numa_node=0), gpu(numa_node=0), gpu(numa_node=1), gpu(numa_node=1)]
    return write_recording(
        tmp_path / "four.nvml.json", gpus, [(0, 1, 12), (2, 3, 12), (0, 2, 6), (1, 3, 6)]
    )


def test_the_replayed_h100(cli: Any) -> None:
    out = cli("gpus", recording=H100)
    assert out.exit_code == 0, out.output
    assert out.output.startswith(f"driver 580.159.04, CUDA (driver) 13.0, replayed from {H100}")
    row = next(line for line in out.output.splitlines() if "NVIDIA H100 80GB HBM3" in line)
    for cell in ("2.2 / 79.6 GiB", "9.0 hopper", "off", "default", "0-15", "100% (5%)"):
        assert cell in row
    process = next(line for line in out.output.splitlines() if " 562 " in line)
    assert "1770 MiB" in process and "89%" in process
    assert "GPU0" not in out.output  # one GPU: no topology matrix


def test_json_round_trips(cli: Any) -> None:
    out = cli("gpus", "--json", recording=H100)
    assert out.exit_code == 0
    data = json.loads(out.stdout)
    assert "allocations" not in data
    assert HostInfo.from_dict(data) == HostInfo.from_dict(HostInfo.from_dict(data).to_dict())
    host = HostInfo.from_dict(data)
    assert host.gpus[0].capability == (9, 0) and host.gpus[0].processes[0].pid == 562


def test_four_gpus_print_the_topology_matrix(cli: Any, four_gpus: Path) -> None:
    out = cli("gpus", recording=four_gpus)
    assert out.exit_code == 0, out.output
    rows = {
        cells[0]: cells[1:]
        for line in out.output.splitlines()
        if (cells := line.replace("│", " ").split())
        and cells[0].startswith("GPU")
        and len(cells) > 5
    }
    assert rows == {
        "GPU0": ["X", "NV12", "NV6", "SYS", "0-15", "0"],
        "GPU1": ["NV12", "X", "SYS", "NV6", "0-15", "0"],
        "GPU2": ["NV6", "SYS", "X", "NV12", "16-31", "1"],
        "GPU3": ["SYS", "NV6", "NV12", "X", "16-31", "1"],
    }
    assert "NV# = # NVLinks" in out.output and "no processes on the GPUs" in out.output


def test_no_driver_is_one_line_and_not_an_error(cli: Any, tmp_path: Path) -> None:
    broken = tmp_path / "no-driver.json"
    broken.write_text(json.dumps(recording([]) | {"calls": {"nvmlInit()": {"error": 9}}}))
    out = cli("gpus", recording=broken)
    assert out.exit_code == 0
    assert out.output.startswith("no GPU: the NVIDIA kernel driver is not loaded")
    assert out.output.rstrip().endswith("; gpufleet serve runs workers on CPU slots")
    as_json = json.loads(cli("gpus", "--json", recording=broken).stdout)
    assert as_json["gpus"] == [] and "kernel driver is not loaded" in as_json["error"]


@no_driver
def test_this_machine_without_nvml(cli: Any) -> None:
    out = cli("gpus")
    assert out.exit_code == 0 and out.output.count("\n") == 1
    assert out.output.startswith("no GPU: ") and "CPU slots" in out.output
    data = json.loads(cli("gpus", "--json").stdout)
    assert data["gpus"] == [] and data["error"] and data["source"] == "none"


@no_driver
def test_record_without_nvml_is_one_line_and_exit_1(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "rec.json"
    out = cli("gpus", "--record", str(path))
    assert out.exit_code == 1
    assert out.stdout == "" and out.stderr.count("\n") == 1
    assert out.stderr.startswith("cannot record: ") and str(path) in out.stderr
    # what it wrote replays as the same failure: a bug report of a broken host
    replayed = cli("gpus", recording=path)
    assert replayed.exit_code == 0 and replayed.output.startswith("no GPU: ")


# --- --allocations ---------------------------------------------------------------------------


def allocations(serve_pid: int, placements: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "serve_pid": serve_pid,
        "written_at": WRITTEN_AT,
        "host": "node-7",
        "policy": "binpack",
        "gpus": [
            {
                "index": i,
                "uuid": f"GPU-{i}",
                "name": "NVIDIA H100 80GB HBM3",
                "memory_total_mib": 81559,
                "mode": mode,
            }
            for i, mode in enumerate(["fraction", "whole", None, None])
        ],
        "placements": placements,
    }


PLACEMENTS: list[dict[str, Any]] = [
    {"worker": "digits@1/gpu0.0", "model": "digits", "version": "1", "mode": "fraction",
     "gpus": [0], "memory_mib": 4096, "compute_percent": 50, "cpus": [0, 1, 2, 3]},
    {"worker": "digits@1/gpu0.1", "model": "digits", "version": "1", "mode": "fraction",
     "gpus": [0], "memory_mib": 4096, "compute_percent": 25, "cpus": [4, 5, 6, 7]},
    {"worker": "llm@2/gpu1.0", "model": "llm", "version": "2", "mode": "whole",
     "gpus": [1], "memory_mib": None, "compute_percent": None, "cpus": list(range(8, 16))},
    {"worker": "echo@1/cpu0.0", "model": "echo", "version": "1", "mode": "none",
     "gpus": [], "memory_mib": None, "compute_percent": None, "cpus": [16, 17]},
]  # fmt: skip


def write_allocations(data_dir: Path, data: dict[str, Any]) -> Path:
    path = data_dir / "run" / "allocations.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def workers() -> Iterator[list[int]]:
    """Two live children of this process (it plays gpufleet serve): the first names its
    worker on its command line, the second does not."""
    code = "import time; time.sleep(60)"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, "--worker-id", f"vm/digits@1/gpu0.1/{os.getpid()}"]
        ),
        subprocess.Popen([sys.executable, "-c", code]),
    ]
    yield [p.pid for p in procs]
    for p in procs:
        p.kill()
        p.wait()


def test_no_allocations_file(cli: Any, tmp_path: Path) -> None:
    out = cli("gpus", "--allocations", recording=H100)
    path = tmp_path / "data" / "run" / "allocations.json"
    assert out.exit_code == 0
    assert out.output.rstrip().endswith(
        f"no allocations: gpufleet serve is not running under this data dir ({path})"
    )
    assert (
        json.loads(cli("gpus", "--json", "--allocations", recording=H100).stdout)["allocations"]
        is None
    )


def test_live_allocations_match_serves_processes(
    cli: Any, tmp_path: Path, workers: list[int]
) -> None:
    named, unnamed = workers
    gpus = [
        gpu(processes=[(unnamed, 3000, 40), (named, 2000, 20), (4_194_000, 1024, 5)]),
        gpu(processes=[(4_194_001, 70_000, 90)]),
        gpu(),
        gpu(),
    ]
    host = write_recording(tmp_path / "host.json", gpus)
    write_allocations(tmp_path / "data", allocations(os.getpid(), PLACEMENTS))
    out = cli("gpus", "--allocations", recording=host)
    assert out.exit_code == 0, out.output
    text = out.output
    assert f"gpufleet serve pid {os.getpid()}, policy binpack, since {WRITTEN_AT}" in text
    lines: list[str] = text.splitlines()

    def row(worker: str) -> str:
        return next(line for line in lines if worker in line)

    # the named worker by its command line; the other one, the only one left, by elimination
    assert f" {named} " in row("digits@1/gpu0.1") and "2000 MiB" in row("digits@1/gpu0.1")
    assert f" {unnamed} " in row("digits@1/gpu0.0") and "3000 MiB" in row("digits@1/gpu0.0")
    assert "4096 MiB" in row("digits@1/gpu0.0") and "50%" in row("digits@1/gpu0.0")
    assert "held 8.0 / 79.6 GiB memory, 75% / 100% compute" in text
    assert "also on GPU 0, not serve's: pid 4194000" in text
    # a whole GPU holds all of it; its process is not serve's
    assert "whole GPU" in row("llm@2/gpu1.0") and "held 79.6 / 79.6 GiB memory, 100%" in text
    assert "also on GPU 1, not serve's: pid 4194001" in text
    assert "GPU 2 NVIDIA H100 80GB HBM3 (free): nothing placed" in text
    assert "CPU slots" in text and "16-17" in row("echo@1/cpu0.0")

    data = json.loads(cli("gpus", "--json", "--allocations", recording=host).stdout)
    held = data["allocations"]
    assert held["stale"] is False and held["placements"] == PLACEMENTS
    assert held["live"] == {
        "digits@1/gpu0.0": {"gpu": 0, "pid": unnamed, "used_memory_mib": 3000},
        "digits@1/gpu0.1": {"gpu": 0, "pid": named, "used_memory_mib": 2000},
    }


def test_stale_allocations_say_when(cli: Any, tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_allocations(tmp_path / "data", allocations(gone.pid, PLACEMENTS))
    out = cli("gpus", "--allocations", recording=H100)
    assert out.exit_code == 0, out.output
    assert (
        f"stale allocations: gpufleet serve (pid {gone.pid}) is not running; they were written "
        f"at {WRITTEN_AT} on node-7"
    ) in out.output
    assert "digits@1/gpu0.0" in out.output  # still shown: what it held when it stopped
    assert "also on GPU 0, not serve's: pid 562" in out.output
    data = json.loads(cli("gpus", "--json", "--allocations", recording=H100).stdout)
    assert data["allocations"]["stale"] is True and data["allocations"]["live"] == {}


@pytest.mark.parametrize("content", ["{half", "[]", '{"gpus": [1]}', '{"placements": [{}]}'])
def test_a_broken_allocations_file_is_one_line(cli: Any, tmp_path: Path, content: str) -> None:
    path = tmp_path / "data" / "run" / "allocations.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    out = cli("gpus", "--allocations", recording=H100)
    assert out.exit_code == 1 and out.stderr.startswith(f"cannot read the allocations file {path}")
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.output


# --- node-labels -----------------------------------------------------------------------------


def test_node_labels_json_is_the_default(cli: Any) -> None:
    out = cli("node-labels", recording=H100)
    assert out.exit_code == 0 and json.loads(out.stdout) == H100_LABELS


def test_node_labels_formats(cli: Any) -> None:
    import yaml

    out = cli("node-labels", "--format", "yaml", "--runtime-cuda", "12.8", recording=H100)
    assert yaml.safe_load(out.stdout)["gpufleet.dev/runtime-cuda-minor-version"] == "8"
    out = cli("node-labels", "--format", "kubectl", "--node", "gpu-1", recording=H100)
    words = shlex.split(out.stdout)
    assert words[:4] == ["kubectl", "label", "node", "gpu-1"] and words[-1] == "--overwrite"
    assert "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3" in words
    from_env = cli("node-labels", "--format", "kubectl", recording=H100, NODE_NAME="k8s-node-3")
    assert shlex.split(from_env.stdout)[3] == "k8s-node-3"


def test_node_labels_without_gpu(cli: Any, tmp_path: Path) -> None:
    broken = tmp_path / "no-driver.json"
    broken.write_text(json.dumps(recording([]) | {"calls": {"nvmlInit()": {"error": 9}}}))
    out = cli("node-labels", recording=broken)
    assert out.exit_code == 0 and json.loads(out.stdout) == {}
    assert out.stderr.startswith("no GPU: the NVIDIA kernel driver is not loaded")
    kubectl = cli("node-labels", "--format", "kubectl", "--node", "n1", recording=broken)
    assert kubectl.exit_code == 0
    assert shlex.split(kubectl.stdout)[4] == "gpufleet.dev/cuda-major-version-"


def test_node_labels_refuse_a_bad_runtime_version(cli: Any) -> None:
    out = cli("node-labels", "--runtime-cuda", "twelve", recording=H100)
    assert out.exit_code == 1
    assert out.stderr.strip() == "--runtime-cuda must be a CUDA version such as 12.8, got 'twelve'"
