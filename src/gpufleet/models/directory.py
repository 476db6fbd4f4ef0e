"""Model directories: a folder with a ``model.yaml`` beside the model's files, loaded into a
``ModelRunner``; and the built-in models, which need no directory.

``format: python`` imports the runner class named by ``runtime``; the other formats are
built by ``gpufleet.models.formats``. Every mistake is an ``InvalidInput`` naming the file and
the field.
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

        return create_runner(
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
    assert spec.runtime is not None  # the schema requires it for format python
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
    runner.batching = _batching(runner.batching, spec, yaml_path)
    return runner


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
    try:
        return runner_class(*args)
    except Exception as exc:
        raise _invalid(
            yaml_path, "model.runtime", f"creating {runtime} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _invalid(yaml_path: Path, field: str, problem: str) -> InvalidInput:
    return InvalidInput(f"{yaml_path}: {field}: {problem}", path=str(yaml_path), field=field)
