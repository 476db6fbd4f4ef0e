"""The share of a GPU and of the CPUs a worker runs under, passed down by the supervisor in
``GPUFLEET_*`` variables and applied by the worker before it touches the device.

- CPU affinity: the worker pins itself to the CPUs next to its GPU (NVML's affinity), so its
  host-side work and copies do not cross NUMA nodes.
- Memory (mode ``fraction``): ``torch.cuda.set_per_process_memory_fraction`` caps the caching
  allocator, so a model that wants more than its share fails alone with ``out_of_memory``
  instead of starving its neighbours. Under MPS the driver enforces the same limit
  (``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``) and the cap here only makes the error say why.
  The CUDA context itself (~0.5-0.7 GB) is outside torch's cap; the allocator reserves
  ``CONTEXT_MIB`` for it beside ``memory_gb``.
- Compute share: enforced by MPS (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``); in mode ``fraction``
  it is what the allocator reserved, not a limit the driver keeps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV_MODE = "GPUFLEET_GPU_MODE"
ENV_MEMORY = "GPUFLEET_GPU_MEMORY_LIMIT_MIB"
ENV_COMPUTE = "GPUFLEET_GPU_COMPUTE_PERCENT"
ENV_CPUS = "GPUFLEET_CPU_AFFINITY"


@dataclass(frozen=True)
class WorkerLimits:
    mode: str = "none"
    memory_mib: int | None = None
    compute_percent: int | None = None
    cpus: tuple[int, ...] = ()

    def to_env(self) -> dict[str, str]:
        env = {ENV_MODE: self.mode}
        if self.memory_mib is not None:
            env[ENV_MEMORY] = str(self.memory_mib)
        if self.compute_percent is not None:
            env[ENV_COMPUTE] = str(self.compute_percent)
        if self.cpus:
            env[ENV_CPUS] = ",".join(str(c) for c in self.cpus)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerLimits:
        env = os.environ if env is None else env

        def number(name: str) -> int | None:
            text = env.get(name, "").strip()
            return int(text) if text.isdigit() else None

        cpus = tuple(int(c) for c in env.get(ENV_CPUS, "").split(",") if c.strip().isdigit())
        return cls(env.get(ENV_MODE, "none"), number(ENV_MEMORY), number(ENV_COMPUTE), cpus)

    def describe(self) -> str:
        parts = []
        if self.memory_mib is not None:
            parts.append(f"{self.memory_mib / 1024:.1f} GB of GPU memory")
        if self.compute_percent is not None:
            parts.append(f"{self.compute_percent}% of its compute")
        return f"{' and '.join(parts)} (mode {self.mode})" if parts else f"mode {self.mode}"

    def apply(self, device: str) -> list[str]:
        """Pin the CPUs and cap the memory, before any model touches ``device``; returns what
        was done, for the worker's log (which is set up later)."""
        notes = []
        if self.cpus and hasattr(os, "sched_setaffinity"):
            allowed = os.sched_getaffinity(0) & set(self.cpus)
            if allowed:
                os.sched_setaffinity(0, allowed)
                notes.append(f"pinned to CPUs {','.join(str(c) for c in sorted(allowed))}")
            else:  # a container's cpuset without the GPU's CPUs: keep what we have
                log.warning("CPU affinity %s is outside this process's CPUs; not pinned",
                            self.cpus)  # fmt: skip
        if self.memory_mib is not None and device.startswith("cuda"):
            import torch

            index = int(device.partition(":")[2] or 0)
            total = torch.cuda.get_device_properties(index).total_memory
            fraction = min(1.0, self.memory_mib * 1024 * 1024 / total)
            torch.cuda.set_per_process_memory_fraction(fraction, index)
            notes.append(
                f"GPU memory capped at {self.memory_mib / 1024:.1f} GB ({100 * fraction:.1f}% "
                f"of {torch.cuda.get_device_name(index)}, mode {self.mode})"
            )
        return notes

    def out_of_memory_message(self, error: BaseException) -> str:
        """What a task that did not fit is told: the limit first, then torch's first line."""
        first = str(error).split(". ")[0].strip()
        if self.memory_mib is None:
            return f"{type(error).__name__}: {first}; lower max_batch_size or the input's size"
        return (
            f"the input does not fit in this worker's share of the GPU, "
            f"{self.memory_mib / 1024:.1f} GB (resources.gpu.memory_gb, mode {self.mode}): "
            f"{first}. Raise memory_gb or send smaller inputs"
        )
