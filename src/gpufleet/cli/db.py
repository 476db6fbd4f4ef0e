"""``gpufleet db``: schema migrations of the task database.

Heavy imports (SQLAlchemy, Alembic) happen inside the commands so ``gpufleet --help`` is quick.
"""

from __future__ import annotations

import typer

from gpufleet.cli.context import console, print_json, reported_errors, state

app = typer.Typer(help="Task database: migrations and status.", no_args_is_help=True)


@app.command("upgrade")
def upgrade_cmd(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Apply pending migrations (serve does this on start too)."""
    from gpufleet.store import create_engine, current_revision, head_revision, upgrade

    settings = state(ctx).settings
    with reported_errors():
        engine = create_engine(settings.resolved_database_url())
        before = current_revision(engine)
        after = upgrade(engine)
    if json_out:
        print_json({"from": before, "to": after, "head": head_revision()})
    elif before == after:
        console.print(f"database already at revision {after} (head)")
    else:
        console.print(f"database upgraded from {before or 'empty'} to {after}")


@app.command("status")
def status_cmd(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Show the schema revision and whether migrations are pending. Exit 1 if behind."""
    from gpufleet.store import create_engine, current_revision, head_revision

    settings = state(ctx).settings
    with reported_errors():
        engine = create_engine(settings.resolved_database_url())
        current = current_revision(engine)
    head = head_revision()
    url = engine.url.render_as_string(hide_password=True)
    if json_out:
        print_json({"database": url, "current": current, "head": head, "pending": current != head})
    else:
        state_text = "up to date" if current == head else "behind: run 'gpufleet db upgrade'"
        console.print(f"{url}: revision {current or 'none'} (head {head}), {state_text}")
    if current != head:
        raise typer.Exit(1)
