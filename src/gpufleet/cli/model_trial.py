"""How ``models validate`` and ``models package`` show a model's trial (``gpufleet.models.
validation``): a line per problem after the file to fix, the model's frames under it, notes,
and the summary of a model that passed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from gpufleet.cli.context import err_console, print_json
from gpufleet.errors import InvalidInput

if TYPE_CHECKING:
    from gpufleet.models.manifest import ModelManifest
    from gpufleet.models.validation import Trial


def manifest_or_exit(model_dir: Path, json_out: bool) -> ModelManifest:
    """The model.yaml of ``model_dir``, or every problem in it and exit code 1."""
    from gpufleet.models.manifest import ModelManifest

    try:
        return ModelManifest.from_yaml(model_dir)
    except InvalidInput as exc:
        problems = exc.details.get("problems") or [exc.message]
        if json_out:
            print_json({"valid": False, "path": str(model_dir), "problems": problems})
            raise typer.Exit(1) from None
        source = exc.details.get("path", str(model_dir))
        for p in problems:
            err_console.print(f"{source}: {p}", markup=False, highlight=False)
        raise typer.Exit(1) from None


def print_trial(model_dir: Path, manifest: ModelManifest, trial: Trial) -> None:
    """Each problem on its line, after the file to fix (model.yaml for its fields, the
    runner's file for its methods), the model's own traceback frames indented under it;
    then the notes."""
    runtime = (manifest.model.runtime or "").split(":")
    code = runtime[1] if len(runtime) == 3 and runtime[1].endswith(".py") else "model.yaml"
    for p in trial.problems:
        where = model_dir / ("model.yaml" if p.where.startswith("model") else code)
        err_console.print(f"{where}: {p.line()}", markup=False, highlight=False)
        for line in p.traceback.splitlines():
            err_console.print(f"    {line}", markup=False, highlight=False)
    for note in trial.notes:
        err_console.print(f"note: {note}", markup=False, highlight=False)


def trial_summary(trial: Trial) -> str:
    if trial.device is None:
        return "built, not loaded (see the note)"
    tried = (
        "predict answered the example_input (alone, then in a batch of 2)"
        if trial.predicted > 1
        else "predict answered the example_input"
        if trial.predicted
        else "predict not tried (see the note)"
    )
    return f"built, loaded on {trial.device}, {tried}"
