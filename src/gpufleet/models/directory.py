"""Model directories: a folder with a ``model.yaml`` beside the model's files, loaded into a
``ModelRunner``; and the built-in models, which need no directory.

``format: python`` imports the class named by ``runtime``, which needs only ``predict``:
name, version, description, batching, input schema and example come from ``model.yaml``
(class values are defaults). The other formats are built by ``gpufleet.models.formats``.
Every mistake is an ``InvalidInput`` naming the file and the field.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

from gpufleet.errors import InvalidInput
from gpufleet.models.manifest import MODEL_FILE, ModelManifest, ModelSpec
from gpufleet.models.runtime import Batching, ModelInfo, ModelRunner


def load_model_dir(path: str | Path, manifest: ModelManifest | None = None) -> ModelRunner:
    """The runner that ``path/model.yaml`` describes, named, versioned and batched as it says.

    Reads the manifest and imports code; loads no weights (``runner.load`` does).
    """
    model_dir = Path(path)
    yaml_path = model_dir / MODEL_FILE
    manifest = manifest or ModelManifest.from_yaml(yaml_path)
    spec = manifest.model
    if spec.format != "python":
        from gpufleet.models.formats import create_runner

        built = create_runner(
            model_dir,
            format=spec.format,
            name=spec.name,
            version=spec.version,
            description=spec.description,
            precision=spec.precision.value,
            entry=spec.entry,
            task=spec.task,
            example_input=spec.example_input,
            batching=_batching(Batching(max_batch_size=8, max_queue_delay_ms=5), spec, yaml_path)
            if spec.batching
            else None,
        )
        if spec.input_schema:
            built.info = replace(built.info, input_schema=spec.input_schema)
        return built
    assert spec.runtime is not None  # the schema requires it for format python
    runner_class = _import_runtime(model_dir, yaml_path, spec.runtime)
    runner: Any = _instantiate(runner_class, model_dir, yaml_path, spec.runtime)
    predict = getattr(runner_class, "predict", None)
    if not callable(predict) or predict is ModelRunner.predict:
        raise _invalid(
            yaml_path,
            "model.runtime",
            f"{spec.runtime} does not implement gpufleet.ModelRunner: it has no "
            "predict(self, inputs) method; define one that takes a list of inputs and returns "
            "one output per input (subclass gpufleet.Model for the rest)",
        )
    for name, default in (("load", _no_load), ("warmup", _no_warmup)):
        if not callable(getattr(runner, name, None)):  # optional in the contract
            setattr(runner, name, default)
    code_info = getattr(runner, "info", None)
    code_info = code_info if isinstance(code_info, ModelInfo) else ModelInfo(spec.name, "")
    code_batching = getattr(runner, "batching", None)
    code_batching = code_batching if isinstance(code_batching, Batching) else Batching()
    info = replace(
        code_info,
        name=spec.name,
        version=spec.version,
        description=spec.description or code_info.description,
        input_schema=spec.input_schema
        or _input_model_schema(runner, yaml_path, spec.runtime)
        or code_info.input_schema,
        example_input=code_info.example_input if spec.example_input is None else spec.example_input,
    )
    try:
        runner.info = info
        runner.batching = _batching(code_batching, spec, yaml_path)
    except AttributeError as exc:  # a read-only property or __slots__ without them
        raise _invalid(
            yaml_path,
            "model.runtime",
            f"{spec.runtime}: cannot set its info / batching ({exc}); make them plain "
            "attributes, or leave them out and let model.yaml give them",
        ) from exc
    checked: ModelRunner = runner
    return checked


def _no_load(device: str) -> None:
    """``load`` of a class without one: its weights (if any) came with the constructor."""


def _no_warmup() -> None:
    """``warmup`` of a class without one."""


def _input_model_schema(runner: Any, yaml_path: Path, runtime: str) -> dict[str, Any]:
    """The JSON Schema of the class's ``input_model`` (a pydantic model), {} without one."""
    input_model = getattr(runner, "input_model", None)
    if input_model is None:
        return {}
    from pydantic import BaseModel

    if not (inspect.isclass(input_model) and issubclass(input_model, BaseModel)):
        raise _invalid(
            yaml_path,
            "model.runtime",
            f"{runtime}.input_model must be a pydantic BaseModel subclass (the fields of one "
            f"input), got {input_model!r}; or give model.input_schema in model.yaml",
        )
    schema: dict[str, Any] = input_model.model_json_schema()
    return schema


def _batching(base: Batching, spec: ModelSpec, yaml_path: Path) -> Batching:
    if spec.batching is None:
        return base
    try:
        return replace(base, **spec.batching.model_dump(exclude_none=True))
    except ValueError as exc:
        raise _invalid(yaml_path, "model.batching", str(exc)) from exc


def builtin_models() -> dict[str, Callable[[], ModelRunner]]:
    """Models that ship inside gpufleet, by name: no directory or download needed."""
    from gpufleet.models.demo import DigitsRunner
    from gpufleet.models.demo.tiny_lm import TinyLM

    return {"digits": DigitsRunner, "tiny-lm": TinyLM}


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
    # Lexically inside the directory: a registry checkout's files are symlinks to blobs.
    file = Path(os.path.normpath(model_dir.absolute() / relative))
    if not file.is_relative_to(model_dir.absolute()):
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
    # A class that subclasses the ModelRunner Protocol without a constructor of its own gets
    # typing's placeholder, whose signature takes anything but which object() then refuses.
    init = vars(runner_class).get("__init__") or getattr(runner_class, "__init__", None)
    if getattr(init, "__name__", "") == "_no_init_or_replace_init":
        args = ()
    try:
        return runner_class(*args)
    except Exception as exc:
        raise _invalid(
            yaml_path, "model.runtime", f"creating {runtime} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _invalid(yaml_path: Path, field: str, problem: str) -> InvalidInput:
    return InvalidInput(f"{yaml_path}: {field}: {problem}", path=str(yaml_path), field=field)
