"""``create_runner``: checks a model directory's entry, precision and task for one of the
formats, and builds the format's runner without loading weights (``runner.load`` does).

It trusts ``directory.load_model_dir`` for ``model.yaml``'s syntax and the device for the
precision's hardware needs; it owns what only the model's own files can tell.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gpufleet.errors import InvalidInput
from gpufleet.models.formats.spec import LoadSpec, model_dir_error
from gpufleet.models.runtime import Batching, ModelRunner

FORMATS = ("torchscript", "onnx", "hf")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
HF_TASKS = ("text-generation", "text-classification", "feature-extraction")
DEFAULT_BATCHING = Batching(max_batch_size=8, max_queue_delay_ms=5)

# Files that hold a model of each format, when model.entry does not name one.
ENTRY_PATTERNS = {"torchscript": ("*.pt", "*.ts", "*.torchscript"), "onnx": ("*.onnx",)}


def create_runner(
    model_dir: Path,
    *,
    format: str,
    name: str,
    version: str,
    description: str,
    precision: str,
    entry: str | None,
    task: str | None,
    batching: Batching | None,
    example_input: Any = None,
) -> ModelRunner:
    """The runner for the ``format`` model in ``model_dir``; weights load in ``runner.load``.

    ``entry`` is the file (``torchscript``, ``onnx``) or directory (``hf``) to open, relative
    to ``model_dir``; None finds it. ``task`` (``hf`` only) None infers it from
    ``config.json``. ``example_input`` (optional) becomes ``info.example_input``; TorchScript
    also takes its inputs' dtypes from it. Raises ``InvalidInput`` naming the field at fault.
    """
    model_dir = Path(model_dir)
    if format not in FORMATS:
        raise model_dir_error(
            model_dir,
            "model.format",
            f"unknown format {format!r}; use one of " + ", ".join(FORMATS),
        )
    if precision not in PRECISIONS:
        raise model_dir_error(
            model_dir,
            "model.precision",
            f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}",
        )
    if task is not None and format != "hf":
        raise model_dir_error(
            model_dir, "model.task", f"task applies to format 'hf' only, not {format!r}; remove it"
        )
    if not model_dir.is_dir():
        raise InvalidInput(f"model directory {model_dir} does not exist", path=str(model_dir))
    spec = LoadSpec(
        model_dir=model_dir,
        entry=_find_entry(model_dir, format, entry),
        name=name,
        version=version,
        description=description,
        precision=precision,
        batching=batching or DEFAULT_BATCHING,
        example_input=example_input,
    )
    # Each format's module imports its framework inside functions only.
    if format == "torchscript":
        from gpufleet.models.formats.torchscript import TorchScriptRunner

        return TorchScriptRunner(spec)
    if format == "onnx":
        from gpufleet.models.formats.onnx import OnnxRunner

        return OnnxRunner(spec)
    from gpufleet.models.formats.hf import HfRunner

    return HfRunner(spec, task=task)


def _find_entry(model_dir: Path, format: str, entry: str | None) -> Path:
    if entry is not None:
        # Lexically inside: a registry checkout's files are symlinks to blobs elsewhere.
        path = Path(os.path.normpath(model_dir.absolute() / entry))
        if not path.is_relative_to(model_dir.absolute()):
            raise model_dir_error(
                model_dir, "model.entry", f"{entry!r} is outside the model directory"
            )
        want_dir = format == "hf"
        if not (path.is_dir() if want_dir else path.is_file()):
            kind = "directory" if want_dir else "file"
            raise model_dir_error(
                model_dir,
                "model.entry",
                f"{entry!r} is not a {kind} in {model_dir}; fix the path or remove model.entry",
            )
        return path
    if format == "hf":
        return model_dir
    patterns = ENTRY_PATTERNS[format]
    found = sorted({p for pattern in patterns for p in model_dir.glob(pattern) if p.is_file()})
    if not found:
        raise model_dir_error(
            model_dir,
            "model.entry",
            f"no {' / '.join(patterns)} file in {model_dir}; add the {format} model file "
            "or set model.entry to its path",
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise model_dir_error(
            model_dir,
            "model.entry",
            f"{len(found)} candidate files ({names}); set model.entry to the one to load",
        )
    return found[0]
