"""The compatibility doctor: ``compat``'s rules over a whole host and the models meant for it.

``diagnose`` is pure: facts (``gpu.facts``: the host, its runtimes and tools, the models) in,
findings out, each host-level finding once. It places nothing (``allocation`` does).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from gpufleet.gpu.compat import (
    DeviceFacts,
    Finding,
    Severity,
    check_driver_runtime,
    check_model,
    check_mps,
    check_runtime_arch,
    check_sharing,
    fmt,
)
from gpufleet.gpu.discovery import GpuInfo, HostInfo
from gpufleet.gpu.facts import MPS_CONTROL, HostTools, ModelCheck, Runtime

# check_model repeats the driver rule per device; the doctor reports it once for the host.
_HOST_CHECKS = {
    "cuda.driver_older_than_runtime",
    "cuda.minor_version_compat",
    "cuda.major_versions_apart",
}


def diagnose(
    host: HostInfo,
    runtimes: list[Runtime],
    models: list[ModelCheck],
    *,
    tools: HostTools | None = None,
) -> list[Finding]:
    """Every finding for this host and these models: host first, then each model."""
    tools = tools or HostTools()
    groups = gpu_groups(host)
    out = _host_findings(host, runtimes, tools, groups, models)
    for model in models:
        out += _model_findings(model, host, groups, runtimes)
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for f in out:
        key = (f.check, f.subject, f.found)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def counts(findings: list[Finding]) -> tuple[int, int]:
    """(errors, warnings)."""
    return (
        sum(f.severity is Severity.ERROR for f in findings),
        sum(f.severity is Severity.WARNING for f in findings),
    )


def gpu_groups(host: HostInfo) -> list[tuple[str, list[GpuInfo]]]:
    """GPUs that the rules cannot tell apart, together: eight H100s are checked once, as
    ``GPU 0-7 NVIDIA H100 80GB HBM3``."""
    groups: dict[tuple[Any, ...], list[GpuInfo]] = {}
    for gpu in host.gpus:
        key = (gpu.name, gpu.capability, gpu.memory_total_mib, gpu.compute_mode, gpu.mig_mode)
        groups.setdefault(key, []).append(gpu)
    return [(f"GPU {_ids(gpus, '-')} {gpus[0].name}", gpus) for gpus in groups.values()]


def _ids(gpus: list[GpuInfo], sep: str = ",") -> str:
    idx = [g.index for g in gpus]
    if sep == "-" and len(idx) > 1 and idx == list(range(idx[0], idx[-1] + 1)):
        return f"{idx[0]}-{idx[-1]}"
    return ",".join(str(i) for i in idx)


def _host_findings(
    host: HostInfo,
    runtimes: list[Runtime],
    tools: HostTools,
    groups: list[tuple[str, list[GpuInfo]]],
    models: list[ModelCheck],
) -> list[Finding]:
    if not host.gpus:
        present = [*tools.devices, *([tools.nvidia_smi] if tools.nvidia_smi else [])]
        if host.error and present:
            return [
                Finding(
                    Severity.ERROR,
                    "host.nvml",
                    f"NVML failed: {host.error}",
                    f"This host has NVIDIA devices or tools ({', '.join(present)}) but NVML "
                    "cannot read them: gpufleet sees no GPU and runs workers on CPU slots.",
                    _nvml_fix(host.error),
                    "host",
                )
            ]
        return [
            Finding(
                Severity.INFO,
                "host.no_gpu",
                "no NVIDIA GPU" + (f" ({host.error})" if host.error else ""),
                "Without a GPU, gpufleet runs workers on CPU slots.",
                "nothing, for CPU serving; for GPUs install the NVIDIA driver and nvidia-ml-py",
                "host",
            )
        ]
    driver = f"driver {host.driver_version}"
    listed = "; ".join(
        f"{r.name} ({f'CUDA {fmt(r.cuda)}' if r.cuda else 'no CUDA'})" for r in runtimes
    )
    listed = listed or "none found"
    drv_cuda = fmt(host.driver_cuda) if host.driver_cuda else "unknown"
    out = [_info("host.driver", f"{driver} supports CUDA up to {drv_cuda}; runtimes: {listed}")]
    for label, gpus in groups:
        g = gpus[0]
        mig = {None: "no MIG", False: "MIG off", True: "MIG on"}[g.mig_mode]
        summary = f"compute capability {fmt(g.capability)} ({g.family}), "
        summary += f"{g.memory_total_gb:.1f} GiB, compute mode {g.compute_mode}, {mig}"
        out.append(_info("host.gpu", summary, label))
        if g.compute_mode in ("exclusive_process", "exclusive_thread"):
            out.append(
                Finding(
                    Severity.INFO,
                    "sharing.exclusive_process",
                    f"{label} is in compute mode {g.compute_mode}",
                    "One process at a time may hold a CUDA context on it: what NVIDIA "
                    "recommends with MPS (the server is that process); without MPS, a second "
                    "worker or a --standby process fails with 'CUDA-capable device(s) is/are "
                    "busy or unavailable'.",
                    f"keep it for mode mps; for mode fraction set DEFAULT (nvidia-smi -i "
                    f"{_ids(gpus)} -c DEFAULT, as root)",
                    label,
                )
            )
    used = {"torch"} | {m.runtime for m in models if m.mode != "none"}
    out += [_no_cuda(f, None, host, "host") for f in sorted(used - {r.family for r in runtimes})]
    for rt in runtimes:
        if rt.cuda is None:
            if rt.family in used:
                out.append(_no_cuda(rt.family, rt, host, "host"))
            continue
        facts = DeviceFacts(
            "cuda",
            driver,
            driver_version=host.driver_version,
            driver_cuda=host.driver_cuda,
            runtime_cuda=rt.cuda,
            runtime=rt.name,
        )
        out += check_driver_runtime(facts)
        for label, gpus in groups:
            gpu_facts = replace(
                host.facts(gpus[0], runtime_cuda=rt.cuda, runtime=rt.name), name=label
            )
            out += check_runtime_arch(list(rt.archs), gpu_facts)
    mps = [m.subject for m in models if m.mode == "mps"]
    if mps and tools.mps_control is None:
        out.append(
            Finding(
                Severity.ERROR,
                "mps.control_missing",
                f"{', '.join(mps)} {'asks' if len(mps) == 1 else 'ask'} for mode mps; "
                f"{MPS_CONTROL} is not on PATH",
                "gpufleet starts an MPS control daemon per GPU for mode mps; without the "
                "program its workers cannot start.",
                f"install the NVIDIA driver's utilities that hold {MPS_CONTROL} (e.g. "
                "nvidia-compute-utils), or use mode fraction",
                "host",
            )
        )
    return out


def _info(check: str, found: str, subject: str = "host") -> Finding:
    return Finding(Severity.INFO, check, found, "", "", subject)


def _nvml_fix(error: str) -> str:
    from gpufleet.gpu.cuda_errors import explain

    known = explain(error)
    if known is not None:
        return known.fix
    return (
        "make nvidia-smi work on this host (driver installed and loaded, /dev/nvidia* readable "
        "by this user, nvidia-ml-py installed), then run gpufleet doctor again"
    )


def _no_cuda(family: str, rt: Runtime | None, host: HostInfo, subject: str) -> Finding:
    what = f"{rt.name}: no usable CUDA build" if rt else f"no CUDA build of {family} found"
    most = f"cu{host.driver_cuda[0]}{host.driver_cuda[1]}" if host.driver_cuda else "the driver's"
    how = {
        "torch": "pip install torch --index-url https://download.pytorch.org/whl/cuXYZ, cuXYZ at "
        f"most {most}",
        "onnxruntime": "pip install onnxruntime-gpu, a build for the driver's CUDA major",
    }.get(family, f"a build for CUDA up to {most}")
    return Finding(
        Severity.WARNING,
        "runtime.no_cuda",
        what,
        f"Models that load with {family} cannot use this host's GPUs.",
        f"install a CUDA build of {family} that the driver supports ({how})",
        subject,
    )


def _model_findings(
    model: ModelCheck,
    host: HostInfo,
    groups: list[tuple[str, list[GpuInfo]]],
    runtimes: list[Runtime],
) -> list[Finding]:
    subject = model.subject
    if model.mode == "none" or not host.gpus:
        cpu = check_model(
            subject=subject,
            precision=model.precision,
            cuda=model.cuda,
            archs=list(model.archs),
            facts=DeviceFacts("cpu"),
        )
        cpu = [replace(f, subject=f"{subject} on CPU") for f in cpu]
        return cpu or [_info("model.ok", f"{model.precision}: runs on CPU slots", subject)]
    family = [r for r in runtimes if r.family == model.runtime]
    rt = next((r for r in family if r.cuda), family[0] if family else None)
    out = []
    if rt is None or rt.cuda is None:
        out.append(_no_cuda(model.runtime, rt, host, "host"))
    usable: list[GpuInfo] = []
    skipped: list[Finding] = []
    for label, gpus in groups:
        where = f"{subject} on {label}"
        facts = replace(
            host.facts(
                gpus[0],
                runtime_cuda=rt.cuda if rt else None,
                runtime=rt.name if rt else model.runtime,
            ),
            name=label,
        )
        sharing = check_sharing(
            model.mode,
            compute_mode=gpus[0].compute_mode,
            mig=gpus[0].mig_mode,
            facts=facts,
            subject=subject,
            ids=_ids(gpus),
        )
        if any(f.severity is Severity.ERROR for f in sharing):
            skipped += [replace(f, subject=where) for f in sharing]
            continue
        usable += gpus
        found = check_model(
            subject=subject,
            precision=model.precision,
            cuda=model.cuda,
            archs=list(model.archs),
            facts=facts,
        )
        if model.mode == "mps":
            found += check_mps(facts, memory_limit=model.memory_gb is not None, subject=subject)
        found += _memory(model, gpus[0], label)
        out += [
            replace(f, subject=where) for f in [*sharing, *found] if f.check not in _HOST_CHECKS
        ]
    if not usable:
        out += skipped  # the reasons no GPU can take it, as errors
    else:
        out += [
            replace(f, severity=Severity.INFO, why=f"{f.why} It runs on the other GPUs.")
            for f in skipped
        ]
    if model.mode == "whole" and usable and model.count > len(usable):
        out.append(
            Finding(
                Severity.ERROR,
                "model.gpu_count",
                f"{subject} asks for {model.count} whole GPUs; this host has {len(usable)} it "
                f"can use (of {len(host.gpus)})",
                "A worker of mode whole needs count GPUs of its own: it would never be placed.",
                f"lower resources.gpu.count to {len(usable)} or less, or serve it on a host "
                f"with {model.count} GPUs",
                subject,
            )
        )
    if not any(f.severity is not Severity.INFO for f in out):
        where = ", ".join(label for label, gpus in groups if gpus[0] in usable)
        out.append(_info("model.ok", f"{_describe(model)}: fits {where}", subject))
    return out


def _describe(model: ModelCheck) -> str:
    if model.mode == "whole":
        return f"{model.count} whole GPU{'s' * (model.count > 1)}, {model.precision}"
    return (
        f"mode {model.mode}, {model.memory_gb:g} GB and {model.compute_percent}% of a GPU, "
        f"{model.precision}"
    )


def _memory(model: ModelCheck, gpu: GpuInfo, label: str) -> list[Finding]:
    total = gpu.memory_total_gb
    if model.memory_gb is not None and model.memory_gb > total:
        return [
            Finding(
                Severity.ERROR,
                "model.memory",
                f"{model.subject} asks for memory_gb {model.memory_gb:g}; {label} has "
                f"{total:.1f} GiB",
                "A share of mode fraction or mps lives on one GPU: it would never be placed.",
                f"lower resources.gpu.memory_gb to at most {int(total)} (measure vram_peak_gb), "
                "or use mode whole",
                model.subject,
            )
        ]
    limit = model.memory_gb if model.memory_gb is not None else total * model.count
    if model.vram_peak_gb is not None and model.vram_peak_gb > limit:
        return [
            Finding(
                Severity.WARNING,
                "model.vram_peak",
                f"{model.subject} peaked at {model.vram_peak_gb:g} GB (metrics.vram_peak_gb); "
                f"it gets {limit:g} GB on {label}",
                "Its measured peak does not fit: expect CUDA out of memory at its largest batches.",
                "raise resources.gpu.memory_gb, or lower max_batch_size and measure again",
                model.subject,
            )
        ]
    return []
