"""The ``model.yaml`` schema: every section, its defaults, and errors that name their path.

``ModelManifest.from_yaml`` reads a file and raises one ``InvalidInput`` listing every problem
as ``model.compatibility.cuda: '>=12.x' is not a version range``. Unknown keys are refused
(a typo in ``max_batch_size`` must not silently fall back to a default). This module only
describes; loading, packaging and device checks live in ``directory``, ``registry`` and
``gpufleet.gpu.compat``.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gpufleet.errors import InvalidInput

MODEL_FILE = "model.yaml"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$"


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Section):
    path: str = Field(min_length=1)

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        pure = PurePosixPath(value)
        if pure.is_absolute() or ".." in pure.parts or "\\" in value:
            raise ValueError(f"{value!r} must be a relative path inside the model directory")
        return str(pure)


class BatchingSpec(_Section):
    max_batch_size: int | None = Field(default=None, ge=1, le=1024)
    max_queue_delay_ms: float | None = Field(default=None, ge=0, le=60_000)


class GpuSpec(_Section):
    """How a worker of this model takes a GPU (see ``gpufleet.gpu``).

    ``none``: CPU only. ``whole``: ``count`` whole GPUs. ``fraction``: ``memory_gb`` and
    ``compute_percent`` of one GPU, enforced by the worker. ``mps``: the same limits enforced by
    the driver through NVIDIA MPS.
    """

    mode: Literal["none", "whole", "fraction", "mps"] = "whole"
    count: int | None = Field(default=None, ge=1, le=64)
    memory_gb: float | None = Field(default=None, gt=0, le=4096)
    compute_percent: int | None = Field(default=None, ge=1, le=100)

    @model_validator(mode="after")
    def _fields_of_mode(self) -> GpuSpec:
        if self.mode in ("none", "whole"):
            extra = [f for f in ("memory_gb", "compute_percent") if getattr(self, f) is not None]
            if extra:
                raise ValueError(
                    f"{' and '.join(extra)} only apply to mode fraction or mps, not {self.mode}"
                )
            if self.mode == "none" and self.count is not None:
                raise ValueError("count only applies to mode whole")
        else:
            if self.count is not None:
                raise ValueError(f"count only applies to mode whole, not {self.mode}")
            missing = [f for f in ("memory_gb", "compute_percent") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"mode {self.mode} needs {' and '.join(missing)}")
        return self

    @property
    def gpus(self) -> int:
        return 0 if self.mode == "none" else (self.count or 1)


class ResourcesSpec(_Section):
    gpu: GpuSpec = GpuSpec()


class MetricsSpec(_Section):
    """What the model measured at release: perf gates compare new versions against these."""

    token_rate_tok_s: float | None = Field(default=None, ge=0)
    throughput_rps: float | None = Field(default=None, ge=0)
    latency_p50_ms: float | None = Field(default=None, ge=0)
    latency_p95_ms: float | None = Field(default=None, ge=0)
    vram_peak_gb: float | None = Field(default=None, ge=0)


_ARCH = re.compile(r"^(?:sm_?)?(\d{1,2})\.?(\d)$")


class CompatibilitySpec(_Section):
    """``cuda``: the CUDA versions the model was built and tested for, a range such as
    ``>=12.2,<13``; ``arch``: the compute capabilities its kernels were compiled for."""

    cuda: str | None = None
    arch: list[str] | None = None

    @field_validator("cuda")
    @classmethod
    def _range(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            spec = SpecifierSet(value)
        except InvalidSpecifier:
            raise ValueError(
                f"{value!r} is not a version range (write e.g. '>=12.2' or '>=11.8,<13')"
            ) from None
        if not len(spec):
            raise ValueError(f"{value!r} is not a version range (write e.g. '>=12.2')")
        return str(value)

    @field_validator("arch")
    @classmethod
    def _archs(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        out = []
        for item in value:
            match = _ARCH.match(str(item))
            if not match:
                raise ValueError(
                    f"{item!r} is not a compute capability (write e.g. '8.0', '8.9' or 'sm_90')"
                )
            out.append(f"{match[1]}.{match[2]}")
        return out

    def cuda_range(self) -> SpecifierSet | None:
        return SpecifierSet(self.cuda) if self.cuda else None

    def capabilities(self) -> list[tuple[int, int]]:
        return [(int(a.split(".")[0]), int(a.split(".")[1])) for a in self.arch or []]


class ModelSpec(_Section):
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    format: Literal["hf", "onnx", "torchscript", "python"]
    runtime: str | None = None
    entry: str | None = None
    task: str | None = None
    precision: Precision = Precision.FP32
    description: str = ""
    # One input that works as is: published by GET /v1/models, and for torchscript models the
    # dtypes of the inputs (whole numbers: int64).
    example_input: Any = None
    # JSON Schema of one input: published by GET /v1/models and checked at submit. It replaces
    # what the code publishes (a python class's input_model, a tensor model's shapes).
    input_schema: dict[str, Any] | None = None
    files: list[FileEntry] = []
    batching: BatchingSpec | None = None
    resources: ResourcesSpec = ResourcesSpec()
    metrics: MetricsSpec = MetricsSpec()
    compatibility: CompatibilitySpec = CompatibilitySpec()

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        # YAML reads `version: 2` as an int (harmless) but `version: 1.10` as the float 1.1.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, float):
            raise ValueError(f'quote the version: YAML read it as the number {value}, write "..."')
        if isinstance(value, str) and value.startswith("sha256"):
            raise ValueError("a version must not look like a digest")
        return value

    @field_validator("input_schema")
    @classmethod
    def _json_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if not value:
            return value
        import jsonschema  # only for a model.yaml that has a schema

        validator = jsonschema.validators.validator_for(
            value, default=jsonschema.Draft202012Validator
        )
        try:
            validator.check_schema(value)
        except jsonschema.SchemaError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "the top"
            raise ValueError(
                f"not valid JSON Schema: {exc.message} (at {where}); see https://json-schema.org"
            ) from None
        return value

    @model_validator(mode="after")
    def _format_fields(self) -> ModelSpec:
        if self.format == "python":
            if not self.runtime:
                raise ValueError(
                    "format python needs runtime: 'python:package.module:ClassName' "
                    "or 'python:file.py:ClassName' (relative to the model directory)"
                )
        elif self.runtime:
            raise ValueError(f"runtime only applies to format python, not {self.format}")
        if self.task and self.format != "hf":
            raise ValueError(f"task only applies to format hf, not {self.format}")
        return self


_GATE = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*(>=|<=|>|<|==)\s*(-?\d+(?:\.\d+)?)\s*$")
GATE_METRICS = frozenset(
    {
        "perf_token_rate",
        "throughput_rps",
        "latency_p50_ms",
        "latency_p95_ms",
        "latency_p99_ms",
        "vram_headroom_gb",
        "vram_peak_gb",
        "error_rate",
    }
)


class Gate(_Section):
    """One promotion test: ``smoke``, or ``METRIC OP NUMBER`` such as ``latency_p95_ms <= 1200``."""

    metric: str
    op: Literal[">=", "<=", ">", "<", "=="] | None = None
    value: float | None = None

    @classmethod
    def parse(cls, text: str) -> Gate:
        if text.strip() == "smoke":
            return cls(metric="smoke")
        match = _GATE.match(text)
        if not match:
            raise ValueError(
                f"{text!r} is not a test: write 'smoke' or 'METRIC OP NUMBER', "
                "e.g. 'latency_p95_ms <= 1200'"
            )
        metric, op, number = match.groups()
        if metric not in GATE_METRICS:
            raise ValueError(
                f"{text!r}: unknown metric {metric!r}; known: {', '.join(sorted(GATE_METRICS))}"
            )
        return cls(metric=metric, op=op, value=float(number))

    def __str__(self) -> str:
        return self.metric if self.op is None else f"{self.metric} {self.op} {self.value:g}"


class RollbackSlo(_Section):
    latency_p95_ms: float | None = Field(default=None, gt=0)
    error_rate: float | None = Field(default=None, ge=0, le=100)  # percent of tasks


class RolloutSpec(_Section):
    strategy: Literal["canary", "blue_green"] = "canary"
    canary_traffic: float = Field(default=0.05, gt=0, le=1)
    rollback_slo: RollbackSlo = RollbackSlo()


def _gate_from_text(value: Any) -> Any:
    return Gate.parse(value) if isinstance(value, str) else value


class PromoteSpec(_Section):
    tests: list[Annotated[Gate, BeforeValidator(_gate_from_text)]] = []
    rollout: RolloutSpec = RolloutSpec()


class ModelManifest(_Section):
    """A whole ``model.yaml``."""

    model: ModelSpec
    promote: PromoteSpec = PromoteSpec()

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelManifest:
        """Read and validate ``path`` (a ``model.yaml`` or the directory holding one)."""
        file = Path(path)
        if file.is_dir():
            file = file / MODEL_FILE
        if not file.is_file():
            raise InvalidInput(
                f"{file} not found: a model directory needs a model.yaml "
                "(model: {name, version, format, ...})",
                path=str(file),
            )
        try:
            with file.open(encoding="utf-8") as stream:  # a stream: YAML's errors name the file
                data = yaml.safe_load(stream)
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{file} is not valid YAML: {exc}", path=str(file)) from exc
        return cls.from_data(data, source=str(file))

    @classmethod
    def from_data(cls, data: Any, *, source: str = MODEL_FILE) -> ModelManifest:
        if not isinstance(data, dict):
            raise InvalidInput(
                f"{source}: (top level): must be a mapping with a 'model:' section", path=source
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = manifest_problems(exc)
            raise InvalidInput(
                f"{source}: " + "; ".join(problems),
                path=source,
                field=problems[0].split(":")[0],
                problems=problems,
            ) from exc

    def to_data(self) -> dict[str, Any]:
        """Plain data (what the registry stores as the artifact's config), defaults included."""
        data = self.model_dump(mode="json")
        if data["model"]["input_schema"] is None:
            # Left out, as before the field existed: a version packaged then must keep the
            # same config digest, or re-packaging it would be refused as other content.
            del data["model"]["input_schema"]
        data["promote"]["tests"] = [str(g) for g in self.promote.tests]
        return data


def manifest_problems(exc: ValidationError) -> list[str]:
    """Each error as ``dotted.path: message``, in the words a person fixing the file needs."""
    out = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"]) or "(top level)"
        kind = error["type"]
        message = str(error["msg"]).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            message = "unknown key (check its spelling and indentation)"
        elif kind == "missing":
            message = "required"
        elif kind == "string_pattern_mismatch":
            message = f"{error['input']!r} is not allowed here ({_pattern_hint(loc)})"
        elif kind not in ("value_error", "assertion_error"):
            message += f" (got {error['input']!r})"
        out.append(f"{loc}: {message}")
    return out


def _pattern_hint(loc: str) -> str:
    if loc.endswith("name"):
        return "lower-case letters, digits, '.', '_' and '-', up to 64, starting alnum"
    return "letters, digits, '.', '_', '+' and '-', up to 64, starting alnum"
