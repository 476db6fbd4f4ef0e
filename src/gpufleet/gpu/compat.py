"""The compatibility rules between a model, the CUDA stack and a GPU, as NVIDIA documents them.

Pure functions over ``DeviceFacts``: the model loader checks them before loading any weights and
the doctor reports them for a whole host, so both say the same thing in the same words. Facts
are gathered elsewhere (``facts_for_device``, NVML); nothing here touches a GPU.

Sources: CUDA Compatibility guide (driver >= runtime; minor-version compatibility within a major
release since 11.1), the CUDA C Programming Guide (binary compatibility within a major compute
capability, upwards only), the precision tables (bf16 from 8.0, fp8 from 8.9, fp16 tensor
cores from 7.0), and the MPS guide (per-client limits from Volta; the pinned memory limit from
CUDA 11.5).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

Capability = tuple[int, int]


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Finding:
    """One check's result: what was found, why it matters, and how to fix it."""

    severity: Severity
    check: str  # stable id, e.g. "precision.bf16"
    found: str
    why: str
    fix: str
    subject: str = ""  # the GPU or model it concerns

    def message(self) -> str:
        return f"{self.found}. {self.why} Fix: {self.fix}"

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class DeviceFacts:
    """What the rules need to know of one device and the software stack driving it."""

    kind: str  # "cuda" or "cpu"
    name: str = "cpu"
    capability: Capability | None = None
    driver_version: str | None = None  # e.g. "580.65.06"
    driver_cuda: Capability | None = None  # the newest CUDA the driver supports
    runtime_cuda: Capability | None = None  # the CUDA torch / onnxruntime were built with
    runtime: str = "torch"

    @property
    def label(self) -> str:
        if self.capability is None:
            return self.name
        return f"{self.name} (compute capability {fmt(self.capability)})"


def fmt(version: Capability) -> str:
    return f"{version[0]}.{version[1]}"


def parse_version(text: str) -> Capability:
    """``"12.4"`` / ``"12.4.1"`` -> ``(12, 4)``; ``"13"`` -> ``(13, 0)``; ``"sm_90"`` ->
    ``(9, 0)``."""
    text = text.strip()
    if text.startswith("sm_") and text[3:].isdigit():
        return int(text[3:-1]), int(text[-1])
    major, _, rest = text.partition(".")
    return int(major), int(rest.split(".")[0] or 0)


# Minimum compute capability of each precision, and what to use instead.
_PRECISION_MIN: dict[str, tuple[Capability, str, str]] = {
    "bf16": ((8, 0), "bfloat16 needs compute capability >= 8.0 (Ampere)", "set precision: fp16"),
    "fp8": (
        (8, 9),
        "fp8 needs compute capability >= 8.9 (Ada or Hopper)",
        "set precision: bf16 (or fp16 below 8.0)",
    ),
}


def check_precision(precision: str, facts: DeviceFacts) -> list[Finding]:
    """Can this device run ``precision``? ``fp32`` always can."""
    if facts.kind != "cuda" or facts.capability is None:
        if precision in ("fp16", "fp8"):
            return [
                Finding(
                    Severity.WARNING,
                    f"precision.{precision}",
                    f"precision {precision} on the CPU",
                    f"CPUs emulate {precision} matrix products, often slower than fp32.",
                    "set precision: fp32 or bf16 for CPU workers",
                    facts.name,
                )
            ]
        return []
    cc = facts.capability
    if precision in _PRECISION_MIN:
        needed, why, fix = _PRECISION_MIN[precision]
        if cc < needed:
            return [
                Finding(
                    Severity.ERROR,
                    f"precision.{precision}",
                    f"precision {precision} asked for; this GPU is {facts.label}",
                    f"{why}: the kernels do not exist for {fmt(cc)}.",
                    fix,
                    facts.name,
                )
            ]
    if precision == "fp16" and cc < (7, 0):
        return [
            Finding(
                Severity.WARNING,
                "precision.fp16",
                f"precision fp16 on {facts.label}",
                "fp16 tensor cores need compute capability >= 7.0; below it fp16 runs on "
                "CUDA cores, without the speed-up.",
                "expect fp32-like throughput, or use a Volta or newer GPU",
                facts.name,
            )
        ]
    return []


def check_driver_runtime(facts: DeviceFacts) -> list[Finding]:
    """The driver must support the runtime's CUDA version (NVIDIA's compatibility rules)."""
    drv, rt = facts.driver_cuda, facts.runtime_cuda
    if facts.kind != "cuda" or drv is None or rt is None:
        return []
    if rt[0] > drv[0]:
        return [
            Finding(
                Severity.ERROR,
                "cuda.driver_older_than_runtime",
                f"{facts.runtime} is built for CUDA {fmt(rt)}; driver {facts.driver_version} "
                f"supports CUDA up to {fmt(drv)}",
                "A driver older than the runtime's major version fails at the first CUDA call "
                "(CUDA_ERROR_UNKNOWN (999) or 'driver version is insufficient for CUDA runtime "
                "version').",
                f"upgrade the driver to one for CUDA {rt[0]}.x, or pick a base image / wheel "
                f"built for CUDA {drv[0]}.x (e.g. torch cu{drv[0]}{drv[1]})",
                facts.name,
            )
        ]
    if rt > drv:
        return [
            Finding(
                Severity.WARNING,
                "cuda.minor_version_compat",
                f"{facts.runtime} is built for CUDA {fmt(rt)}; driver supports CUDA {fmt(drv)}",
                "Minor-version compatibility runs it, but PTX compiled by the newer toolkit "
                "cannot be JIT-compiled by this driver (CUDA_ERROR_UNSUPPORTED_PTX_VERSION) and "
                "newer APIs return CUDA_ERROR_NOT_SUPPORTED.",
                f"upgrade the driver to one for CUDA >= {fmt(rt)}, or use a runtime built for "
                f"CUDA {fmt(drv)}",
                facts.name,
            )
        ]
    if drv[0] - rt[0] > 1:
        return [
            Finding(
                Severity.WARNING,
                "cuda.major_versions_apart",
                f"{facts.runtime} is built for CUDA {fmt(rt)}; driver supports CUDA {fmt(drv)}",
                "Drivers run older runtimes, but NVIDIA tests and supports only the last two "
                "major versions; newer GPUs may lack kernels for an old runtime.",
                f"move to a runtime built for CUDA {drv[0]}.x or {drv[0] - 1}.x",
                facts.name,
            )
        ]
    return []


def check_cuda_range(cuda: str | None, facts: DeviceFacts, *, subject: str) -> list[Finding]:
    """The model declares which CUDA versions it was built and tested for."""
    if not cuda or facts.kind != "cuda" or facts.runtime_cuda is None:
        return []
    runtime = Version(fmt(facts.runtime_cuda))
    if runtime in SpecifierSet(cuda):
        return []
    return [
        Finding(
            Severity.ERROR,
            "model.cuda_range",
            f"{subject} needs CUDA {cuda}; {facts.runtime} here is built for CUDA "
            f"{fmt(facts.runtime_cuda)}",
            "Kernels built for another CUDA may not load (CUDA_ERROR_UNSUPPORTED_PTX_VERSION, "
            "'no kernel image is available') or behave differently from what was tested.",
            f"run it where the runtime's CUDA is {cuda}, or rebuild and retest it for CUDA "
            f"{fmt(facts.runtime_cuda)} and update compatibility.cuda",
            subject,
        )
    ]


def check_arch(archs: list[Capability], facts: DeviceFacts, *, subject: str) -> list[Finding]:
    """The GPU must be one of the model's architectures, or a newer minor of the same major
    (cubins run on later minors of their major; never across majors or downwards)."""
    cc = facts.capability
    if not archs or facts.kind != "cuda" or cc is None:
        return []
    if any(a[0] == cc[0] and a[1] <= cc[1] for a in archs):
        return []
    listed = ", ".join(fmt(a) for a in sorted(archs))
    return [
        Finding(
            Severity.ERROR,
            "model.arch",
            f"{subject} is built for compute capability {listed}; this GPU is {facts.label}",
            "Its kernels have no binary for this GPU: loading fails with 'no kernel image is "
            "available for execution on the device' or 'invalid device function'.",
            f"rebuild with TORCH_CUDA_ARCH_LIST including {fmt(cc)} (nvcc -gencode "
            f"arch=compute_{cc[0]}{cc[1]},code=sm_{cc[0]}{cc[1]}) and add '{fmt(cc)}' to "
            "compatibility.arch",
            subject,
        )
    ]


def check_model(
    *,
    subject: str,
    precision: str,
    cuda: str | None,
    archs: list[Capability],
    facts: DeviceFacts,
) -> list[Finding]:
    """Every rule that decides whether this model may load on this device."""
    return [
        *check_driver_runtime(facts),
        *check_cuda_range(cuda, facts, subject=subject),
        *check_arch(archs, facts, subject=subject),
        *check_precision(precision, facts),
    ]


# MPS's per-client limits: the thread share needs Volta MPS, the memory limit a newer driver.
MPS_LIMITS_MIN: Capability = (7, 0)
MPS_MEMORY_LIMIT_CUDA: Capability = (11, 5)


def check_mps(facts: DeviceFacts, *, memory_limit: bool, subject: str) -> list[Finding]:
    """Can the driver enforce an MPS client's share on this device (NVIDIA's MPS guide)?"""
    cc, drv = facts.capability, facts.driver_cuda
    if facts.kind != "cuda" or cc is None:
        return []
    out = []
    if cc < MPS_LIMITS_MIN:
        out.append(
            Finding(
                Severity.ERROR,
                "mps.volta",
                f"{subject} asks for mode mps; this GPU is {facts.label}",
                "MPS clients get their own address space and a compute share "
                "(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE) only with Volta MPS, compute capability "
                ">= 7.0: before it, one client's fault ends them all and no share is enforced.",
                "use mode fraction on this GPU, or a Volta or newer GPU for mode mps",
                facts.name,
            )
        )
    if memory_limit and drv is not None and drv < MPS_MEMORY_LIMIT_CUDA:
        out.append(
            Finding(
                Severity.ERROR,
                "mps.memory_limit",
                f"{subject} asks for mode mps with memory_gb; driver {facts.driver_version} "
                f"supports CUDA up to {fmt(drv)}",
                "The MPS memory limit (CUDA_MPS_PINNED_DEVICE_MEM_LIMIT) needs a driver for "
                "CUDA >= 11.5: an older one ignores it, so memory_gb would not be enforced and "
                "one client could take the whole GPU.",
                "upgrade the driver to R495 or newer (CUDA >= 11.5), or use mode fraction "
                "(the worker enforces memory_gb itself)",
                facts.name,
            )
        )
    return out


def check_sharing(
    mode: str, *, compute_mode: str, mig: bool | None, facts: DeviceFacts, subject: str, ids: str
) -> list[Finding]:
    """Does the GPU's MIG and compute mode allow gpufleet's sharing ``mode`` on it? ``ids``:
    the GPU indices, for the ``nvidia-smi -i`` in the fix. Errors here mean gpufleet skips the
    GPU for this model (it does not schedule MIG instances), not that the model cannot run."""
    if mode == "none":
        return []
    if mig:
        return [
            Finding(
                Severity.ERROR,
                "sharing.mig",
                f"{facts.name} has MIG enabled",
                "gpufleet does not schedule MIG instances: a MIG-enabled GPU is skipped for "
                f"mode {mode}.",
                f"disable MIG when the GPU is idle (nvidia-smi -i {ids} -mig 0, as root, then a "
                "GPU reset), or run the model on a GPU without MIG",
                subject,
            )
        ]
    if compute_mode == "prohibited":
        return [
            Finding(
                Severity.ERROR,
                "sharing.prohibited",
                f"{facts.name} is in compute mode prohibited",
                "No process may create a CUDA context on it: gpufleet skips it.",
                f"set compute mode DEFAULT (nvidia-smi -i {ids} -c DEFAULT, as root)",
                subject,
            )
        ]
    exclusive = compute_mode in ("exclusive_process", "exclusive_thread")
    if exclusive and mode == "fraction":
        return [
            Finding(
                Severity.WARNING,
                "sharing.exclusive_process",
                f"{subject} asks for mode fraction; {facts.name} is in compute mode {compute_mode}",
                "Only one process may hold a CUDA context on it: a second worker fails with "
                "'CUDA-capable device(s) is/are busy or unavailable' (cudaErrorDevicesUnavailable, "
                "46), so one worker gets the GPU and the rest of it stays idle.",
                f"use mode mps (its server is the one context), or set compute mode DEFAULT "
                f"(nvidia-smi -i {ids} -c DEFAULT, as root)",
                subject,
            )
        ]
    if mode == "mps" and compute_mode == "default":
        return [
            Finding(
                Severity.INFO,
                "sharing.mps_compute_mode",
                f"{subject} asks for mode mps; {facts.name} is in compute mode default",
                "NVIDIA recommends compute mode EXCLUSIVE_PROCESS with MPS, so that only the MPS "
                "server holds a context; in DEFAULT other processes may use the GPU beside it, "
                "time-sliced against the MPS clients.",
                f"optional: nvidia-smi -i {ids} -c EXCLUSIVE_PROCESS (as root)",
                subject,
            )
        ]
    return []


_ARCH_FLAG = re.compile(r"^(sm|compute)_(\d+)(\d)[af]?$")


def check_runtime_arch(archs: list[str], facts: DeviceFacts) -> list[Finding]:
    """The runtime (torch's ``get_arch_list()``: ``sm_90``, ``compute_90``...) must hold a cubin
    for the GPU (same major, minor at most the GPU's) or PTX of an older one to JIT-compile."""
    cc = facts.capability
    if not archs or facts.kind != "cuda" or cc is None:
        return []
    for flag in archs:
        match = _ARCH_FLAG.match(flag)
        if match is None:
            continue
        built = (int(match[2]), int(match[3]))
        exact = flag.rstrip("af") != flag  # sm_90a: Hopper-only features, runs on 9.0 alone
        if match[1] == "sm" and (built == cc if exact else built[0] == cc[0] and built <= cc):
            return []
        if match[1] == "compute" and built <= cc:
            return []
    return [
        Finding(
            Severity.ERROR,
            "cuda.runtime_arch",
            f"{facts.runtime} has kernels for {', '.join(archs)}; this GPU is {facts.label}",
            "With no binary and no older PTX for this GPU, the first kernel fails with 'no kernel "
            "image is available for execution on the device' (cudaErrorNoKernelImageForDevice, "
            "209).",
            f"install a {facts.runtime.split()[0]} build whose arch list includes "
            f"sm_{cc[0]}{cc[1]} (torch.cuda.get_arch_list() shows it; newer GPUs need newer "
            "wheels)",
            facts.name,
        )
    ]


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity is Severity.ERROR]
