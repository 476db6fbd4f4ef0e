"""The root ``gpufleet`` command: global options, ``--version``, and the command groups.

Every command is a ``LazyCommand``: its module is imported when it runs, so ``gpufleet --help``
and the API commands do not pay for the rest (``bench/cli_start.py`` measures it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gpufleet import __version__
from gpufleet.cli.context import CliState, console
from gpufleet.cli.lazy import Entry, lazy_group


def _flags_without_a_type() -> None:
    """typer 0.29 shows every flag (``--json``, ``--help``) with a ``<bool>`` value, as if
    it took one: a flag takes none, so its help row shows no type. Other typer versions
    (the GPU images carry older ones) lack the method, and are left as they are."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None:
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


def _no_adapter_for_a_missing_value() -> None:
    """typer 0.29 builds a pydantic ``TypeAdapter`` for every parameter it processes, also for
    an option left out (whose value stays ``None``): the root's ``--data-dir`` alone made
    ``gpufleet tasks --help`` import pydantic. A missing value needs no coercion, so it skips
    that step; everything else (required, callbacks) is as typer does it. A typer without
    that class (older ones) is left as it is."""
    import typer.core

    from gpufleet.cli.lazy import MissingParameter, click

    _TyperParameter = getattr(typer.core, "_TyperParameter", None)
    if _TyperParameter is None:
        return
    process = _TyperParameter.process_value

    def process_value(self: Any, ctx: click.Context, value: Any) -> Any:
        if value is not None or self.multiple or self.nargs == -1:
            return process(self, ctx, value)
        if self.required:
            raise MissingParameter(ctx=ctx, param=self)
        return self.callback(ctx, self, value) if self.callback is not None else value

    _TyperParameter.process_value = process_value


_flags_without_a_type()
_no_adapter_for_a_missing_value()

# In the order ``gpufleet --help`` lists them. Each summary is its command's first paragraph
# of help (tests/cli/test_cli_start.py checks that they agree).
COMMANDS = {
    "serve": Entry("gpufleet.cli.serve:serve",
                   "Serve models: HTTP API, durable queue and GPU workers."),
    "submit": Entry("gpufleet.cli.tasks:submit",
                    "Queue a task. Prints its id; with --wait, follows it and prints its result. "
                    "With --file, queues every task of the file and follows them all."),
    "status": Entry("gpufleet.cli.tasks:status",
                    "A task's state: lane, attempts, times, and its error if it failed."),
    "result": Entry("gpufleet.cli.tasks:result",
                    "A finished task's result (task_not_finished while it is queued or running)."),
    "cancel": Entry("gpufleet.cli.tasks:cancel",
                    "Cancel a task: a queued one ends at once, a running one at its next batch."),
    "tasks": Entry("gpufleet.cli.tasks:tasks", "Your tasks, newest first."),
    "watch": Entry("gpufleet.cli.watch:watch",
                   "A live view of the queue through the API: depth by model and lane, "
                   "throughput, workers, the oldest task's wait. Ctrl-C ends it."),
    "doctor": Entry("gpufleet.cli.doctor:doctor",
                    "Check the driver, CUDA runtimes, GPUs and models against each other."),
    "gpus": Entry("gpufleet.cli.gpus:gpus",
                  "This host's GPUs: memory, capability, MIG, NUMA node and CPU affinity, "
                  "topology and the processes using them. No GPU is not an error: serve then "
                  "runs workers on CPU slots."),
    "node-labels": Entry("gpufleet.cli.gpus:node_labels",
                         "The labels this Kubernetes node should carry (GPU Feature Discovery's "
                         "names, and gpufleet.dev/* for node affinity). With no GPU: none, and "
                         "a note on stderr."),
    "db": Entry("gpufleet.cli.db:app", "Task database: migrations and status."),
    "queue": Entry("gpufleet.cli.queue:app", "The task queue: depth and lease recovery."),
    "keys": Entry("gpufleet.cli.keys:app",
                  "API keys: who may call the HTTP API, and as which tenant."),
    "models": Entry("gpufleet.cli.models:app",
                    "Model artifacts: model.yaml, the local registry, push and pull."),
}  # fmt: skip

app = typer.Typer(
    name="gpufleet",
    help="Run big models on a few expensive GPUs for many users.",
    cls=lazy_group(COMMANDS),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


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
    # The settings are read when a command first asks for them (CliState.settings).
    ctx.obj = CliState({"data_dir": data_dir, "database_url": database_url})


def main() -> None:
    app()
