"""From the models to serve and the GPUs here to the supervisor's workers: each model's
``resources.gpu`` goes through the allocator, each placement becomes a slot whose environment
carries its share (visible GPUs by UUID, memory cap, MPS pipe and limits, CPU affinity).

``CUDA_VISIBLE_DEVICES`` given to ``gpufleet serve`` restricts it to those GPUs: UUID prefixes,
or indices in PCI bus order as ``nvidia-smi`` and NVML number them (CUDA numbers fastest
first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; UUIDs are never ambiguous). Workers are given
their GPUs by UUID.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from gpufleet.gpu.allocation import GpuRequest, Placement, Policy, allocate
from gpufleet.gpu.discovery import HostInfo
from gpufleet.gpu.mps import MpsDaemons, control_binary
from gpufleet.worker.limits import WorkerLimits
from gpufleet.worker.supervisor import Deployment, Slot


@dataclass
class WorkerPlan:
    placements: list[Placement]
    workers: list[tuple[Deployment, Slot, str]]
    mps: MpsDaemons
    mps_gpus: dict[str, int]  # uuid -> index of each GPU in mode mps

    def start_mps(self) -> None:
        """Start an MPS daemon for each GPU in mode mps (before any worker starts)."""
        if self.mps_gpus:
            self.mps.start(self.mps_gpus)

    @property
    def slots(self) -> list[Slot]:
        return list(dict.fromkeys(slot for _, slot, _ in self.workers))


def visible(host: HostInfo, env: Mapping[str, str]) -> HostInfo:
    """``host`` with only the GPUs ``CUDA_VISIBLE_DEVICES`` lets through (all when unset)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return host
    keep = []
    for item in (v.strip() for v in value.split(",")):
        if not item or item == "-1":
            break  # CUDA stops at the first invalid entry
        match = [
            g
            for g in host.gpus
            if (item.isdigit() and g.index == int(item))
            or (item.startswith("GPU-") and g.uuid.startswith(item))
        ]
        if not match:
            break
        keep += [g for g in match if g not in keep]
    hidden = f"CUDA_VISIBLE_DEVICES={value!r} hides every GPU"
    error = host.error if keep else (host.error or hidden)
    return replace(host, gpus=keep, error=error)


def plan_workers(
    host: HostInfo,
    models: list[tuple[Deployment, GpuRequest]],
    *,
    run_dir: Path,
    workers_per_gpu: int = 1,
    cpu_slots: int = 1,
    policy: Policy = "binpack",
    standby_per_worker: int = 0,
) -> WorkerPlan:
    """Allocate, then describe each worker's slot; ``start_mps`` then starts the MPS daemons
    the plan needs. Raises ``InsufficientGpu`` when the models do not fit."""
    placements = allocate(
        host,
        [req for _, req in models],
        workers_per_gpu=workers_per_gpu,
        policy=policy,
        cpu_slots=cpu_slots,
        standby_per_worker=standby_per_worker,
    )
    deployments = {(d.name, d.version): d for d, _ in models}
    mps = MpsDaemons(run_dir)
    mps_gpus = {p.uuids[0]: p.gpus[0] for p in placements if p.mode == "mps"}
    if mps_gpus:
        control_binary()  # before anything starts: one line saying what to do
    workers = []
    for p in placements:
        dep = deployments[(p.model, p.version)]
        workers.append((dep, _slot(p, mps, mps_gpus), p.worker))
    return WorkerPlan(placements, workers, mps, mps_gpus)


def _slot(p: Placement, mps: MpsDaemons, mps_gpus: dict[str, int]) -> Slot:
    if not p.gpus:
        return Slot(p.slot, "cpu")
    limits = WorkerLimits(p.mode, p.memory_mib, p.compute_percent, p.cpus)
    env = limits.to_env()
    if p.mode == "mps":
        env.update(_mps_env(mps, p, mps_gpus))
    # Each worker of a shared GPU is its own slot (its limits differ); whole GPUs share one.
    name = p.slot if p.mode == "whole" else f"{p.slot}.{p.model}.{p.replica}"
    return Slot(name, "cuda:0", visible_gpu=",".join(p.uuids), env=tuple(sorted(env.items())))


def _mps_env(mps: MpsDaemons, p: Placement, mps_gpus: dict[str, int]) -> dict[str, str]:
    daemon = mps.daemon_for(p.uuids[0], mps_gpus[p.uuids[0]])
    return daemon.client_env(thread_percent=p.compute_percent, memory_mib=p.memory_mib)
