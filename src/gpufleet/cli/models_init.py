"""``gpufleet models init``: write a new model directory from a template. Thin: the
templates are in ``gpufleet.models.templates``."""

from __future__ import annotations

from pathlib import Path

import typer

from gpufleet.cli.context import console, print_json, reported_errors


def init_cmd(
    name: str = typer.Argument(..., help="The model's name (lower-case, e.g. my-model)."),
    template: str = typer.Option("python", "--template", help="python, torchscript, onnx or hf."),
    directory: Path | None = typer.Option(
        None, "--dir", help="The directory to create (default: ./NAME)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Write a new model directory that serves as it is.

    Every model.yaml field and runner method is explained in comments.
    """
    from gpufleet.models.templates import write_template

    target = directory if directory is not None else Path(name)
    with reported_errors():
        files = write_template(name, template, target)
    if json_out:
        print_json({"name": name, "template": template, "path": str(target), "files": files})
        return
    console.print(f"wrote {target}: {', '.join(files)}", markup=False, highlight=False)
    console.print(
        f"next: gpufleet models validate {target}\n      gpufleet serve --model {target}",
        markup=False,
        highlight=False,
    )
