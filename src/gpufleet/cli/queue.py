"""``gpufleet queue``: look at the task queue and run its housekeeping by hand."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.table import Table

from gpufleet.cli.context import console, print_json, reported_errors, state

if TYPE_CHECKING:
    from gpufleet.queue import TaskQueue

app = typer.Typer(help="The task queue: depth and lease recovery.", no_args_is_help=True)


def open_queue(ctx: typer.Context) -> TaskQueue:
    from gpufleet.queue import TaskQueue
    from gpufleet.store import upgrade

    queue = TaskQueue.from_settings(state(ctx).settings)
    upgrade(queue.engine)
    return queue


@app.command("stats")
def stats_cmd(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Queued and running tasks per model and lane, with the oldest one's age."""
    with reported_errors():
        stats = open_queue(ctx).stats()
    if json_out:
        print_json(
            [
                {
                    "model": r.model,
                    "lane": r.lane.value,
                    "status": r.status.value,
                    "count": r.count,
                    "oldest_age_s": r.oldest_age_s,
                }
                for r in stats.depth
            ]
        )
        return
    table = Table("model", "lane", "status", "tasks", "oldest (s)")
    for r in stats.depth:
        age = f"{r.oldest_age_s:.1f}" if r.oldest_age_s is not None else "-"
        table.add_row(r.model, r.lane.value, r.status.value, str(r.count), age)
    if not stats.depth:
        console.print("the queue is empty")
    else:
        console.print(table)


@app.command("recover")
def recover_cmd(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Return tasks whose lease expired to the queue now (serve does this every second)."""
    with reported_errors():
        report = open_queue(ctx).recover_expired()
    if json_out:
        print_json(
            {
                "requeued": list(report.requeued),
                "failed": list(report.failed),
                "cancelled": list(report.cancelled),
            }
        )
    else:
        console.print(
            f"{len(report.requeued)} requeued, {len(report.failed)} failed, "
            f"{len(report.cancelled)} cancelled"
        )
