"""The facts ``gpufleet.gpu.compat`` needs about the device a worker is about to load onto.

Asked of torch, in the worker process that will use the device (so ``CUDA_VISIBLE_DEVICES``
numbering applies). Without torch, a CUDA device's facts are unknown and the rules that need
them are skipped rather than guessed.
"""

from __future__ import annotations

import re
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
    except Exception:  # no driver, no device: the load itself will say so
        return DeviceFacts(
            kind="cuda", name=device, runtime_cuda=runtime_cuda, runtime=_runtime_label()
        )
    driver_version, driver_cuda = _driver()
    return DeviceFacts(
        kind="cuda",
        name=name,
        capability=(int(capability[0]), int(capability[1])),
        driver_version=driver_version,
        driver_cuda=driver_cuda,
        runtime_cuda=runtime_cuda,
        runtime=_runtime_label(),
    )


def _runtime_label() -> str:
    import torch

    return f"torch {torch.__version__}"


def _driver() -> tuple[str | None, tuple[int, int] | None]:
    """The driver's version and the newest CUDA it supports, from ``nvidia-smi``'s header
    (``Driver Version: 580.65.06  CUDA Version: 13.0``)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, None
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    version = re.search(r"Driver Version:\s*([0-9.]+)", out)
    cuda = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", out)
    return (
        version[1] if version else None,
        (int(cuda[1]), int(cuda[2])) if cuda else None,
    )
