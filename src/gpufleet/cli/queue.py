"""``gpufleet queue``: look at the task queue and run its housekeeping by hand.

Both commands work on the database that exists where the settings point and never create one
(``cli.db.open_existing``): an empty answer from a new, wrong database would look like truth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from gpufleet.cli.context import console, print_json, reported_errors, state
from gpufleet.cli.tables import Col, print_table

if TYPE_CHECKING:
    from gpufleet.queue import TaskQueue

app = typer.Typer(help="The task queue: depth and lease recovery.", no_args_is_help=True)


STATS_COLUMNS = (
    Col("model", min_width=8, fit_width=30), Col("lane", keep=1), Col("status", min_width=7),
    Col("tasks", justify="right"), Col("oldest (s)", keep=2, justify="right"),
)  # fmt: skip


def open_queue(ctx: typer.Context) -> TaskQueue:
    from gpufleet.cli.db import open_existing
    from gpufleet.queue import TaskQueue

    settings = state(ctx).settings
    return TaskQueue.from_settings(settings, open_existing(settings))


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
    if not stats.depth:
        from gpufleet.cli.db import describe

        console.print(f"the queue is empty ({describe(state(ctx).settings)})", markup=False)
        return
    rows = [
        [r.model, r.lane.value, r.status.value, str(r.count),
         f"{r.oldest_age_s:.1f}" if r.oldest_age_s is not None else "-"]
        for r in stats.depth
    ]  # fmt: skip
    print_table(console, STATS_COLUMNS, rows)


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
