"""The labels a Kubernetes node with GPUs should carry, computed from ``HostInfo``, and their
output as JSON, YAML or a ``kubectl label`` command. Pure: nothing here touches a GPU.

Names follow NVIDIA GPU Feature Discovery (``nvidia.com/gpu.product``, ``gpu.memory`` in MiB,
``cuda.driver.*``, ``cuda.runtime.*`` = the driver's CUDA, …) with the same values GFD writes, so
selectors work whether GFD or gpufleet labelled the node; ``gpufleet.dev/*`` are integers and
short versions meant for node affinity (``Gt``/``Lt`` compare integer label values).
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Literal

import yaml

from gpufleet.gpu.compat import Capability, fmt
from gpufleet.gpu.discovery import GpuInfo, HostInfo, family

OutputFormat = Literal["json", "yaml", "kubectl"]
PREFIX = "gpufleet.dev/"
# The labels gpufleet owns: removed from a node that has no GPU any more (see ``kubectl_command``).
OWN_KEYS = (
    f"{PREFIX}cuda-major-version",
    f"{PREFIX}cuda-minor-version",
    f"{PREFIX}compute-capability",
    f"{PREFIX}gpu-memory-gb",
    f"{PREFIX}runtime-cuda-major-version",
    f"{PREFIX}runtime-cuda-minor-version",
)
MAX_VALUE = 63
VALUE_RE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def label_value(text: str) -> str:
    """``text`` as a valid Kubernetes label value: runs of blanks become ``-`` (as GFD writes
    ``NVIDIA-H100-80GB-HBM3``), other characters outside ``[A-Za-z0-9-_.]`` are dropped, it is
    cut to 63 characters and must begin and end with a letter or digit (may end up empty)."""
    words = re.sub(r"[^A-Za-z0-9\-_. ]", "", text).split()
    value = "-".join(words)[:MAX_VALUE]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def is_label_value(value: str) -> bool:
    return len(value) <= MAX_VALUE and VALUE_RE.fullmatch(value) is not None


def node_labels(host: HostInfo, *, runtime_cuda: Capability | None = None) -> dict[str, str]:
    """The labels for the node ``host`` describes.

    A node whose GPUs differ is labelled by its least capable GPU: the lowest compute capability
    (then the smallest memory) names the product, family and capability, and the memory labels
    carry the smallest GPU memory, so a pod that selects on them fits on any GPU of the node.
    ``nvidia.com/gpu.count`` counts them all; ``nvidia.com/mig.capable`` is ``true`` when any
    GPU has MIG (as GFD does).

    ``runtime_cuda``: the CUDA the serving runtime on this node was built with (torch's), when
    known; it adds ``gpufleet.dev/runtime-cuda-{major,minor}-version``. The driver's CUDA (the
    newest a container may bring) is ``gpufleet.dev/cuda-{major,minor}-version``.

    No GPU: ``{}``, as GFD writes nothing then. ``nvidia.com/gpu.present`` belongs to the GPU
    Operator, whose driver DaemonSet selects on it: a node without a loaded driver has no NVML,
    and marking it ``false`` from here would keep the driver from ever being installed.
    """
    if not host.gpus:
        return {}
    least = min(host.gpus, key=lambda g: (g.capability, g.memory_total_mib))
    memory_mib = min(g.memory_total_mib for g in host.gpus)
    labels = {
        "nvidia.com/gpu.count": str(len(host.gpus)),
        "nvidia.com/gpu.product": label_value(least.name),
        "nvidia.com/gpu.memory": str(memory_mib),
        "nvidia.com/mig.capable": _bool(any(g.mig_mode is not None for g in host.gpus)),
        **_capability_labels(least),
        **_driver_labels(host),
        # floor: never promise a pod more memory than the GPU has (invariant 5)
        f"{PREFIX}gpu-memory-gb": str(memory_mib // 1024),
    }
    if runtime_cuda is not None:
        labels[f"{PREFIX}runtime-cuda-major-version"] = str(runtime_cuda[0])
        labels[f"{PREFIX}runtime-cuda-minor-version"] = str(runtime_cuda[1])
    return {key: label_value(value) for key, value in labels.items()}


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _capability_labels(gpu: GpuInfo) -> dict[str, str]:
    if gpu.capability == (0, 0):  # NVML did not say: GFD leaves these out too
        return {}
    major, minor = gpu.capability
    return {
        "nvidia.com/gpu.family": family(gpu.capability),
        "nvidia.com/gpu.compute.major": str(major),
        "nvidia.com/gpu.compute.minor": str(minor),
        f"{PREFIX}compute-capability": fmt(gpu.capability),
    }


def _driver_labels(host: HostInfo) -> dict[str, str]:
    labels: dict[str, str] = {}
    if host.driver_version:
        # GFD's split: "580.159.04" -> 580, 159, "04" (the revision keeps its zero; may be "")
        major, minor, rev = [*host.driver_version.split(".", 2), "", ""][:3]
        labels |= {
            "nvidia.com/cuda.driver.major": major,
            "nvidia.com/cuda.driver.minor": minor,
            "nvidia.com/cuda.driver.rev": rev,
            "nvidia.com/cuda.driver-version.major": major,
            "nvidia.com/cuda.driver-version.minor": minor,
            "nvidia.com/cuda.driver-version.revision": rev,
            "nvidia.com/cuda.driver-version.full": host.driver_version,
        }
    if host.driver_cuda:
        cuda_major, cuda_minor = (str(n) for n in host.driver_cuda)
        labels |= {
            "nvidia.com/cuda.runtime.major": cuda_major,
            "nvidia.com/cuda.runtime.minor": cuda_minor,
            "nvidia.com/cuda.runtime-version.major": cuda_major,
            "nvidia.com/cuda.runtime-version.minor": cuda_minor,
            "nvidia.com/cuda.runtime-version.full": fmt(host.driver_cuda),
            f"{PREFIX}cuda-major-version": cuda_major,
            f"{PREFIX}cuda-minor-version": cuda_minor,
        }
    return labels


def format_labels(labels: dict[str, str], output: OutputFormat, *, node: str) -> str:
    """``labels`` as JSON, YAML (both a flat mapping, sorted) or one ``kubectl`` command."""
    ordered = dict(sorted(labels.items()))
    if output == "json":
        return json.dumps(ordered, indent=2) + "\n"
    if output == "yaml":
        # every value stays a string: "9.0" and "true" must not turn into a float and a bool
        text: str = yaml.safe_dump(ordered, default_flow_style=False, sort_keys=True)
        return text if ordered else "{}\n"
    return kubectl_command(ordered, node=node) + "\n"


def kubectl_command(labels: dict[str, str], *, node: str) -> str:
    """``kubectl label node NODE k=v … --overwrite``, quoted for a POSIX shell.

    With no labels (the node has no GPU) it removes gpufleet's own labels instead (``key-``), so
    a DaemonSet that runs it on every node stops gpufleet's GPU workers from being scheduled on
    a node that lost its GPU or driver; the ``nvidia.com/*`` labels are left to GFD and the GPU
    Operator."""
    if labels:
        args = [f"{k}={v}" for k, v in sorted(labels.items())] + ["--overwrite"]
    else:
        args = [f"{k}-" for k in OWN_KEYS]
    return shlex.join(["kubectl", "label", "node", node, *args])
