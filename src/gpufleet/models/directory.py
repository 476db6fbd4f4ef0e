"""Model directories: a folder with a ``model.yaml`` beside the model's files, loaded into a
``ModelRunner``; and the built-in models, which need no directory.

Only ``format: python`` loads for now; ``model.yaml``'s other fields (files, resources,
promote, ...) are accepted and left to the registry. Every mistake is an ``InvalidInput``
naming the file and the field.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gpufleet.errors import InvalidInput
from gpufleet.models.runtime import Batching, ModelInfo, ModelRunner

MODEL_FILE = "model.yaml"


class _BatchingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    max_batch_size: int | None = None
    max_queue_delay_ms: float | None = None


class _ModelSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    format: Literal["hf", "onnx", "torchscript", "python"]
    runtime: str | None = None
    description: str = ""
    batching: _BatchingSpec | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        # YAML reads `version: 2` as an int (harmless) but `version: 1.10` as the float 1.1.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, float):
            raise ValueError(f'quote the version: YAML read it as the number {value}, write "..."')
        return value


class _ModelFile(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: _ModelSpec


def load_model_dir(path: str | Path) -> ModelRunner:
    """The runner that ``path/model.yaml`` describes, named, versioned and batched as it says."""
    model_dir = Path(path)
    yaml_path = model_dir / MODEL_FILE
    spec = _read_spec(yaml_path)
    if spec.format != "python":
        raise _invalid(
            yaml_path,
            "model.format",
            f"format {spec.format!r} cannot be loaded yet; only 'python' is supported",
        )
    if not spec.runtime:
        raise _invalid(
            yaml_path,
            "model.runtime",
            "format 'python' needs runtime: 'python:package.module:ClassName' "
            "or 'python:file.py:ClassName' (relative to the model directory)",
        )
    runner_class = _import_runtime(model_dir, yaml_path, spec.runtime)
    runner: ModelRunner = _instantiate(runner_class, model_dir, yaml_path, spec.runtime)
    missing = [
        n for n in ("info", "batching", "load", "warmup", "predict") if not hasattr(runner, n)
    ]
    if (
        missing
        or not isinstance(runner.info, ModelInfo)
        or not isinstance(runner.batching, Batching)
    ):
        raise _invalid(
            yaml_path,
            "model.runtime",
            f"{spec.runtime} does not implement gpufleet.ModelRunner: it needs `info: ModelInfo`, "
            f"`batching: Batching`, load(), warmup() and predict()"
            + (f"; missing: {', '.join(missing)}" if missing else ""),
        )
    runner.info = replace(
        runner.info,
        name=spec.name,
        version=spec.version,
        description=spec.description or runner.info.description,
    )
    if spec.batching is not None:
        try:
            runner.batching = replace(
                runner.batching, **spec.batching.model_dump(exclude_none=True)
            )
        except ValueError as exc:
            raise _invalid(yaml_path, "model.batching", str(exc)) from exc
    return runner


def builtin_models() -> dict[str, Callable[[], ModelRunner]]:
    """Models that ship inside gpufleet, by name: no directory or download needed."""
    from gpufleet.models.demo import DigitsRunner

    return {"digits": DigitsRunner}


def _read_spec(yaml_path: Path) -> _ModelSpec:
    if not yaml_path.is_file():
        raise InvalidInput(
            f"{yaml_path} not found: a model directory needs a model.yaml "
            "(model: {name, version, format, runtime})",
            path=str(yaml_path),
        )
    try:
        with yaml_path.open(encoding="utf-8") as stream:  # a stream: YAML's errors name the file
            data = yaml.safe_load(stream)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{yaml_path} is not valid YAML: {exc}", path=str(yaml_path)) from exc
    if not isinstance(data, dict):
        raise _invalid(yaml_path, "(top level)", "must be a mapping with a 'model:' section")
    try:
        return _ModelFile.model_validate(data).model
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
            + ("" if e["type"] == "missing" else f" (got {e['input']!r})")
            for e in errors
        )
        raise InvalidInput(
            f"{yaml_path}: {problems}",
            path=str(yaml_path),
            field=".".join(map(str, errors[0]["loc"])),
        ) from exc


def _import_runtime(model_dir: Path, yaml_path: Path, runtime: str) -> type:
    scheme, _, rest = runtime.partition(":")
    target, _, class_name = rest.rpartition(":")
    if scheme != "python" or not target or not class_name:
        raise _invalid(
            yaml_path,
            "model.runtime",
            f"expected 'python:package.module:ClassName' or 'python:file.py:ClassName', "
            f"got {runtime!r}",
        )
    try:
        module = (
            _import_file(model_dir, target)
            if target.endswith(".py")
            else (importlib.import_module(target))
        )
    except Exception as exc:
        raise _invalid(
            yaml_path, "model.runtime", f"cannot import {target!r}: {type(exc).__name__}: {exc}"
        ) from exc
    runner_class = getattr(module, class_name, None)
    if not inspect.isclass(runner_class):
        raise _invalid(
            yaml_path, "model.runtime", f"{target!r} has no class {class_name!r} ({runtime!r})"
        )
    return runner_class


def _import_file(model_dir: Path, relative: str) -> ModuleType:
    """Import a runner file of the model directory under a name unique to its path."""
    file = (model_dir / relative).resolve()
    if not file.is_relative_to(model_dir.resolve()):
        raise ImportError(f"{relative} is outside the model directory")
    if not file.is_file():
        raise FileNotFoundError(f"no file {file}")
    name = "gpufleet_model_" + hashlib.sha256(str(file).encode()).hexdigest()[:16]
    module_spec = importlib.util.spec_from_file_location(name, file)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load {file} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _instantiate(runner_class: type, model_dir: Path, yaml_path: Path, runtime: str) -> Any:
    """``Class(model_dir)`` when the constructor takes an argument, else ``Class()``."""
    try:
        inspect.signature(runner_class).bind(model_dir)
        args: tuple[Path, ...] = (model_dir,)
    except (TypeError, ValueError):  # takes no argument, or has no signature to inspect
        args = ()
    try:
        return runner_class(*args)
    except Exception as exc:
        raise _invalid(
            yaml_path, "model.runtime", f"creating {runtime} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _invalid(yaml_path: Path, field: str, problem: str) -> InvalidInput:
    return InvalidInput(f"{yaml_path}: {field}: {problem}", path=str(yaml_path), field=field)
