"""``gpufleet db``: schema migrations of the task database, and how every command opens it.

A command that only reads (``queue stats``, ``keys list``) or changes what is there
(``queue recover``, ``keys revoke``) never creates a database: a wrong or missing data dir would
otherwise give an empty one that the server never sees. It stops with one line naming the
database and how to point at another. Only ``serve``, ``db upgrade`` and ``keys create
--init`` create one. Heavy imports (SQLAlchemy, Alembic) happen inside the functions so
``gpufleet --help`` is quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from gpufleet.cli.context import console, print_json, reported_errors, state
from gpufleet.errors import DatabaseNotFound

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from gpufleet.settings import Settings

app = typer.Typer(help="Task database: migrations and status.", no_args_is_help=True)

POINT_ELSEWHERE = (
    "point to your server's with --data-dir DIR, GPUFLEET_DATA_DIR or GPUFLEET_DATABASE_URL "
    "('gpufleet serve' creates one on its first start)"
)


def describe(settings: Settings) -> str:
    """The database the settings name, as a user recognises it: the SQLite file (and that it
    is the data dir's) or the URL without its password."""
    from sqlalchemy.engine import make_url

    if settings.database_url:
        return make_url(settings.database_url).render_as_string(hide_password=True)
    return f"{settings.data_dir / 'gpufleet.db'} (the data dir's database)"


def safe_url(settings: Settings) -> str:
    """The database URL without its password (what ``--json`` reports)."""
    from sqlalchemy.engine import make_url

    return make_url(settings.resolved_database_url()).render_as_string(hide_password=True)


def sqlite_file_missing(url: str) -> bool:
    """A SQLite URL whose file does not exist (opening it would create it)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return False
    return not Path(parsed.database).expanduser().exists()


def open_existing(settings: Settings, hint: str = POINT_ELSEWHERE) -> Engine:
    """The engine of the database the settings name, which must exist and hold gpufleet's
    tables (``DatabaseNotFound`` naming it otherwise; nothing is created). A schema of an
    older gpufleet is brought up to date, as ``serve`` does."""
    from gpufleet.store import create_engine, current_revision, upgrade

    url = settings.resolved_database_url()
    if sqlite_file_missing(url):
        raise DatabaseNotFound(f"no gpufleet database at {describe(settings)}; {hint}")
    engine = create_engine(url)
    if current_revision(engine) is None:
        engine.dispose()
        raise DatabaseNotFound(f"{describe(settings)} holds no gpufleet tables; {hint}")
    upgrade(engine)
    return engine


@app.command("upgrade")
def upgrade_cmd(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Apply pending migrations (serve does this on start too); creates the database if none."""
    from gpufleet.store import create_engine, current_revision, head_revision, upgrade

    settings = state(ctx).settings
    with reported_errors():
        engine = create_engine(settings.resolved_database_url())
        before = current_revision(engine)
        after = upgrade(engine)
    where = describe(settings)
    if json_out:
        print_json({"database": safe_url(settings), "from": before, "to": after,
                    "head": head_revision()})  # fmt: skip
    elif before == after:
        console.print(f"{where}: already at revision {after} (head)", markup=False)
    elif before is None:
        console.print(f"{where}: created at revision {after}", markup=False)
    else:
        console.print(f"{where}: upgraded from {before} to {after}", markup=False)


@app.command("status")
def status_cmd(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Show the schema revision and whether migrations are pending. Exit 1 if behind (or if
    there is no database: it is not created)."""
    from gpufleet.store import create_engine, current_revision, head_revision

    settings = state(ctx).settings
    url = settings.resolved_database_url()
    exists = not sqlite_file_missing(url)
    current = None
    if exists:
        with reported_errors():
            engine = create_engine(url)
            current = current_revision(engine)
    head = head_revision()
    where = describe(settings)
    if json_out:
        print_json({"database": safe_url(settings), "exists": exists, "current": current,
                    "head": head, "pending": current != head})  # fmt: skip
    elif not exists:
        console.print(f"{where}: no database here (head {head}); behind: run 'gpufleet db "
                      "upgrade' to create it, or point to yours (--data-dir, "
                      "GPUFLEET_DATABASE_URL)", markup=False)  # fmt: skip
    else:
        state_text = "up to date" if current == head else "behind: run 'gpufleet db upgrade'"
        console.print(f"{where}: revision {current or 'none'} (head {head}), {state_text}",
                      markup=False)  # fmt: skip
    if current != head:
        raise typer.Exit(1)
