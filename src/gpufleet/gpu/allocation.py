"""Who gets which GPU: each model's ``resources.gpu`` turned into worker placements.

Three modes, as the Kubernetes accelerator toolkits have them:
- ``whole``: ``count`` whole GPUs per worker group, held by that model alone. For ``count > 1``
  GPUs joined by NVLink are preferred, then GPUs on one NUMA node.
- ``fraction``: each worker gets ``memory_gb`` and ``compute_percent`` of one GPU; the worker
  enforces the memory limit itself.
- ``mps``: the same shares, enforced by the driver through an MPS daemon per GPU.

A GPU is never given more memory or compute share than it has (invariant 5): a request that
does not fit is refused with the GPU and the shortfall. A GPU holds one kind of sharing at a
time (fraction or MPS, never both: MPS clients and plain contexts time-slice against each
other), and gpufleet does not schedule onto MIG-enabled GPUs or ones in compute mode
``prohibited``. Pure: the host comes from ``discovery``; nothing here touches a GPU.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from gpufleet.errors import InsufficientGpu, InvalidInput
from gpufleet.gpu.discovery import GpuInfo, HostInfo

Policy = Literal["binpack", "spread"]
MODES = ("none", "whole", "fraction", "mps")
# GPU memory a process holds beyond what its model allocates: the CUDA context, cuBLAS
# workspaces, torch's kernels (measured 0.5-0.7 GB on the H100 with torch 2.11). Reserved per
# worker and per standby on shared GPUs, and once per GPU for the MPS server.
CONTEXT_MIB = 768


@dataclass(frozen=True)
class GpuRequest:
    """What one model asks for (its ``resources.gpu``) and how many workers.

    ``replicas`` None: ``workers_per_gpu`` workers on every GPU the model gets (fraction, mps)
    or on every group of ``count`` GPUs (whole). A number: exactly that many workers, placed by
    the policy."""

    model: str
    version: str = ""
    mode: str = "whole"
    count: int = 1
    memory_gb: float | None = None
    compute_percent: int | None = None
    replicas: int | None = None

    @property
    def memory_mib(self) -> int | None:
        return None if self.memory_gb is None else math.ceil(self.memory_gb * 1024)

    @property
    def label(self) -> str:
        return f"{self.model}@{self.version}" if self.version else self.model

    def describe(self) -> str:
        if self.mode == "whole":
            return f"{self.count} whole GPU{'s' if self.count > 1 else ''}"
        return f"{self.memory_gb:g} GB and {self.compute_percent}% of a GPU ({self.mode})"


@dataclass(frozen=True)
class Placement:
    """One worker's share: the GPUs it sees and the limits it runs under."""

    model: str
    version: str
    mode: str
    slot: str  # "gpu0", "gpu0+1", "cpu0": unique per placement with ``replica``
    replica: int
    gpus: tuple[int, ...] = ()
    uuids: tuple[str, ...] = ()
    memory_mib: int | None = None
    compute_percent: int | None = None
    cpus: tuple[int, ...] = ()

    @property
    def worker(self) -> str:
        return f"{self.model}@{self.version}/{self.slot}.{self.replica}"


@dataclass
class _GpuState:
    gpu: GpuInfo
    free_mib: int
    held_whole: str | None = None
    mode: str | None = None  # "fraction" | "mps" once shared
    used_mib: int = 0
    used_percent: int = 0
    workers: list[str] = field(default_factory=list)

    @property
    def left_mib(self) -> int:
        return self.free_mib - self.used_mib

    @property
    def left_percent(self) -> int:
        return 100 - self.used_percent


def usable(gpu: GpuInfo) -> str | None:
    """Why gpufleet will not place workers on ``gpu`` (None: it will)."""
    if gpu.mig_mode:
        return "MIG is enabled (gpufleet does not schedule MIG instances)"
    if gpu.compute_mode == "prohibited":
        return "its compute mode is prohibited (no CUDA context may be created)"
    return None


def allocate(
    host: HostInfo,
    requests: list[GpuRequest],
    *,
    workers_per_gpu: int = 1,
    policy: Policy = "binpack",
    cpu_slots: int = 1,
    standby_per_worker: int = 0,
) -> list[Placement]:
    """Placements for every request, or ``InsufficientGpu`` naming what does not fit.
    A worker on a shared GPU takes its ``memory_gb`` plus ``CONTEXT_MIB`` for its own CUDA
    context and one more for each of its standbys.

    Without GPUs every model runs on ``cpu_slots`` CPU slots (``workers_per_gpu`` workers each),
    whatever it asked for. Whole-GPU models come first; GPUs are split evenly between them and,
    as one party, the models that share GPUs."""
    for r in requests:
        _check_request(r)
    labels = [r.label for r in requests]
    if len(set(labels)) != len(labels):
        raise InvalidInput(f"a model is given twice: {', '.join(labels)}")
    cpu = [r for r in requests if r.mode == "none" or not host.gpus]
    gpu = [r for r in requests if r not in cpu]
    out = [p for r in cpu for p in _cpu_placements(r, cpu_slots, workers_per_gpu)]
    if not gpu:
        return out
    states = [_GpuState(g, max(0, g.memory_total_mib - g.memory_used_mib)) for g in host.gpus]
    why_not = {s.gpu.index: usable(s.gpu) for s in states}
    free = [s for s in states if why_not[s.gpu.index] is None]
    whole = [r for r in gpu if r.mode == "whole"]
    shared = [r for r in gpu if r.mode != "whole"]
    parties = sum(1 for r in whole if r.replicas is None) + (
        1 if any(r.replicas is None for r in shared) else 0
    )
    # Fixed numbers of whole groups first, then the even split.
    for r in sorted(whole, key=lambda r: r.replicas is None):
        if r.replicas is None:
            available = len([s for s in free if s.held_whole is None])
            want = max(1, available // max(1, parties) // r.count)
            parties -= 1
        else:
            want = r.replicas
        groups = _whole_groups(host, free, r, want, exact=r.replicas is not None, why_not=why_not)
        for n, group in enumerate(groups):
            for s in group:
                s.held_whole = r.label
            per_group = workers_per_gpu if r.replicas is None else 1
            for k in range(per_group):
                out.append(_placement(r, group, replica=n * per_group + k))
    pool = [s for s in free if s.held_whole is None]
    for r in shared:
        out += _shared(r, pool, states, why_not, workers_per_gpu, policy, standby_per_worker)
    return out


def _check_request(r: GpuRequest) -> None:
    if r.mode not in MODES:
        raise InvalidInput(f"{r.label}: GPU mode must be one of {', '.join(MODES)}, got {r.mode!r}")
    if r.mode in ("fraction", "mps") and (r.memory_gb is None or r.compute_percent is None):
        raise InvalidInput(f"{r.label}: mode {r.mode} needs memory_gb and compute_percent")
    if r.replicas is not None and r.replicas < 1:
        raise InvalidInput(f"{r.label}: replicas must be at least 1, got {r.replicas}")
    if r.mode == "whole" and r.count < 1:
        raise InvalidInput(f"{r.label}: count must be at least 1, got {r.count}")
    if r.memory_gb is not None and not r.memory_gb > 0:
        raise InvalidInput(f"{r.label}: memory_gb must be above 0, got {r.memory_gb}")
    if r.compute_percent is not None and not 1 <= r.compute_percent <= 100:
        raise InvalidInput(
            f"{r.label}: compute_percent must be between 1 and 100, got {r.compute_percent}"
        )


def _cpu_placements(r: GpuRequest, cpu_slots: int, per_slot: int) -> list[Placement]:
    n = r.replicas if r.replicas is not None else max(1, cpu_slots) * per_slot
    slots = max(1, cpu_slots)
    return [Placement(r.model, r.version, "none", f"cpu{i % slots}", i // slots) for i in range(n)]


def _placement(r: GpuRequest, group: list[_GpuState], *, replica: int) -> Placement:
    cpus = sorted({c for s in group for c in s.gpu.cpu_affinity})
    indices = tuple(s.gpu.index for s in group)
    return Placement(
        r.model,
        r.version,
        r.mode,
        "gpu" + "+".join(str(i) for i in indices),
        replica,
        gpus=indices,
        uuids=tuple(s.gpu.uuid for s in group),
        memory_mib=r.memory_mib,
        compute_percent=r.compute_percent,
        cpus=tuple(cpus),
    )


def _whole_groups(
    host: HostInfo,
    free: list[_GpuState],
    r: GpuRequest,
    want: int,
    *,
    exact: bool,
    why_not: dict[int, str | None],
) -> list[list[_GpuState]]:
    groups: list[list[_GpuState]] = []
    taken: set[int] = set()
    while len(groups) < want:
        open_ = [s for s in free if s.held_whole is None and s.gpu.index not in taken]
        best = _best_group(host, open_, r.count)
        if best is None:
            if groups and not exact:
                break
            replicas = f" x {want} replicas" if exact and want > 1 else ""
            why = [f"{len(open_)} of {len(host.gpus)} GPUs free", *_unavailable(free, why_not)]
            raise InsufficientGpu(
                f"{r.label} asks for {r.describe()}{replicas}; " + "; ".join(why), model=r.label
            )
        groups.append(best)
        taken |= {s.gpu.index for s in best}
    return groups


def _best_group(host: HostInfo, open_: list[_GpuState], count: int) -> list[_GpuState] | None:
    """The ``count`` GPUs with the most NVLinks between them, then on the fewest NUMA nodes,
    then the lowest indices."""
    if len(open_) < count:
        return None
    if count == 1:
        return [open_[0]]

    def score(group: tuple[_GpuState, ...]) -> tuple[int, int, tuple[int, ...]]:
        pairs = list(itertools.combinations(group, 2))
        nvlinked = sum(1 for a, b in pairs if host.link(a.gpu.index, b.gpu.index).startswith("NV"))
        numa = len({s.gpu.numa_node for s in group})
        return (-nvlinked, numa, tuple(s.gpu.index for s in group))

    combos: Iterable[tuple[_GpuState, ...]] = itertools.combinations(open_, count)
    if math.comb(len(open_), count) > 20_000:  # large hosts: consecutive runs only
        combos = (tuple(open_[i : i + count]) for i in range(len(open_) - count + 1))
    best = min(((score(g), g) for g in combos), key=lambda pair: pair[0])
    return list(best[1])


def _unavailable(states: list[_GpuState], why_not: dict[int, str | None]) -> list[str]:
    """Why GPUs cannot take a worker: held whole by a model, or left alone by gpufleet."""
    parts = [f"GPU {s.gpu.index} is held whole by {s.held_whole}" for s in states if s.held_whole]
    return parts + [f"GPU {i}: {why}" for i, why in why_not.items() if why]


def _shared(
    r: GpuRequest,
    pool: list[_GpuState],
    states: list[_GpuState],
    why_not: dict[int, str | None],
    workers_per_gpu: int,
    policy: Policy,
    standbys: int,
) -> list[Placement]:
    mem = (r.memory_mib or 0) + CONTEXT_MIB * (1 + standbys)
    pct = r.compute_percent or 0
    if not pool:
        raise InsufficientGpu(
            f"{r.label} asks for {r.describe()}; no GPU is left to share: "
            + ("; ".join(_unavailable(states, why_not)) or "no GPUs"),
            model=r.label,
        )
    out: list[Placement] = []
    if r.replicas is None:
        for s in pool:
            for k in range(workers_per_gpu):
                _take(r, s, mem, pct, worker=k)
                out.append(_placement(r, [s], replica=k))
        return out
    counts: dict[int, int] = {}
    for _ in range(r.replicas):
        fits = [s for s in pool if _fits(r, s, mem, pct) is None]
        if not fits:
            raise InsufficientGpu(
                f"{r.label} asks for {r.describe()} x {r.replicas} replicas; only "
                f"{len(out)} fit: " + "; ".join(_fits(r, s, mem, pct) or "" for s in pool),
                model=r.label,
            )
        # binpack: the fullest GPU that still fits; spread: the emptiest.
        key = (lambda s: (s.left_percent, s.left_mib, s.gpu.index)) if policy == "binpack" else (
            lambda s: (-s.left_percent, -s.left_mib, s.gpu.index)
        )  # fmt: skip
        s = min(fits, key=key)
        k = counts.get(s.gpu.index, 0)
        counts[s.gpu.index] = k + 1
        _take(r, s, mem, pct, worker=k)
        out.append(_placement(r, [s], replica=k))
    return out


def _fits(r: GpuRequest, s: _GpuState, mem: int, pct: int) -> str | None:
    """Why one more worker of ``r`` does not fit on ``s`` (None: it fits)."""
    g = s.gpu
    if s.mode is not None and s.mode != r.mode:
        return f"GPU {g.index} is already shared in mode {s.mode}, not {r.mode}"
    if r.mode == "fraction" and g.compute_mode == "exclusive_process" and s.workers:
        return f"GPU {g.index} is in compute mode exclusive_process: one process only"
    short = []
    need = mem + _server_mib(r, s)
    if need > s.left_mib:
        short.append(f"{(need - s.left_mib) / 1024:.1f} GB of memory short "
                     f"({s.left_mib / 1024:.1f} GB left; a worker takes "
                     f"{mem / 1024:.2f} GB with its CUDA context)")  # fmt: skip
    if pct > s.left_percent:
        short.append(f"{pct - s.left_percent}% of compute short ({s.left_percent}% left)")
    if short:
        return f"GPU {g.index} ({g.name}): " + " and ".join(short)
    return None


def _server_mib(r: GpuRequest, s: _GpuState) -> int:
    """The MPS server's own context, reserved with the first MPS worker on a GPU."""
    return CONTEXT_MIB if r.mode == "mps" and s.mode is None else 0


def _take(r: GpuRequest, s: _GpuState, mem: int, pct: int, *, worker: int) -> None:
    why = _fits(r, s, mem, pct)
    if why is not None:
        raise InsufficientGpu(
            f"{r.label} asks for {r.describe()} per worker; worker {worker + 1} does not fit: "
            f"{why}",
            model=r.label,
        )
    s.used_mib += mem + _server_mib(r, s)
    s.mode = r.mode
    s.used_percent += pct
    s.workers.append(r.label)
