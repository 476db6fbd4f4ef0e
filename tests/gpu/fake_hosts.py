"""Synthetic NVML recordings of hosts we cannot borrow: N GPUs, NVLinks between given pairs,
NUMA nodes, PCIe levels and processes, in the format ``gpufleet.gpu.nvml`` replays and with
the same call keys as the real H100 recording (``fixtures/h100.nvml.json``).

    write_recording(tmp_path / "host.json", [gpu(numa_node=0), gpu(numa_node=1)], [(0, 1, 18)])
    monkeypatch.setenv("GPUFLEET_NVML_RECORDING", str(path))

Defaults are the lent machine's: H100 80GB HBM3, compute capability 9.0, driver 580.159.04,
CUDA 13.0.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gpufleet.gpu.nvml import FORMAT

MIB = 1024 * 1024
NOT_SUPPORTED = {"error": 3}  # NVML_ERROR_NOT_SUPPORTED
NOT_FOUND = {"error": 6}  # NVML_ERROR_NOT_FOUND: e.g. no process samples yet
INVALID_ARGUMENT = {"error": 2}
NVLINK_SLOTS = 18  # links per H100 SXM; asking for link 18 is an invalid argument
# PCI buses of the eight GPUs in a DGX H100, in index order
BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)
# nvmlDeviceGetTopologyCommonAncestor's levels
PIX, PXB, PHB, NODE, SYS = 10, 20, 30, 40, 50

H100: dict[str, Any] = {
    "name": "NVIDIA H100 80GB HBM3",
    "memory_total_mib": 81559,
    "memory_used_mib": 535,  # what an idle H100 reports: reserved by the driver
    "capability": (9, 0),
    "mig": False,  # None: the GPU has no MIG (NVML says not supported)
    "compute_mode": 0,
    "numa_node": 0,  # None: NVML says not supported (as on the lent VM)
    "cpus": None,  # None: the NUMA node's CPUs, 16 per node
    "utilization": (0, 0),  # gpu %, memory %
    "processes": (),  # (pid, used MiB, SM %)
}


def gpu(**overrides: Any) -> dict[str, Any]:
    """One GPU's description: the H100 defaults with ``overrides`` (keys of ``H100``, plus
    ``uuid`` and ``bus`` to set those)."""
    unknown = set(overrides) - set(H100) - {"uuid", "bus"}
    if unknown:
        raise TypeError(f"unknown GPU fields {sorted(unknown)}; known: {sorted(H100)}")
    return {**H100, **overrides}


def recording(
    gpus: list[dict[str, Any]],
    nvlinks: Iterable[tuple[int, int, int]] = (),
    *,
    ancestors: Mapping[tuple[int, int], int] | None = None,
    driver: str = "580.159.04",
    cuda: int = 13000,
    note: str = "synthetic host (tests/gpu/fake_hosts.py)",
    nvswitch: bool = False,
) -> dict[str, Any]:
    """A recording of a host with ``gpus`` (dicts from ``gpu()``).

    ``nvlinks``: ``(a, b, links)``: GPUs ``a`` and ``b`` joined by ``links`` NVLinks.
    ``ancestors``: ``{(a, b): PIX | PXB | PHB | NODE | SYS}`` for pairs without NVLink; by
    default GPUs on one NUMA node meet at ``NODE`` and others at ``SYS``.
    ``cuda``: as NVML says it, 1000 * major + 10 * minor.
    ``nvswitch``: every GPU's 18 links end at NVSwitches (an HGX board): their remote PCI
    ids are the switches', and NVLink P2P works between every pair."""
    gpus = [gpu(**g) for g in gpus]
    calls: dict[str, dict[str, Any]] = {
        "nvmlInit()": {"result": None},
        "nvmlShutdown()": {"result": None},
        "nvmlDeviceGetCount()": {"result": len(gpus)},
        "nvmlSystemGetDriverVersion()": {"result": driver},
        "nvmlSystemGetCudaDriverVersion_v2()": {"result": cuda},
        "nvmlSystemGetNVMLVersion()": {"result": f"{cuda // 1000}.{driver}"},
    }
    for i, g in enumerate(gpus):
        calls |= _device_calls(i, g)
    calls |= _switch_calls(len(gpus)) if nvswitch else _nvlink_calls(gpus, list(nvlinks))
    for a in range(len(gpus)):
        for b in range(len(gpus)):
            if a != b:
                level = (ancestors or {}).get((min(a, b), max(a, b)))
                if level is None:
                    level = NODE if gpus[a]["numa_node"] == gpus[b]["numa_node"] else SYS
                calls[f"nvmlDeviceGetTopologyCommonAncestor(dev{a}, dev{b})"] = {"result": level}
    return {"format": FORMAT, "note": note, "calls": calls}


def write_recording(
    path: Path,
    gpus: list[dict[str, Any]],
    nvlinks: Iterable[tuple[int, int, int]] = (),
    **options: Any,
) -> Path:
    """``recording(gpus, nvlinks, **options)`` saved to ``path``; returns ``path``."""
    path.write_text(json.dumps(recording(gpus, nvlinks, **options), indent=1) + "\n")
    return path


def bus_id(index: int, g: Mapping[str, Any] | None = None) -> str:
    bus = (g or {}).get("bus", BUSES[index] if index < len(BUSES) else 0x100 + index)
    return f"00000000:{bus:02X}:00.0"


def _device_calls(i: int, g: dict[str, Any]) -> dict[str, dict[str, Any]]:
    dev = f"dev{i}"
    total, used = g["memory_total_mib"] * MIB, g["memory_used_mib"] * MIB
    cpus = g["cpus"] if g["cpus"] is not None else _numa_cpus(g["numa_node"])
    words = [0] * 16
    for c in cpus:
        words[c // 64] |= 1 << (c % 64)
    bus = bus_id(i, g)
    processes = [
        {"pid": pid, "usedGpuMemory": mib * MIB, "gpuInstanceId": 2**32 - 1,
         "computeInstanceId": 2**32 - 1}
        for pid, mib, _sm in g["processes"]
    ]  # fmt: skip
    samples = [
        {"pid": pid, "smUtil": sm, "memUtil": 0, "encUtil": 0, "decUtil": 0, "timeStamp": 0}
        for pid, _mib, sm in g["processes"]
    ]
    gpu_util, mem_util = g["utilization"]
    return {
        f"nvmlDeviceGetHandleByIndex({i})": {"handle": dev},
        f"nvmlDeviceGetName({dev})": {"result": g["name"]},
        f"nvmlDeviceGetUUID({dev})": {"result": g.get("uuid", f"GPU-{i:08x}-0000-4000-8000-fake")},
        f"nvmlDeviceGetMemoryInfo({dev})": {
            "result": {"total": total, "used": used, "free": total - used}
        },
        f"nvmlDeviceGetPciInfo_v3({dev})": {
            "result": {
                "busId": bus,
                "busIdLegacy": bus[4:],
                "domain": 0,
                "bus": int(bus.split(":")[1], 16),
                "device": 0,
                "pciDeviceId": 0x233010DE,
                "pciSubSystemId": 0x16C110DE,
            }
        },
        f"nvmlDeviceGetCudaComputeCapability({dev})": {"result": list(g["capability"])},
        f"nvmlDeviceGetMigMode({dev})": (
            NOT_SUPPORTED if g["mig"] is None else {"result": [int(g["mig"]), int(g["mig"])]}
        ),
        f"nvmlDeviceGetComputeMode({dev})": {"result": g["compute_mode"]},
        f"nvmlDeviceGetUtilizationRates({dev})": {"result": {"gpu": gpu_util, "memory": mem_util}},
        f"nvmlDeviceGetCpuAffinity({dev}, 16)": {"result": words},
        f"nvmlDeviceGetNumaNodeId({dev})": (
            NOT_SUPPORTED if g["numa_node"] is None else {"result": g["numa_node"]}
        ),
        f"nvmlDeviceGetComputeRunningProcesses({dev})": {"result": processes},
        f"nvmlDeviceGetProcessUtilization({dev}, 0)": {"result": samples} if samples else NOT_FOUND,
    }


def _numa_cpus(node: int | None) -> list[int]:
    return list(range(16)) if node is None else list(range(16 * node, 16 * node + 16))


def _switch_calls(n: int) -> dict[str, dict[str, Any]]:
    calls: dict[str, dict[str, Any]] = {}
    for i in range(n):
        for link in range(NVLINK_SLOTS):
            calls[f"nvmlDeviceGetNvLinkState(dev{i}, {link})"] = {"result": 1}
            switch = 0xC0 + link % 4  # four NVSwitches, as on an HGX H100 board
            calls[f"nvmlDeviceGetNvLinkRemotePciInfo(dev{i}, {link})"] = {
                "result": {"busId": f"00000000:{switch:02X}:00.0", "domain": 0}
            }
        calls[f"nvmlDeviceGetNvLinkState(dev{i}, {NVLINK_SLOTS})"] = INVALID_ARGUMENT
        for j in range(n):
            if j != i:  # NVML_P2P_CAPS_INDEX_NVLINK = 2; NVML_P2P_STATUS_OK = 0
                calls[f"nvmlDeviceGetP2PStatus(dev{i}, dev{j}, 2)"] = {"result": 0}
    return calls


def _nvlink_calls(
    gpus: list[dict[str, Any]], nvlinks: list[tuple[int, int, int]]
) -> dict[str, dict[str, Any]]:
    """Each GPU's links in order: its peers' links first, then inactive ones up to 18; a GPU
    without NVLink answers "not supported" for link 0, as the PCIe H100 does."""
    peers: dict[int, list[int]] = {i: [] for i in range(len(gpus))}
    for a, b, links in nvlinks:
        peers[a] += [b] * links
        peers[b] += [a] * links
    calls: dict[str, dict[str, Any]] = {}
    for i, remote in peers.items():
        if not remote:
            calls[f"nvmlDeviceGetNvLinkState(dev{i}, 0)"] = NOT_SUPPORTED
            continue
        if len(remote) > NVLINK_SLOTS:
            raise ValueError(f"GPU {i} has {len(remote)} NVLinks; an H100 has {NVLINK_SLOTS}")
        for link in range(NVLINK_SLOTS):
            active = link < len(remote)
            calls[f"nvmlDeviceGetNvLinkState(dev{i}, {link})"] = {"result": int(active)}
            if active:
                peer = remote[link]
                calls[f"nvmlDeviceGetNvLinkRemotePciInfo(dev{i}, {link})"] = {
                    "result": {"busId": bus_id(peer, gpus[peer]), "domain": 0}
                }
        calls[f"nvmlDeviceGetNvLinkState(dev{i}, {NVLINK_SLOTS})"] = INVALID_ARGUMENT
    return calls
