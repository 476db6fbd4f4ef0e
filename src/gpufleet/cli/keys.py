"""``gpufleet keys``: create, list and revoke API keys in the server's database.

A new key is printed once; only its hash is kept, so it can never be shown again. Keys live in
the server's database: the commands never create one, and ``create`` refuses a database no
server has used (no keys, no tasks) unless ``--init`` says it is meant (see ``cli.db``).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import typer

from gpufleet.cli.context import console, err_console, print_json, reported_errors, state
from gpufleet.cli.tables import Col, print_table, short_time
from gpufleet.errors import DatabaseUnused

if TYPE_CHECKING:
    from gpufleet.api.keys import KeyStore

app = typer.Typer(
    help="API keys: who may call the HTTP API, and as which tenant.", no_args_is_help=True
)


KEY_COLUMNS = (
    Col("id", min_width=12), Col("tenant", min_width=8, fit_width=20), Col("admin", keep=2),
    Col("name", keep=3, min_width=6, fit_width=20), Col("created", keep=4, short=short_time),
    Col("revoked", keep=1, short=short_time),
)  # fmt: skip
INIT_HINT = (
    "point to your server's with --data-dir DIR, GPUFLEET_DATA_DIR or GPUFLEET_DATABASE_URL, "
    "or pass --init to create it here"
)


def open_keys(ctx: typer.Context) -> KeyStore:
    from gpufleet.api.keys import KeyStore
    from gpufleet.cli.db import open_existing

    return KeyStore(open_existing(state(ctx).settings))


def open_keys_to_create(ctx: typer.Context, init: bool) -> KeyStore:
    """The key store of an existing database that a server has used (it has keys or tasks: a
    serve makes an admin key on its first start), or with ``init`` of any, created if need be."""
    import sqlalchemy as sa

    from gpufleet.api.keys import KeyStore
    from gpufleet.cli.db import describe, open_existing
    from gpufleet.store import api_keys, create_engine, tasks, upgrade

    settings = state(ctx).settings
    if init:
        engine = create_engine(settings.resolved_database_url())
        upgrade(engine)
        return KeyStore(engine)
    engine = open_existing(settings, INIT_HINT)
    with engine.connect() as conn:
        used = any(
            conn.execute(sa.select(column).limit(1)).first() is not None
            for column in (api_keys.c.id, tasks.c.id)
        )
    if not used:
        engine.dispose()
        raise DatabaseUnused(
            f"{describe(settings)} has no API keys and no tasks: no gpufleet serve has used it, "
            f"so its keys would reach no server; {INIT_HINT}"
        )
    return KeyStore(engine)


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


@app.command("create")
def create_cmd(
    ctx: typer.Context,
    tenant: str = typer.Option(..., "--tenant", help="The tenant the key acts as."),
    admin: bool = typer.Option(False, "--admin", help="May act on every tenant's tasks."),
    name: str | None = typer.Option(None, "--name", help="A label to recognise the key by."),
    init: bool = typer.Option(
        False, "--init", help="Also on a new database (none yet, or never served): create it."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Create a key and print it once."""
    from gpufleet.cli.db import describe

    with reported_errors():
        info, key = open_keys_to_create(ctx, init).create(tenant, admin=admin, name=name)
    if json_out:
        print_json(info.to_dict() | {"key": key})
        return
    console.print(key, markup=False, highlight=False)
    err_console.print(
        f"key {info.id} for tenant {info.tenant}{' (admin)' if info.admin else ''} in "
        f"{describe(state(ctx).settings)}: store it now; it cannot be shown again",
        markup=False,
        highlight=False,
    )


@app.command("list")
def list_cmd(
    ctx: typer.Context,
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's keys."),
    include_revoked: bool = typer.Option(False, "--all", help="Include revoked keys."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Keys, oldest first (ids and labels only: secrets are not kept)."""
    with reported_errors():
        infos = open_keys(ctx).list(tenant, include_revoked=include_revoked)
    if json_out:
        print_json([i.to_dict() for i in infos])
        return
    if not infos:
        from gpufleet.cli.db import describe

        more = "" if include_revoked else "; --all shows revoked ones"
        console.print(f"no API keys in {describe(state(ctx).settings)}{more}", markup=False)
        return
    rows = [
        [i.id, i.tenant, "yes" if i.admin else "", i.name or "", _when(i.created_at),
         _when(i.revoked_at)]
        for i in infos
    ]  # fmt: skip
    print_table(console, KEY_COLUMNS, rows)


@app.command("revoke")
def revoke_cmd(
    ctx: typer.Context,
    key_id: str = typer.Argument(..., help="The key's id (gpufleet keys list)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Revoke a key; servers stop accepting it within a few seconds (their cache)."""
    with reported_errors():
        info = open_keys(ctx).revoke(key_id)
    if json_out:
        print_json(info.to_dict())
    else:
        console.print(f"revoked key {info.id} of tenant {info.tenant}", markup=False)
