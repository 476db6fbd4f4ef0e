"""NVML discovery replayed from recordings: the lent H100's, synthetic multi-GPU hosts from
``fake_hosts``, and broken stacks, which give a reason in ``HostInfo.error``, never a
traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpufleet.gpu.discovery import GpuProcess, HostInfo, discover
from gpufleet.gpu.nvml import RECORDING_ENV
from tests.gpu.fake_hosts import PHB, PIX, PXB, gpu, recording, write_recording

H100 = Path(__file__).parent / "fixtures" / "h100.nvml.json"
# Four H100s, two per NUMA node: 0-1 and 2-3 joined by 12 NVLinks, 0-2 and 1-3 by 6.
FOUR_GPUS = [gpu(numa_node=0), gpu(numa_node=0), gpu(numa_node=1), gpu(numa_node=1)]
FOUR_LINKS = [(0, 1, 12), (2, 3, 12), (0, 2, 6), (1, 3, 6)]


def replay(monkeypatch: pytest.MonkeyPatch, path: Path) -> HostInfo:
    monkeypatch.setenv(RECORDING_ENV, str(path))
    return discover()


def save(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "host.nvml.json"
    path.write_text(json.dumps(data))
    return path


def test_the_lent_h100(monkeypatch: pytest.MonkeyPatch) -> None:
    host = replay(monkeypatch, H100)
    assert host.error is None and host.source == str(H100)
    assert (host.driver_version, host.driver_cuda) == ("580.159.04", (13, 0))
    assert host.nvml_version == "13.580.159.04"
    [g] = host.gpus
    assert (g.index, g.name, g.uuid) == (
        0,
        "NVIDIA H100 80GB HBM3",
        "GPU-af91ef83-f5c3-a266-d2cc-70f469a8ed11",
    )
    assert (g.pci_bus_id, g.memory_total_mib, g.memory_used_mib) == (
        "00000000:00:06.0",
        81559,
        2258,
    )
    assert (g.capability, g.family, g.mig_mode, g.compute_mode) == (
        (9, 0),
        "hopper",
        False,
        "default",
    )
    assert g.numa_node is None  # the VM's NVML does not know it
    assert g.cpu_affinity == list(range(16))
    assert (g.utilization_gpu, g.utilization_memory) == (100, 5)
    assert g.processes == [GpuProcess(pid=562, used_memory_mib=1770, sm_util=89)]
    assert g.nvlinks == {} and host.topology == {}


def test_to_dict_and_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for path in (H100, write_recording(tmp_path / "four.json", FOUR_GPUS, FOUR_LINKS)):
        host = replay(monkeypatch, path)
        data = json.loads(json.dumps(host.to_dict()))
        assert HostInfo.from_dict(data) == host


def test_four_gpus_with_nvlink_give_the_topology_matrix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    host = replay(monkeypatch, write_recording(tmp_path / "four.json", FOUR_GPUS, FOUR_LINKS))
    assert host.error is None and len(host.gpus) == 4
    assert host.topology == {
        "0-1": "NV12", "0-2": "NV6", "0-3": "SYS", "1-2": "SYS", "1-3": "NV6", "2-3": "NV12",
    }  # fmt: skip
    assert host.link(3, 2) == "NV12" and host.link(2, 1) == "SYS"
    assert [g.nvlinks for g in host.gpus] == [
        {1: 12, 2: 6}, {0: 12, 3: 6}, {3: 12, 0: 6}, {2: 12, 1: 6},
    ]  # fmt: skip
    assert [g.numa_node for g in host.gpus] == [0, 0, 1, 1]
    assert [g.cpu_affinity for g in host.gpus][1:3] == [list(range(16)), list(range(16, 32))]


def test_pcie_levels_without_nvlink(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    l40s = {"name": "NVIDIA L40S", "memory_total_mib": 46068, "capability": (8, 9), "mig": None}
    gpus = [gpu(**l40s), gpu(**l40s), gpu(**l40s), gpu(**l40s, numa_node=1)]
    path = write_recording(
        tmp_path / "pcie.json", gpus, ancestors={(0, 1): PIX, (0, 2): PXB, (1, 2): PHB}
    )
    host = replay(monkeypatch, path)
    assert host.topology == {
        "0-1": "PIX", "0-2": "PXB", "1-2": "PHB", "0-3": "SYS", "1-3": "SYS", "2-3": "SYS",
    }  # fmt: skip
    assert all(g.mig_mode is None and g.family == "ada-lovelace" for g in host.gpus)


def test_memory_nvml_cannot_attribute_is_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = recording([gpu(processes=[(4321, 1024, 10)])])
    # inside a container NVML reports a process's memory as "not available": ULLONG_MAX
    data["calls"]["nvmlDeviceGetComputeRunningProcesses(dev0)"]["result"][0]["usedGpuMemory"] = (
        2**64 - 1
    )
    [g] = replay(monkeypatch, save(tmp_path, data)).gpus
    assert g.processes == [GpuProcess(pid=4321, used_memory_mib=None, sm_util=10)]


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (9, "the NVIDIA kernel driver is not loaded"),
        (12, "no NVIDIA driver: the NVML library (libnvidia-ml.so.1) is not installed"),
        (18, "differ in version"),
        (4, "no permission to open the NVIDIA devices"),
    ],
)
def test_nvml_that_does_not_start_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, code: int, words: str
) -> None:
    data = recording([gpu()])
    data["calls"] = {"nvmlInit()": {"error": code}}
    host = replay(monkeypatch, save(tmp_path, data))
    assert host.gpus == [] and host.source == "none"
    assert host.error is not None and words in host.error


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("not json {", "cannot read the NVML recording"),
        ('{"some": "json"}', "is not a gpufleet NVML recording"),
        ('{"format": "gpufleet-nvml-recording/1"}', "is not a gpufleet NVML recording"),
        ("[1, 2]", "is not a gpufleet NVML recording"),
    ],
)
def test_a_file_that_is_no_recording_is_an_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str, words: str
) -> None:
    path = tmp_path / "broken.json"
    path.write_text(content)
    host = replay(monkeypatch, path)
    assert host.gpus == [] and host.error is not None
    assert words in host.error and str(path) in host.error


def test_a_missing_recording_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    host = replay(monkeypatch, tmp_path / "nowhere.json")
    assert host.gpus == [] and host.error is not None and "cannot read" in host.error


def test_a_lost_gpu_is_an_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = recording([gpu(), gpu()])
    data["calls"]["nvmlDeviceGetHandleByIndex(1)"] = {"error": 15}  # NVML_ERROR_GPU_IS_LOST
    host = replay(monkeypatch, save(tmp_path, data))
    assert host.gpus == [] and host.driver_version == "580.159.04"
    assert host.error == "NVML cannot open GPU 1: GPU is lost"


def test_no_gpu_under_a_working_driver_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    host = replay(monkeypatch, write_recording(tmp_path / "none.json", []))
    assert host.gpus == [] and host.error == "NVML sees no GPUs"


def test_a_gpu_that_answers_little_still_is_listed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = recording([gpu()])
    for key in list(data["calls"]):
        if key.startswith(
            ("nvmlDeviceGetUtilization", "nvmlDeviceGetCpuAffinity", "nvmlDeviceGetMig")
        ):
            del data["calls"][key]  # not supported
    [g] = replay(monkeypatch, save(tmp_path, data)).gpus
    assert (g.utilization_gpu, g.cpu_affinity, g.mig_mode) == (None, [], None)


def test_fake_hosts_refuse_more_links_than_an_h100_has() -> None:
    with pytest.raises(ValueError, match="19 NVLinks"):
        recording([gpu(), gpu()], [(0, 1, 19)])
    with pytest.raises(TypeError, match="unknown GPU fields"):
        gpu(memory_gb=80)


def test_gpus_behind_nvswitches_are_joined_by_nvlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an HGX board every link ends at a switch, not a GPU: the pairs come from NVML's
    NVLink P2P status, at the links' width, as nvidia-smi topo -m shows them (NV18)."""
    gpus = [gpu(numa_node=0 if i < 4 else 1) for i in range(8)]
    path = write_recording(tmp_path / "hgx.json", gpus, nvswitch=True)
    monkeypatch.setenv("GPUFLEET_NVML_RECORDING", str(path))
    host = discover()
    assert host.link(0, 7) == "NV18" and host.link(3, 4) == "NV18"
    assert all(g.nvlinks == {j: 18 for j in range(8) if j != g.index} for g in host.gpus)
