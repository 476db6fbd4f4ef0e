"""What GPUs this host has, from NVML: identity, memory, compute capability, MIG and compute
mode, NUMA node and CPU affinity, the topology between GPUs, the driver, and who uses them.

``discover()`` never raises for a missing or broken GPU stack: the ``HostInfo`` it returns has
no GPUs and says why in ``error``, and serving falls back to CPU slots. NVML creates no CUDA
context, so the serving process may ask it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from gpufleet.gpu.compat import Capability, DeviceFacts, fmt
from gpufleet.gpu.nvml import NvmlUnavailable, open_nvml, shutdown

MIB = 1024 * 1024

# nvidia-smi topo -m's words for the closest common ancestor of two GPUs, best first.
# NV<n> (n NVLinks between them) beats all of these.
TOPOLOGY_WORDS = {0: "X", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
COMPUTE_MODES = {0: "default", 1: "exclusive_thread", 2: "prohibited", 3: "exclusive_process"}


@dataclass
class GpuProcess:
    pid: int
    used_memory_mib: int | None
    sm_util: int | None = None  # percent, when NVML has a recent sample


@dataclass
class GpuInfo:
    index: int
    uuid: str
    name: str
    pci_bus_id: str
    memory_total_mib: int
    memory_used_mib: int
    capability: Capability
    mig_mode: bool | None  # None: the GPU has no MIG
    compute_mode: str
    numa_node: int | None
    cpu_affinity: list[int]
    utilization_gpu: int | None
    utilization_memory: int | None
    processes: list[GpuProcess] = field(default_factory=list)
    nvlinks: dict[int, int] = field(default_factory=dict)  # peer index -> active links

    @property
    def memory_total_gb(self) -> float:
        return self.memory_total_mib / 1024

    @property
    def family(self) -> str:
        return family(self.capability)


@dataclass
class HostInfo:
    gpus: list[GpuInfo]
    driver_version: str | None = None
    driver_cuda: Capability | None = None  # the newest CUDA the driver supports
    nvml_version: str | None = None
    error: str | None = None  # why there are no GPUs
    source: str = "nvml"  # or the recording replayed
    topology: dict[str, str] = field(default_factory=dict)  # "0-1" -> "NV18" | "PIX" | ...

    def link(self, a: int, b: int) -> str:
        """``NV<n>`` or the PCIe word of ``nvidia-smi topo -m`` between GPUs ``a`` and ``b``."""
        return self.topology.get(_pair(a, b), "SYS")

    def facts(self, gpu: GpuInfo, *, runtime_cuda: Capability | None, runtime: str) -> DeviceFacts:
        """The facts ``gpu.compat``'s rules take, for ``gpu`` under a given runtime."""
        return DeviceFacts(
            kind="cuda",
            name=f"GPU {gpu.index} {gpu.name}",
            capability=gpu.capability,
            driver_version=self.driver_version,
            driver_cuda=self.driver_cuda,
            runtime_cuda=runtime_cuda,
            runtime=runtime,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["driver_cuda"] = fmt(self.driver_cuda) if self.driver_cuda else None
        for gpu in data["gpus"]:
            gpu["capability"] = fmt(gpu["capability"])
            gpu["nvlinks"] = {str(k): v for k, v in gpu["nvlinks"].items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HostInfo:
        """The inverse of ``to_dict`` (``gpufleet gpus --json`` output, doctor fixtures)."""
        gpus = []
        for raw in data.get("gpus", []):
            g = dict(raw)
            g["capability"] = _capability(g["capability"])
            g["processes"] = [GpuProcess(**p) for p in g.get("processes", [])]
            g["nvlinks"] = {int(k): int(v) for k, v in g.get("nvlinks", {}).items()}
            gpus.append(GpuInfo(**g))
        driver_cuda = data.get("driver_cuda")
        return cls(
            gpus=gpus,
            driver_version=data.get("driver_version"),
            driver_cuda=_capability(driver_cuda) if driver_cuda else None,
            nvml_version=data.get("nvml_version"),
            error=data.get("error"),
            source=data.get("source", "file"),
            topology=dict(data.get("topology", {})),
        )


def _capability(value: Any) -> Capability:
    if isinstance(value, str):
        major, _, minor = value.partition(".")
        return int(major), int(minor or 0)
    return int(value[0]), int(value[1])


def _pair(a: int, b: int) -> str:
    return f"{min(a, b)}-{max(a, b)}"


def family(cc: Capability) -> str:
    """NVIDIA's architecture name for a compute capability."""
    names = {
        (6, 0): "pascal", (6, 1): "pascal", (7, 0): "volta", (7, 2): "volta",
        (7, 5): "turing", (8, 0): "ampere", (8, 6): "ampere", (8, 7): "ampere",
        (8, 9): "ada-lovelace", (9, 0): "hopper", (10, 0): "blackwell", (10, 3): "blackwell",
        (12, 0): "blackwell", (12, 1): "blackwell",
    }  # fmt: skip
    return names.get(cc, "undefined")


def discover() -> HostInfo:
    """This host's GPUs (or none, with the reason)."""
    try:
        nvml = open_nvml()
    except NvmlUnavailable as exc:
        return HostInfo(gpus=[], error=str(exc), source="none")
    try:
        return discover_with(nvml, source=getattr(nvml, "source", "nvml"))
    finally:
        shutdown(nvml)


def discover_with(nvml: Any, *, source: str) -> HostInfo:
    """Discovery over an initialised NVML (real, recording or replay)."""
    err = nvml.NVMLError

    def ask(fn: str, *args: Any) -> Any:
        try:
            return getattr(nvml, fn)(*args)
        except err:
            return None

    driver = ask("nvmlSystemGetDriverVersion")
    cuda = ask("nvmlSystemGetCudaDriverVersion_v2")
    count = ask("nvmlDeviceGetCount")
    if count is None:
        return HostInfo(gpus=[], error="NVML could not count the GPUs", source=source)
    driver_version = _text(driver) if driver else None
    if count == 0:
        return HostInfo(
            gpus=[], driver_version=driver_version, error="NVML sees no GPUs", source=source
        )
    handles = []
    for i in range(count):
        try:
            handles.append((i, nvml.nvmlDeviceGetHandleByIndex(i)))
        except err as exc:
            # A GPU off the bus (GPU_IS_LOST) or refused: the others' indices would no longer
            # be CUDA's, so report the host broken rather than serve on the wrong GPUs.
            return HostInfo(
                gpus=[],
                driver_version=driver_version,
                error=f"NVML cannot open GPU {i}: {exc}",
                source=source,
            )
    by_bus: dict[str, int] = {}
    gpus = []
    for index, handle in handles:
        gpu = _gpu(ask, index, handle)
        by_bus[_bus(gpu.pci_bus_id)] = index
        gpus.append(gpu)
    topology: dict[str, str] = {}
    switched: dict[int, int] = {}  # GPU -> its active links that end at no GPU
    for index, handle in handles:
        for link in range(nvml.NVML_NVLINK_MAX_LINKS):
            state = ask("nvmlDeviceGetNvLinkState", handle, link)
            if state is None:
                break  # no NVLink on this GPU, or no more links
            if not state:
                continue
            remote = ask("nvmlDeviceGetNvLinkRemotePciInfo", handle, link)
            peer = by_bus.get(_bus(_text(remote.busId))) if remote is not None else None
            if peer is not None and peer != index:
                gpus[index].nvlinks[peer] = gpus[index].nvlinks.get(peer, 0) + 1
            elif peer is None:
                switched[index] = switched.get(index, 0) + 1
    # Links that end at an NVSwitch (DGX / HGX boards) name the switch, not a GPU: two GPUs
    # on the switches reach each other over NVLink when NVML says NVLink P2P works, at the
    # width of their links (nvidia-smi shows NV18 between any two H100 SXMs of an HGX board).
    for a, ha in handles:
        for b, hb in handles[a + 1 :]:
            if a in switched and b in switched and b not in gpus[a].nvlinks:
                status = ask("nvmlDeviceGetP2PStatus", ha, hb, nvml.NVML_P2P_CAPS_INDEX_NVLINK)
                if status == nvml.NVML_P2P_STATUS_OK:
                    width = min(switched[a], switched[b])
                    gpus[a].nvlinks[b] = gpus[b].nvlinks[a] = width
    for a, ha in handles:
        for b, hb in handles[a + 1 :]:
            links = gpus[a].nvlinks.get(b, 0)
            if links:
                topology[_pair(a, b)] = f"NV{links}"
                continue
            level = ask("nvmlDeviceGetTopologyCommonAncestor", ha, hb)
            topology[_pair(a, b)] = TOPOLOGY_WORDS.get(level, "SYS") if level is not None else "SYS"
    return HostInfo(
        gpus=gpus,
        driver_version=driver_version,
        driver_cuda=(cuda // 1000, (cuda % 1000) // 10) if cuda else None,
        nvml_version=_text(ask("nvmlSystemGetNVMLVersion") or "") or None,
        source=source,
        topology=topology,
    )


def _gpu(ask: Any, index: int, handle: Any) -> GpuInfo:
    memory = ask("nvmlDeviceGetMemoryInfo", handle)
    pci = ask("nvmlDeviceGetPciInfo_v3", handle)
    cc = ask("nvmlDeviceGetCudaComputeCapability", handle) or (0, 0)
    mig = ask("nvmlDeviceGetMigMode", handle)
    mode = ask("nvmlDeviceGetComputeMode", handle)
    util = ask("nvmlDeviceGetUtilizationRates", handle)
    words = ask("nvmlDeviceGetCpuAffinity", handle, _cpu_words())
    numa = ask("nvmlDeviceGetNumaNodeId", handle)
    return GpuInfo(
        index=index,
        uuid=_text(ask("nvmlDeviceGetUUID", handle) or ""),
        name=_text(ask("nvmlDeviceGetName", handle) or "unknown"),
        pci_bus_id=_text(pci.busId) if pci is not None else "",
        memory_total_mib=int(memory.total) // MIB if memory is not None else 0,
        memory_used_mib=int(memory.used) // MIB if memory is not None else 0,
        capability=(int(cc[0]), int(cc[1])),
        mig_mode=bool(mig[0]) if mig is not None else None,
        compute_mode=COMPUTE_MODES.get(mode, "default") if mode is not None else "default",
        numa_node=int(numa) if numa is not None and int(numa) >= 0 else None,
        cpu_affinity=_cpus(words) if words is not None else [],
        utilization_gpu=int(util.gpu) if util is not None else None,
        utilization_memory=int(util.memory) if util is not None else None,
        processes=_processes(ask, handle),
    )


def _processes(ask: Any, handle: Any) -> list[GpuProcess]:
    running = ask("nvmlDeviceGetComputeRunningProcesses", handle) or []
    samples = ask("nvmlDeviceGetProcessUtilization", handle, 0) or []
    sm = {int(s.pid): int(s.smUtil) for s in samples}
    out = []
    for p in running:
        used = getattr(p, "usedGpuMemory", None)
        # NVML reports "not available" (e.g. inside a container) as ULLONG_MAX.
        mib = int(used) // MIB if used is not None and int(used) < 2**63 else None
        pid = int(p.pid)
        out.append(GpuProcess(pid, mib, sm.get(pid)))
    return out


def _cpu_words() -> int:
    """64-bit words of CPU mask to ask for: fixed (1024 CPUs), so a recording replays on a
    machine with another CPU count."""
    return 16


def _cpus(words: Any) -> list[int]:
    cpus = []
    for w, word in enumerate(words):
        bits = int(word)
        cpus += [w * 64 + b for b in range(64) if bits >> b & 1]
    return cpus


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bus(bus_id: str) -> str:
    """PCI bus ids compare without the domain's width: ``00000000:1B:00.0`` == ``0000:1b:00.0``."""
    domain, _, rest = bus_id.lower().partition(":")
    return f"{int(domain, 16) if domain else 0}:{rest}" if rest else bus_id.lower()


def cpu_ranges(cpus: list[int]) -> str:
    """``[0, 1, 2, 3, 8]`` -> ``"0-3,8"`` (how ``nvidia-smi topo -m`` shows affinity)."""
    if not cpus:
        return "-"
    parts, start, prev = [], cpus[0], cpus[0]
    for c in [*cpus[1:], None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(f"{start}-{prev}" if prev != start else str(start))
        if c is not None:
            start = prev = c
    return ",".join(parts)
