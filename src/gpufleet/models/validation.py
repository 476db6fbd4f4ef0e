"""A model tried before it becomes a version: ``models validate`` and ``models package``
build the runner in a child process, load it (on CPU where it can), warm it up and run its
``example_input`` through ``predict``, and report every problem with its place and its fix.

The child is a real process with a timeout: a model's code may hang, exit, or leave threads
and CUDA memory behind, and none of that may reach the CLI. It writes its report to a file,
not stdout, which the model's own prints may fill. This module only reports; it changes
nothing in the model directory or the registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpufleet.errors import InvalidInput

DEFAULT_TIMEOUT_S = 300.0
_TAIL_LINES = 8


@dataclass(frozen=True)
class Problem:
    """One thing to fix: ``where`` is a model.yaml field (``model.runtime``) or a method of
    the model (``predict``); ``message`` says what is wrong and what to do."""

    where: str
    message: str
    traceback: str = ""  # the model's own frames only

    def line(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Trial:
    """What the child did with the model, and what went wrong."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    device: str | None = None  # where it was loaded; None when it was not
    predicted: int = 0  # batches of the example that predict answered (1, then 2)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "problems": [p.line() for p in self.problems],
            "details": [asdict(p) for p in self.problems],
            "notes": self.notes,
            "device": self.device,
            "predicted": self.predicted,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        return cls(
            problems=[Problem(**d) for d in data["details"]],
            notes=list(data["notes"]),
            device=data["device"],
            predicted=int(data["predicted"]),
        )


def try_model_dir(model_dir: Path, *, timeout: float = DEFAULT_TIMEOUT_S) -> Trial:
    """Build, load, warm up and try the model of ``model_dir`` in a child process."""
    with tempfile.TemporaryDirectory(prefix="gpufleet-validate-") as tmp:
        report = Path(tmp) / "trial.json"
        cmd = [sys.executable, "-m", "gpufleet.models.validation", str(model_dir), str(report)]
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return Trial(
                problems=[
                    Problem(
                        "model",
                        f"building, loading and trying the model took more than {timeout:g} s "
                        "(stopped); make the constructor and load() faster, or give more "
                        "time with --timeout",
                    )
                ]
            )
        if proc.returncode != 0 or not report.is_file():
            tail = proc.stdout.decode(errors="replace").strip().splitlines()[-_TAIL_LINES:]
            return Trial(
                problems=[
                    Problem(
                        "model",
                        f"the process trying the model exited with code {proc.returncode} "
                        "before it finished (does the model's code call exit(), or crash "
                        "Python?); its last output:",
                        "\n".join(tail),
                    )
                ]
            )
        return Trial.from_dict(json.loads(report.read_text()))


def run_trial(model_dir: Path) -> Trial:
    """The child's work, in this process: build, load, warm up, predict."""
    from gpufleet.models.directory import load_model_dir
    from gpufleet.models.loader import CheckedRunner
    from gpufleet.models.manifest import ModelManifest

    problems: list[Problem] = []
    notes: list[str] = []
    manifest = ModelManifest.from_yaml(model_dir)
    try:
        runner = CheckedRunner(load_model_dir(model_dir, manifest), manifest)
    except InvalidInput as exc:
        where = str(exc.details.get("field") or "model")
        message = exc.message.split(f"{where}: ", 1)[-1]
        return Trial([Problem(where, message, _model_frames(exc, model_dir))])
    except Exception as exc:
        return Trial([Problem("model.runtime", _said(exc), _model_frames(exc, model_dir))])
    device = _load(runner, manifest.model.resources.gpu.mode, model_dir, problems, notes)
    if device is None:
        return Trial(problems, notes)
    predicted = 0
    try:
        runner.warmup()
    except Exception as exc:
        problems.append(Problem("warmup", f"raised {_said(exc)}", _model_frames(exc, model_dir)))
    else:
        predicted = _predict_example(runner, model_dir, problems, notes)
    try:
        runner.unload()
    except Exception as exc:
        problems.append(Problem("unload", f"raised {_said(exc)}", _model_frames(exc, model_dir)))
    return Trial(problems, notes, device, predicted)


def _load(
    runner: Any, gpu_mode: str, model_dir: Path, problems: list[Problem], notes: list[str]
) -> str | None:
    """Load on CPU; on a GPU when CPU fails and the model asks for one. The device, or None."""
    try:
        runner.load("cpu")
        return "cpu"
    except Exception as exc:
        on_cpu: BaseException = exc
    if gpu_mode == "none":
        problems.append(
            Problem(
                "load",
                f"load('cpu') raised {_said(on_cpu)} (model.yaml says resources.gpu.mode "
                "none: it must load on CPU)",
                _model_frames(on_cpu, model_dir),
            )
        )
        return None
    if not _gpu_here():
        notes.append(
            f"not loaded: load('cpu') raised {_said(on_cpu)}, and the model asks for a GPU "
            f"(resources.gpu.mode {gpu_mode}) while none is here; load, warmup and predict "
            "were not tried"
        )
        return None
    try:
        runner.load("cuda:0")
        notes.append(f"loaded on cuda:0 (load('cpu') raised {_said(on_cpu)})")
        return "cuda:0"
    except Exception as exc:
        problems.append(
            Problem("load", f"load('cuda:0') raised {_said(exc)}", _model_frames(exc, model_dir))
        )
        return None


def _predict_example(
    runner: Any, model_dir: Path, problems: list[Problem], notes: list[str]
) -> int:
    """Run the example alone, then (batching allowing) twice in one batch; the batches that
    got one good output per input."""
    from gpufleet.models.input_check import input_check
    from gpufleet.models.runtime import ItemError

    info = runner.info
    example = info.example_input
    if example is None:
        notes.append(
            "no example_input: predict was not tried; add model.example_input to model.yaml "
            "(one input that works: GET /v1/models publishes it)"
        )
        return 0
    check = input_check(info.name, info.input_schema)
    if check is not None:
        try:
            check(example)
        except InvalidInput as exc:
            problems.append(
                Problem(
                    "model.example_input",
                    f"breaks the model's input_schema: {exc.message}; fix the example or "
                    "the schema",
                )
            )
            return 0
    sizes = [1, 2] if runner.batching.max_batch_size >= 2 else [1]
    done = 0
    for size in sizes:
        try:
            outputs = runner.predict([example] * size)
        except Exception as exc:
            problems.append(
                Problem(
                    "predict",
                    f"raised {_said(exc)} on a batch of {size} example input(s)",
                    _model_frames(exc, model_dir),
                )
            )
            return done
        if not isinstance(outputs, list | tuple) or len(outputs) != size:
            got = (
                f"{len(outputs)} outputs"
                if isinstance(outputs, list | tuple)
                else f"a {type(outputs).__name__}"
            )
            problems.append(
                Problem(
                    "predict",
                    f"returned {got} for a batch of {size} input(s); it must return a list "
                    "with one output per input, in order",
                )
            )
            return done
        for out in outputs:
            if isinstance(out, ItemError):
                problems.append(
                    Problem(
                        "model.example_input",
                        f"predict failed the example: {out.code}: {out.message}; give an "
                        "example that works",
                    )
                )
                return done
            try:
                json.dumps(out)
            except (TypeError, ValueError) as exc:
                problems.append(
                    Problem(
                        "predict",
                        f"its output is not a JSON value ({exc}); return dicts, lists, "
                        "strings, numbers, booleans or None (numpy values: .tolist())",
                    )
                )
                return done
        done += 1
    return done


def _gpu_here() -> bool:
    from gpufleet.gpu.discovery import discover

    try:
        return bool(discover().gpus)
    except Exception:  # no NVML at all: no GPU to try
        return False


def _said(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _model_frames(exc: BaseException, model_dir: Path) -> str:
    """The traceback of the model's own error (``exc``'s cause, for a wrapped one), cut to
    the frames in files of the model directory: gpufleet's frames only hide the bug."""
    error = exc.__cause__ if isinstance(exc, InvalidInput) and exc.__cause__ else exc
    root = model_dir.resolve()
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if Path(f.filename).resolve().is_relative_to(root)
    ]
    if isinstance(error, SyntaxError) and error.filename:
        return f'  File "{error.filename}", line {error.lineno}\n    {(error.text or "").strip()}'
    if not frames:
        return ""
    for f in frames:
        f.filename = os.path.relpath(f.filename, root)
    lines = traceback.format_list(frames)
    return "".join(lines).rstrip() + f"\n{_said(error)}"


def main(argv: list[str]) -> int:
    """``python -m gpufleet.models.validation MODEL_DIR REPORT``: the child's entry point."""
    model_dir, report = Path(argv[0]), Path(argv[1])
    trial = run_trial(model_dir)
    report.write_text(json.dumps(trial.to_dict()))
    sys.stdout.flush()
    # Threads the model started must not keep this process (and the CLI waiting) alive.
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
