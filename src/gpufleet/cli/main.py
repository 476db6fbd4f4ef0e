"""The root ``gpufleet`` command: global options, ``--version``, and the command groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gpufleet import __version__
from gpufleet.cli import db, doctor, gpus, keys, models, queue, serve, tasks
from gpufleet.cli.context import CliState, console, load_settings


def _flags_without_a_type() -> None:
    """typer 0.29 shows every flag (``--json``, ``--help``) with a ``<bool>`` value, as if
    it took one: a flag takes none, so its help row shows no type."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_without_a_type()

app = typer.Typer(
    name="gpufleet",
    help="Run big models on a few expensive GPUs for many users.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(db.app, name="db")
app.add_typer(queue.app, name="queue")
app.add_typer(keys.app, name="keys")
app.add_typer(models.app, name="models")
app.command("serve")(serve.serve)
app.command("submit")(tasks.submit)
app.command("status")(tasks.status)
app.command("result")(tasks.result)
app.command("cancel")(tasks.cancel)
app.command("tasks")(tasks.tasks)
app.command("doctor")(doctor.doctor)
app.command("gpus")(gpus.gpus)
app.command("node-labels")(gpus.node_labels)


def _version(value: bool) -> None:
    if value:
        console.print(f"gpufleet {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Data directory (env GPUFLEET_DATA_DIR)."
    ),
    database_url: str | None = typer.Option(
        None, "--database-url", help="Task database URL (env GPUFLEET_DATABASE_URL)."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    ctx.obj = CliState(load_settings(data_dir=data_dir, database_url=database_url))


def main() -> None:
    app()
