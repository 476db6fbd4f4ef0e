"""The facts ``gpufleet.gpu.compat`` needs about the device a worker is about to load onto.

Asked of torch, in the worker process that will use the device (so ``CUDA_VISIBLE_DEVICES``
numbering applies). Without torch, a CUDA device's facts are unknown and the rules that need
them are skipped rather than guessed.
"""

from __future__ import annotations

import shutil
import subprocess

from gpufleet.gpu.compat import DeviceFacts


def facts_for_device(device: str) -> DeviceFacts:
    """``"cpu"`` or ``"cuda:N"``; never raises for a missing or broken CUDA stack."""
    if not device.startswith("cuda"):
        return DeviceFacts(kind="cpu")
    try:
        import torch
    except ImportError:
        return DeviceFacts(kind="cuda", name=device, runtime="none")
    index = int(device.partition(":")[2] or 0)
    runtime_cuda = None
    if torch.version.cuda:
        major, _, minor = str(torch.version.cuda).partition(".")
        runtime_cuda = (int(major), int(minor.split(".")[0] or 0))
    try:
        capability = tuple(torch.cuda.get_device_capability(index))
        name = str(torch.cuda.get_device_name(index))
        raw = int(torch._C._cuda_getDriverVersion())  # type: ignore[attr-defined]  # 13000: 13.0
        driver_cuda = (raw // 1000, (raw % 1000) // 10) if raw > 0 else None
    except Exception:  # no driver, no device: the load itself will say so
        return DeviceFacts(
            kind="cuda", name=device, runtime_cuda=runtime_cuda, runtime=_runtime_label()
        )
    return DeviceFacts(
        kind="cuda",
        name=name,
        capability=(int(capability[0]), int(capability[1])),
        driver_version=_driver_version(),
        driver_cuda=driver_cuda,
        runtime_cuda=runtime_cuda,
        runtime=_runtime_label(),
    )


def _runtime_label() -> str:
    import torch

    return f"torch {torch.__version__}"


def _driver_version() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.strip().splitlines()
    return lines[0].strip() if lines else None
