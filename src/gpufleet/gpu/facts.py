"""The facts the doctor reasons over: a host (NVML's ``HostInfo``, the CUDA runtimes torch and
onnxruntime were built for, the NVIDIA tools on PATH) and what each model asks for. Saved and
loaded as JSON (``gpufleet doctor --save-facts`` / ``--facts``) so a host can be diagnosed
elsewhere. Gathering them is ``cli.doctor``'s job; nothing here touches a GPU.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpufleet.errors import InvalidInput
from gpufleet.gpu.compat import Capability, fmt, parse_version
from gpufleet.gpu.discovery import HostInfo

if TYPE_CHECKING:
    from gpufleet.models.manifest import ModelSpec

FACTS_FORMAT = "gpufleet-doctor-facts/1"
MPS_CONTROL = "nvidia-cuda-mps-control"


@dataclass(frozen=True)
class Runtime:
    """A library that runs models on the GPU, and the CUDA it was built for."""

    name: str  # "torch 2.11.0+cu130"
    cuda: Capability | None = None  # None: a build without CUDA
    archs: tuple[str, ...] = ()  # torch.cuda.get_arch_list(): "sm_90", "compute_90", ...

    @property
    def family(self) -> str:
        return self.name.split()[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cuda": fmt(self.cuda) if self.cuda else None,
            "archs": list(self.archs),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Runtime:
        cuda = data.get("cuda")
        return cls(
            str(data["name"]),
            parse_version(str(cuda)) if cuda else None,
            tuple(str(a) for a in data.get("archs", [])),
        )


@dataclass(frozen=True)
class HostTools:
    """NVIDIA programs and device files found on the host (by the gatherer, not the rules)."""

    nvidia_smi: str | None = None
    mps_control: str | None = None
    devices: tuple[str, ...] = ()  # /dev/nvidia0, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"devices": list(self.devices)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HostTools:
        return cls(data.get("nvidia_smi"), data.get("mps_control"), tuple(data.get("devices", [])))


@dataclass(frozen=True)
class ModelCheck:
    """What the rules need of one model's ``model.yaml``."""

    subject: str  # "name@version"
    precision: str = "fp32"
    cuda: str | None = None  # compatibility.cuda, a version range
    archs: tuple[Capability, ...] = ()
    mode: str = "whole"  # resources.gpu.mode
    count: int = 1
    memory_gb: float | None = None
    compute_percent: int | None = None
    vram_peak_gb: float | None = None  # metrics.vram_peak_gb, measured at release
    runtime: str = "torch"  # the runtime family its format loads with

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ModelCheck:
        gpu = spec.resources.gpu
        return cls(
            subject=f"{spec.name}@{spec.version}",
            precision=spec.precision.value,
            cuda=spec.compatibility.cuda,
            archs=tuple(spec.compatibility.capabilities()),
            mode=gpu.mode,
            count=gpu.count or 1,
            memory_gb=gpu.memory_gb,
            compute_percent=gpu.compute_percent,
            vram_peak_gb=spec.metrics.vram_peak_gb,
            runtime="onnxruntime" if spec.format == "onnx" else "torch",
        )


@dataclass(frozen=True)
class HostFacts:
    """Everything ``diagnose`` needs to know of a host: what ``--save-facts`` writes."""

    host: HostInfo
    runtimes: tuple[Runtime, ...] = ()
    tools: HostTools = HostTools()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FACTS_FORMAT,
            "host": self.host.to_dict(),
            "runtimes": [r.to_dict() for r in self.runtimes],
            "tools": self.tools.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> HostFacts:
        if not isinstance(data, dict) or data.get("format") != FACTS_FORMAT:
            raise ValueError(f"not {FACTS_FORMAT} (write it with gpufleet doctor --save-facts)")
        return cls(
            HostInfo.from_dict(data["host"]),
            tuple(Runtime.from_dict(r) for r in data.get("runtimes", [])),
            HostTools.from_dict(data.get("tools", {})),
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> HostFacts:
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except OSError as exc:
            raise InvalidInput(f"cannot read facts file {path}: {exc.strerror}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(
                f"{path} is not a gpufleet doctor facts file ({type(exc).__name__}: {exc}); "
                "write one with gpufleet doctor --save-facts FILE"
            ) from exc
